#!/bin/sh
# /etc/xen/scripts/vif-bridge, libxl's default vif script, in xbuild's nested Xen rig (the bridge mode): the
# steps Xen 4.17's own vif-bridge takes for a vif (xen-network-common.sh: the bridge named in xenstore, the
# port's MAC fe:ff:ff:ff:ff:ff, the bridge's MTU, `brctl addif` when brctl is on the PATH, else
# `ip link set ... master`, link up), in busybox sh: Xen's bash scripts fork too much under TCG to finish
# within libxl's 60 s hotplug timeout.
case "$1" in
  online|add)
    bridge=$(xenstore-read "$XENBUS_PATH/bridge") || exit 1
    ip link set dev "$vif" down
    ip link set dev "$vif" address fe:ff:ff:ff:ff:ff
    ip link set dev "$vif" mtu "$(cat "/sys/class/net/$bridge/mtu")"
    brctl addif "$bridge" "$vif" && ip link set dev "$vif" up || exit 1
    xenstore-write "$XENBUS_PATH/hotplug-status" connected;;
esac
exit 0
