#!/bin/sh
# /init of the dom0 in xbuild's nested Xen rig (builder/run/xen.py).
# Starts the toolstack, creates /guest/guest.cfg with the guest console on ttyS1 (the host reads only the
# guest there), and turns a "stop" line from ttyS1 into `xl shutdown`, then `xl destroy` after the grace.
# Its own output goes to hvc0 (the host's log). When the guest is gone it reboots: QEMU runs -no-reboot.
# With xenrig.disks=N, QEMU attached N virtio disks with serials xbuild-disk0..N-1 (the guest's disks, as
# raw block devices): they appear as /dev/xbuild-diskI, the targets of the guest's phy disk lines.
/bin/busybox --install -s
export PATH="$(echo /usr/lib/xen-*/bin):/usr/sbin:/usr/bin:/sbin:/bin"
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/xen /run/xenstored /var/log/xen/console /var/lib/xen /var/lib/xenstored
say() { echo "xenrig: $* at $(cut -d' ' -f1 /proc/uptime)s"; }
end() { say "$*"; reboot -f; sleep 10; poweroff -f; }
stty -F /dev/ttyS1 raw -echo || end "no ttyS1"
grace=10; ports=""; guest=""; disks=0
for a in $(cat /proc/cmdline); do case $a in
  xenrig.grace=*) grace=${a#*=};; xenrig.ports=*) ports=${a#*=};; xenrig.guest=*) guest=${a#*=};;
  xenrig.disks=*) disks=${a#*=};;
esac; done
say "dom0 init"
for m in /lib/modules/*.ko; do insmod "$m" || end "insmod $m failed"; done
if [ "$disks" -gt 0 ]; then  # virtio-blk and blkback (the files are numbered in load order)
  for m in /lib/modules/blk/*.ko; do insmod "$m" || end "insmod $m failed"; done
  for s in /sys/block/vd*/serial; do
    [ -e "$s" ] && ln -s "/dev/$(basename "$(dirname "$s")")" "/dev/$(cat "$s")"
  done
  i=0; while [ $i -lt "$disks" ]; do [ -b /dev/xbuild-disk$i ] || end "no disk xbuild-disk$i"; i=$((i+1)); done
  say "$disks disk(s) ready"
fi
mount -t xenfs xenfs /proc/xen || end "mount xenfs failed"
xenstored --pid-file /run/xenstored.pid || end "xenstored failed"
n=0; until xenstore-ls / >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 300 ] && end "xenstored not answering"; sleep 0.1; done
xen-init-dom0 >/dev/null || end "xen-init-dom0 failed"
xenconsoled --log=none || end "xenconsoled failed"
if [ -n "$ports" ]; then  # QEMU's user net reaches dom0 as 10.0.2.15; relay each port to the guest
  for m in /lib/modules/net/*.ko; do insmod "$m" || end "insmod $m failed"; done
  ip link set lo up; ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || end "no eth0"
  for p in $(echo "$ports" | tr , ' '); do nc -ll -p "$p" -e nc "$guest" "$p" & done
fi
say "toolstack ready"
secs() { cut -d. -f1 /proc/uptime; }
stop() {
  touch /run/stop
  n=0; until xl domid xbuild >/dev/null 2>&1 || [ $n -ge 20 ]; do sleep 0.5; n=$((n+1)); done  # being created
  xl shutdown xbuild && say "guest asked to shut down"
  limit=$(($(secs) + grace)); while xl domid xbuild >/dev/null 2>&1 && [ "$(secs)" -lt $limit ]; do sleep 0.5; done
  xl destroy xbuild 2>/dev/null && say "guest destroyed after ${grace}s"
}
(while read -r cmd; do [ "$cmd" = stop ] && stop; done </dev/ttyS1) &
[ -e /run/stop ] && end "stopped before the guest was created"
xl create -c /guest/guest.cfg </dev/null >/dev/ttyS1
rc=$?
xl destroy xbuild 2>/dev/null
end "xl exited $rc"
