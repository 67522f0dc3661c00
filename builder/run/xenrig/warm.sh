#!/bin/sh
# The warm rig's job loop in dom0 (builder/run/warm.py copies it into the share; dom0-init.sh execs it).
# /share is the host's share directory (virtio-9p). The host talks to dom0 only through files there:
#   heartbeat        written here every 5 s: dom0's uptime, then the names of the running guests
#   halt             the host asks dom0 to destroy every guest and power off (`xbuild rig stop`)
#   jobs/ID/         one guest, renamed into place by its client once complete: kernel, initrd.img,
#                    guest.cfg, name (the domain's), grace (s), ports ("DOM0PORT GUESTIP GUESTPORT" lines),
#                    lease (a counter the client's tail process bumps every second), console (a symlink to
#                    ../../consoles/guest-NAME.log, the guest's console as xenconsoled logs it)
#                    dom0 adds: noticed (when it took the job), creating (just before `xl create`): empty
#                    files whose host mtimes time the job's phases (bench/warm_rig.py)
# dom0 looks for new job dirs every 0.2 s; for each it relays each port (busybox nc; QEMU forwards the host's
# port to dom0's), copies kernel and initrd.img to /run/guests/ID (guest.cfg names them there: xl's loader
# read them through its mmaps of the 9p files, most of a 20 s `xl create` at load 10; dd's 512 kB reads take
# under 1 s), runs `xl create -F guest.cfg` (xl's errors to jobs/ID/xl.err), and writes jobs/ID/done (xl's
# status) when the guest is gone. While it runs: jobs/ID/stop → `xl shutdown`,
# `xl destroy` after the grace (as a cold rig does); jobs/ID/destroy, the job dir removed, or the lease
# unchanged for LEASE_POLLS polls of 0.25 s (10 s: the client is gone) → `xl destroy` at once, repeated
# until xl returns; the job dir of a client that is gone is removed by dom0 once the guest is.
S=/share
LEASE_POLLS=40
# dom0 has one vcpu under TCG: its loops use shell builtins where they can (each fork costs); they wait with
# nap, a read with a timeout on a FIFO nobody writes (a builtin: no `sleep` process per poll)
mkfifo /run/nap
nap() { read -r -t "$1" _ <>/run/nap; }
say() { read -r up _ </proc/uptime; echo "xenrig: $* at ${up}s"; }
. /etc/xenrig/stopguest.sh  # stopguest NAME GRACE: what a cold rig's "stop" does
guests() { for id in $(xenstore list /local/domain); do [ "$id" = 0 ] || xenstore read "/local/domain/$id/name"; done; }
beat() {
  while :; do
    read -r up _ </proc/uptime
    echo "$up" $(guests) >$S/heartbeat
    nap 5
  done
}
watch() {  # $1 job dir, $2 name, $3 grace, $4 the mark of a gone client
  last=""; still=0; stopping=""
  while :; do
    nap 0.25
    l=""; read -r l 2>/dev/null <"$1/lease"
    if [ "$l" = "$last" ]; then still=$((still+1)); else still=0; last=$l; fi
    if [ $still -ge $LEASE_POLLS ] && [ ! -e "$4" ]; then : >"$4"; say "$2: its client is gone"; fi
    if [ ! -d "$1" ] || [ -e "$1/destroy" ] || [ -e "$4" ]; then
      xl destroy "$2" 2>/dev/null && say "$2 destroyed (client done or gone)"
    elif [ -e "$1/stop" ] && [ -z "$stopping" ]; then
      stopping=1; stopguest "$2" "$3" &
    fi
  done
}
job() {
  d=$S/jobs/$1; : >"$d/noticed"; read -r name <"$d/name"; read -r grace <"$d/grace"; relays=""
  say "job $1: $name"
  while read -r h ip g; do
    [ -n "$g" ] && { nc -ll -p "$h" -e nc "$ip" "$g" & relays="$relays $!"; }
  done <"$d/ports"
  watch "$d" "$name" "$grace" "/run/jobs/$1.gone" &
  w=$!
  boot=/run/guests/$1
  mkdir -p "$boot" && dd if="$d/kernel" of="$boot/kernel" bs=512k 2>/dev/null \
    && dd if="$d/initrd.img" of="$boot/initrd.img" bs=512k 2>/dev/null || say "job $1: copying its files failed"
  : >"$d/creating"
  xl create -F "$d/guest.cfg" </dev/null >/dev/null 2>"$d/xl.err"
  rc=$?
  rm -rf "$boot"
  xl destroy "$name" 2>/dev/null
  kill $w $relays 2>/dev/null
  echo "$rc" >"$d/.done" && mv "$d/.done" "$d/done"
  say "job $1: xl exited $rc"
  [ -e "/run/jobs/$1.gone" ] && rm -rf "$d" "$S/consoles/guest-$name.log"  # its client is gone: nobody else will
}
mkdir -p /run/jobs $S/jobs $S/consoles
# guest consoles go to files written by xenconsoled itself (not `xl create -c`, whose xenconsole client can
# miss a guest's pty when two guests are created at once under TCG: a run then saw no console at all)
killall xenconsoled; sleep 1; xenconsoled --log=guest --log-dir=$S/consoles || { say "xenconsoled failed"; reboot -f; }
beat &
say "warm rig ready"
while :; do
  if [ -e $S/halt ]; then
    for id in $(xenstore list /local/domain); do [ "$id" = 0 ] || xl destroy "$id"; done
    say "halt"; reboot -f; sleep 10; poweroff -f
  fi
  for d in $S/jobs/*; do
    id=${d##*/}
    if [ -d "$d" ] && [ ! -e "/run/jobs/$id" ]; then : >"/run/jobs/$id"; job "$id" & fi
  done
  nap 0.2
done
