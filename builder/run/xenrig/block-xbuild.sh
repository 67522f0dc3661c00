#!/bin/sh
# /etc/xen/scripts/block, libxl's default hotplug script for phy disks, in xbuild's nested Xen rig: tell
# blkback the device's major:minor (the target is one of dom0's /dev/xbuild-diskN, QEMU's virtio disks).
case "$1" in
  add)
    dev=$(stat -L -c '%t:%T' "$(xenstore-read "$XENBUS_PATH/params")") || exit 1
    xenstore-write "$XENBUS_PATH/physical-device" "$dev" "$XENBUS_PATH/hotplug-status" connected;;
esac
exit 0
