"""Runners: boot an artifact directory under QEMU or Xen and supervise it."""
