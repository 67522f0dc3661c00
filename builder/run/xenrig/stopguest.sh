# /etc/xenrig/stopguest.sh in the nested rig's dom0, sourced by dom0-init.sh (a cold rig's "stop" line) and
# by warm.sh (a warm job's jobs/ID/stop): what the host's stop asks of a guest, one way for both.
# stopguest NAME GRACE: wait up to 10 s for domain NAME while xl is still creating it, `xl shutdown` it (its
# kernel runs /sbin/poweroff, for the init to deliver the stop signal), then `xl destroy` it if it is still
# there GRACE seconds later. The caller defines say().
stopguest() {
  local n=0 limit
  until xl domid "$1" >/dev/null 2>&1 || [ $n -ge 20 ]; do sleep 0.5; n=$((n+1)); done  # being created
  xl shutdown "$1" && say "$1 asked to shut down"
  limit=$(($(cut -d. -f1 /proc/uptime) + $2))
  while xl domid "$1" >/dev/null 2>&1 && [ "$(cut -d. -f1 /proc/uptime)" -lt $limit ]; do sleep 0.5; done
  xl destroy "$1" 2>/dev/null && say "$1 destroyed after $2 s"
}
