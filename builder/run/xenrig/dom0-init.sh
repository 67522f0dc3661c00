#!/bin/sh
# /init of the dom0 in xbuild's nested Xen rig (builder/run/xen.py).
# Starts the toolstack, creates /guest/guest.cfg with the guest console on ttyS1 (the host reads only the
# guest there), and turns a "stop" line from ttyS1 into `xl shutdown`, then `xl destroy` after the grace.
# Its own output goes to hvc0 (the host's log). When the guest is gone it reboots: QEMU runs -no-reboot.
# With xenrig.relay=TTY (arm64: QEMU virt has one UART, Xen's), TTY stands in for ttyS1: hvc1, QEMU's
# virtconsole, once the virtio_console module has found it.
# With xenrig.disks=N, QEMU attached N virtio disks with serials xbuild-disk0..N-1 (the guest's disks, as
# raw block devices): they appear as /dev/xbuild-diskI, the targets of the guest's phy disk lines.
# With xenrig.bridge=NAME (the hand-run check, builder.run.xen.BridgeProbe): dom0 is set up as Debian's Xen
# wiki documents (a bridge NAME with stp off and forward delay 0, holding dom0's address); busybox udhcpd on
# it stands in for the LAN's DHCP server. /artifact is an artifact directory: dom0 runs its own xen.cfg as a
# user would (cd /artifact && xl create -c xen.cfg; Xen's vif-bridge puts the vif on NAME), waits for the
# guest's lease, sends GET / to LEASED:xenrig.probe=PORT with busybox nc, says what it answered (to hvc0
# and, between the guest's lines, to ttyS1), then shuts the guest down. udhcpd runs in the foreground (its
# messages in hvc0's log) and writes its lease file every second itself (auto_time). Never signal it: it
# ARP-probes an address for 2 s before offering it, and busybox restarts that poll with the whole 2 s
# after each signal, so a SIGUSR1 every 0.6 s (this script's old lease polling) held back every offer
# (issue 14.3: the guest's ip=dhcp got no lease about once in three).
# The relay is opened once, as fd 4, before any background job: an open of the tty later, with children
# exiting (SIGCHLD), failed with EINTR ("can't create /dev/ttyS1: Interrupted system call").
/bin/busybox --install -s
export PATH="$(echo /usr/lib/xen-*/bin):/usr/sbin:/usr/bin:/sbin:/bin"
export LD_LIBRARY_PATH="$(echo /usr/lib/*-linux-gnu):$(echo /lib/*-linux-gnu)"
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/xen /run/xenstored /var/log/xen/console /var/lib/xen /var/lib/xenstored
say() { echo "xenrig: $* at $(cut -d' ' -f1 /proc/uptime)s"; }
. /etc/xenrig/stopguest.sh
end() { say "$*"; reboot -f; sleep 10; poweroff -f; }
grace=10; relay=ttyS1; ports=""; guest=""; disks=0; bridge=""; probe=80; name=xbuild; cfg=/guest/guest.cfg
warm=0
for a in $(cat /proc/cmdline); do case $a in
  xenrig.grace=*) grace=${a#*=};; xenrig.ports=*) ports=${a#*=};; xenrig.guest=*) guest=${a#*=};;
  xenrig.disks=*) disks=${a#*=};; xenrig.bridge=*) bridge=${a#*=};; xenrig.probe=*) probe=${a#*=};;
  xenrig.relay=*) relay=${a#*=};; xenrig.warm=*) warm=${a#*=};;
esac; done
say "dom0 init"
for m in /lib/modules/*.ko; do insmod "$m" || end "insmod $m failed"; done
n=0; until stty -F "/dev/$relay" raw -echo 2>/dev/null; do  # hvc1 comes once QEMU announced its port
  n=$((n+1)); [ $n -gt 100 ] && end "no $relay"; sleep 0.1
done
exec 4<>"/dev/$relay" || end "cannot open /dev/$relay"
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
if [ "$warm" = 1 ]; then
  for m in /lib/modules/blk/*.ko /lib/modules/warm/*.ko /lib/modules/net/*.ko; do insmod "$m" || end "insmod $m failed"; done
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 xbuild /share || end "no 9p share"
  ip link set lo up; ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || end "no eth0"
  say "toolstack ready (warm)"
  exec sh /share/warm.sh
fi
if [ -n "$ports" ]; then  # QEMU's user net reaches dom0 as 10.0.2.15; relay each port to the guest
  for m in /lib/modules/net/*.ko; do insmod "$m" || end "insmod $m failed"; done
  ip link set lo up; ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || end "no eth0"
  for p in $(echo "$ports" | tr , ' '); do nc -ll -p "$p" -e nc "$guest" "$p" & done
fi
if [ -n "$bridge" ]; then
  for m in /lib/modules/bridge/*.ko /lib/modules/net/xen-netback.ko; do insmod "$m" || end "insmod $m failed"; done
  ip link set lo up
  # bridge_stp off, bridge_fd 0 (busybox's brctl has no stp/setfd: the same sysfs files bridge-utils writes)
  brctl addbr "$bridge" && echo 0 >"/sys/class/net/$bridge/bridge/stp_state" \
    && echo 0 >"/sys/class/net/$bridge/bridge/forward_delay" || end "no bridge $bridge"
  ip addr add 10.0.4.1/24 dev "$bridge" && ip link set "$bridge" up || end "no address on $bridge"
  printf '%s\n' "interface $bridge" "start 10.0.4.100" "end 10.0.4.199" "lease_file /run/udhcpd.leases" \
    "auto_time 1" "option subnet 255.255.255.0" "option router 10.0.4.1" >/run/udhcpd.conf
  : >/run/udhcpd.leases
  udhcpd -f /run/udhcpd.conf 4>&- &
  dhcpd=$!
  cfg=xen.cfg; name=$(sed -n 's/^name = "\(.*\)"$/\1/p' /artifact/xen.cfg)
  [ -n "$name" ] || end "no name in /artifact/xen.cfg"
  say "bridge $bridge 10.0.4.1/24 up, udhcpd serving 10.0.4.100-199"
fi
say "toolstack ready"
stop() { touch /run/stop; stopguest "$name" "$grace"; }
tell() { say "$*"; say "$*" >&4; }
check() {  # the bridge mode's probe: the guest's DHCP lease, then its answer on port $probe
  n=0; addr=""
  while [ -z "$addr" ] && [ $n -lt 360 ]; do  # udhcpd writes its lease file every second (auto_time)
    sleep 1; n=$((n+1))
    addr=$(dumpleases -f /run/udhcpd.leases | awk 'NR > 1 { print $2; exit }')
  done
  if [ -z "$addr" ]; then
    kill -0 "$dhcpd" 2>/dev/null && up="udhcpd running" || up="udhcpd is gone"
    tell "no DHCP lease on $bridge ($up; on $bridge: $(ls /sys/class/net/$bridge/brif))"; stop; return
  fi
  tell "guest leased $addr on $bridge (mac $(dumpleases -f /run/udhcpd.leases | awk 'NR > 1 { print $1; exit }'))"
  # busybox nc, not wget: the static busybox's wget segfaults in this dom0
  get() { printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$addr" | nc -w 5 "$addr" "$probe" >/run/answer 2>/run/nc.err; }
  n=0; until get && [ -s /run/answer ] || [ $n -ge 90 ]; do sleep 1; n=$((n+1)); done
  if [ -s /run/answer ]; then
    tell "GET http://$addr:$probe/ answered: $(head -n 1 /run/answer | tr -d '\r') | $(sed '1,/^\r*$/d' /run/answer | head -c 200 | tr -s '\r\n' '  ')"
  else tell "GET http://$addr:$probe/: no answer ($(tr -s '\r\n' '  ' </run/nc.err); on $bridge: $(ls /sys/class/net/$bridge/brif))"; fi
  stop
}
(while read -r cmd; do [ "$cmd" = stop ] && stop; done <&4) &
[ -e /run/stop ] && end "stopped before the guest was created"
[ -n "$bridge" ] && check &
if [ -n "$bridge" ]; then cd /artifact || end "no /artifact"; fi
xl create -c "$cfg" </dev/null >&4
rc=$?
xl destroy "$name" 2>/dev/null
end "xl exited $rc"
