#!/bin/sh
# libxl's hotplug script for the rig's only vif: a point-to-point route from dom0 to the guest, no bridge.
case "$1" in
  online|add)
    ip link set "$vif" up
    ip addr add 10.0.3.1/32 dev "$vif"
    ip route add 10.0.3.2/32 dev "$vif"
    xenstore-write "$XENBUS_PATH/hotplug-status" connected;;
esac
exit 0
