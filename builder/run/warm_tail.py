"""The client side of one warm-rig job's console (builder/run/warm.py runs this file under a Supervisor).

    python warm_tail.py JOBDIR QEMU_PID QEMU_STARTTIME HEARTBEAT_S

Copies JOBDIR/console (the guest's console as dom0's xenconsoled logs it) to stdout as it grows and bumps
JOBDIR/lease every second (dom0 destroys the guest when the lease stops changing: this process dies with its
client, by PR_SET_PDEATHSIG, so a killed client's guest is destroyed too). Exits 0 once JOBDIR/done exists
and the console is drained; exits 3 with one line on stderr when the rig's QEMU is gone (its pid no longer
has its /proc start time) or dom0's heartbeat is older than HEARTBEAT_S seconds. Standard library only: it
starts with every warm run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

RIG_GONE = 3


def proc_starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); None when the process is gone or
    a zombie. With the pid, it names one process: a reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def main(argv: list[str]) -> int:
    job, pid, start, heartbeat_s = Path(argv[1]), int(argv[2]), argv[3], float(argv[4])
    out, offset, beat, lease = sys.stdout.buffer, 0, 0.0, 0
    heartbeat = job.parent.parent / "heartbeat"
    while True:
        done = (job / "done").exists()
        try:
            with open(job / "console", "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            offset += len(data)
            out.write(data)
            out.flush()
        if done:
            return 0
        now = time.monotonic()
        if now - beat >= 1.0:
            beat, lease = now, lease + 1
            with contextlib.suppress(OSError):  # the job dir is gone (`xbuild rig stop`): see below
                (job / "lease").write_text(str(lease))
            if proc_starttime(pid) != start:
                print(f"the warm rig's QEMU (pid {pid}) is gone", file=sys.stderr)
                return RIG_GONE
            try:
                age = time.time() - os.stat(heartbeat).st_mtime
            except OSError:
                age = float("inf")
            if age > heartbeat_s:
                print(f"the warm rig's dom0 has not answered for {age:.0f} s", file=sys.stderr)
                return RIG_GONE
        time.sleep(0.05 if data else 0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
