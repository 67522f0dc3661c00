"""xbuild: turn a Docker/OCI image into a unikernel-style Xen guest."""

__version__ = "0.1.0"
