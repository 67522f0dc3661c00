#!/bin/sh
# libxl's hotplug script for a rig guest's vif: a point-to-point route from dom0 (10.0.3.1 on every vif) to
# the guest's address (the vif's ip=, 10.0.3.2 in a cold rig, one per guest in the warm rig), no bridge.
case "$1" in
  online|add)
    guest=$(xenstore-read "$XENBUS_PATH/ip") || exit 1
    ip link set "$vif" up
    ip addr add 10.0.3.1/32 dev "$vif"
    ip route add "$guest/32" dev "$vif"
    xenstore-write "$XENBUS_PATH/hotplug-status" connected;;
esac
exit 0
