"""The warm nested-Xen rig: one outer QEMU (Xen + the dom0 of builder/run/rig.py) kept running in the
background, so `xbuild run --hypervisor xen-nested` and `--verify-on xen-nested` skip the rig's boot.

One rig per user, its state in `state_dir()` (mode 0700, owned by the user): $XBUILD_RIG, else
$XDG_RUNTIME_DIR/xbuild-rig, else the cache's `rig-run`:
  state.json   the daemonized QEMU (pid and its /proc start time: a reused pid is never taken for it),
               its memory and when it came up; written once dom0 is ready
  qmp.sock     QEMU's QMP monitor: `hostfwd_add`/`hostfwd_remove` of the runs' forwarded ports
  console.log  Xen's and dom0's output (COM1)
  lock         flock: start and stop are one at a time
  share/       the virtio-9p share, dom0's /share: xenrig/warm.sh (the job loop dom0 runs; its header is the
               protocol), dom0's heartbeat, `halt`, and one jobs/ID directory per guest
  ips/K        the reservation of guest address 10.0.3.K (its client's pid and start time)

A run (`run_job`) reserves an address, writes its job directory (kernel, initrd, the generated xl config,
ports) under a temp name and renames it into place; dom0 creates the guest. The client streams the
guest console with xenrig's tail (warm_tail.py) under a builder.proc.Supervisor: the same stop semantics,
exit statuses, console and phases as a cold run. Each forwarded port is a QMP hostfwd from the host port
to dom0's same port, which dom0 relays to the guest's. On the way out the client asks dom0 to destroy
the guest, waits for it to be gone, removes its forwards, job directory and reservation; a client killed
outright stops bumping its lease and dom0 destroys its guest 10 s (warm.sh's LEASE_POLLS) later.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from ..cache import RUNTIME, atomic_file, cache_root
from ..errors import BadInput, RunError
from ..options import Say
from ..proc import Supervisor, run_tool
from .console import RunResult
from .qemu import qmp
from .ready import RELAYED_HOLD_S
from .rig import ensure_rig
from .warm_tail import RIG_GONE, proc_starttime
from .xen import DOM0_CMDLINE, dom0_says, rig_qemu_argv

WARM_SH = Path(__file__).with_name("xenrig") / "warm.sh"
TAIL = Path(__file__).with_name("warm_tail.py")
DEFAULT_MEMORY_MB = 2048
DOM0_VCPUS = 1  # dom0's vCPUs in the warm rig (bench/warm_rig.py --dom0-vcpus measures others)
MEMORY_RANGE_MB = (1024, 65536)
READY_S = 600.0  # `rig start`: Xen and dom0 up (under TCG on a loaded machine)
HEARTBEAT_S = (
    180.0  # dom0 writes its heartbeat every 5 s; silent this long: wedged (TCG at load 13: 31 s seen)
)
HALT_S = 30.0  # `rig stop`: dom0 destroys its guests and powers off, else QEMU is killed
DONE_WAIT_S = 20.0  # a run's end: the guest destroyed and its `xl create` returned
GUEST_NET = "10.0.3."  # guests' addresses: 10.0.3.2-254, dom0 10.0.3.1 on every vif (vif-xbuild.sh)


def state_dir(create: bool = True) -> Path:
    """The rig's state directory (module docstring), created 0700 unless `create` is False (status, stop
    and every xen-nested run only look: a cold run leaves nothing); RunError when another user owns it."""
    if env := os.environ.get("XBUILD_RIG"):
        d = Path(env)
    elif run := os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(run) / "xbuild-rig"
    else:
        d = cache_root() / RUNTIME
    if create:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = d.stat()
    except FileNotFoundError:
        return d
    if st.st_uid != os.geteuid():
        raise RunError(f"{d}: the warm rig's state directory belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        d.chmod(0o700)
    return d


@dataclass(frozen=True)
class WarmRig:
    """A started warm rig: its state directory and its QEMU (pid + /proc start time)."""

    dir: Path
    pid: int
    starttime: str
    memory_mb: int
    up_at: float  # time.time() when dom0 was ready

    @property
    def share(self) -> Path:
        return self.dir / "share"

    @property
    def qmp_path(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def alive(self) -> bool:
        return proc_starttime(self.pid) == self.starttime


@dataclass(frozen=True)
class Status:
    """What `xbuild rig status` says: state is running, not running, crashed (QEMU gone) or wedged (QEMU
    there, dom0 silent for HEARTBEAT_S); `guests` the running domains' names (running only)."""

    state: str
    detail: str
    rig: WarmRig | None
    guests: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        r = self.rig
        return {
            "state": self.state,
            "detail": self.detail,
            "pid": r.pid if r else None,
            "memory_mb": r.memory_mb if r else None,
            "dir": str(r.dir if r else state_dir(create=False)),
            "guests": list(self.guests),
        }


def _read_state(d: Path) -> WarmRig | None:
    try:
        s = json.loads((d / "state.json").read_text())
        return WarmRig(d, int(s["pid"]), str(s["starttime"]), int(s["memory_mb"]), float(s["up_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def status() -> Status:
    """The rig's state (see Status); reads only: a crashed or wedged rig is cleaned by `start`/`stop`."""
    d = state_dir(create=False)
    rig = _read_state(d)
    if rig is None:
        return Status("not running", f"no warm rig ({d} holds none)", None)
    if not rig.alive:
        return Status("crashed", f"its QEMU (pid {rig.pid}) is gone", rig)
    try:
        beat = rig.share / "heartbeat"
        age, words = time.time() - beat.stat().st_mtime, beat.read_text().split()
    except OSError:
        age, words = float("inf"), []
    if age > HEARTBEAT_S:
        return Status("wedged", f"QEMU pid {rig.pid} runs but dom0 has not answered for {age:.0f} s", rig)
    guests = tuple(words[1:])
    up = time.time() - rig.up_at
    return Status(
        "running", f"pid {rig.pid}, {rig.memory_mb} MB, up {up:.0f} s, {len(guests)} guest(s)", rig, guests
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def start(
    memory_mb: int = DEFAULT_MEMORY_MB, progress: Say | None = None, dom0_vcpus: int = DOM0_VCPUS
) -> WarmRig:
    """Start the warm rig (a daemonized QEMU) with `memory_mb` for Xen, dom0 and the guests and `dom0_vcpus`
    for dom0, and wait for dom0's job loop; a running rig is returned as it is, a crashed or wedged one
    killed and replaced."""
    say = progress or (lambda _m: None)
    d = state_dir()
    with _locked(d / "lock"):
        st = status()
        if st.state == "running" and st.rig is not None:
            say(f"the warm rig is already running ({st.detail})")
            return st.rig
        if st.rig is not None:
            say(f"the warm rig is {st.state} ({st.detail}): starting a new one")
            _kill(st.rig)
        _clean(d)
        rig = ensure_rig(progress)
        share = d / "share"
        (share / "jobs").mkdir(parents=True)
        shutil.copyfile(WARM_SH, share / "warm.sh")
        (d / "ips").mkdir(exist_ok=True)
        pidfile = d / "qemu.pid"
        devices = [
            *("-chardev", "null,id=guest", "-serial", "chardev:guest"),  # dom0's ttyS1: unused when warm
            *("-netdev", "user,id=net0", "-device", "e1000,netdev=net0"),
            *("-fsdev", f"local,id=share,path={share},security_model=none"),
            *("-device", "virtio-9p-pci,fsdev=share,mount_tag=xbuild"),
            *("-qmp", f"unix:{d / 'qmp.sock'},server=on,wait=off"),
            *("-daemonize", "-pidfile", str(pidfile)),
        ]
        log = d / "console.log"
        log.write_bytes(b"")
        argv = rig_qemu_argv(
            rig,
            memory_mb=memory_mb,
            log=log,
            initrd=rig.dom0_initrd,
            dom0=f"{DOM0_CMDLINE} xenrig.warm=1",
            devices=devices,
            dom0_vcpus=dom0_vcpus,
        )
        began = time.monotonic()
        run_tool(argv, RunError, timeout=60)  # returns once QEMU has daemonized
        pid = int(pidfile.read_text())
        starttime = proc_starttime(pid)
        if starttime is None:
            raise RunError(f"the warm rig's QEMU exited at once{dom0_says(log)}; log: {log}")
        warm = WarmRig(d, pid, starttime, memory_mb, 0.0)
        say(f"starting the warm rig (QEMU pid {pid}, {memory_mb} MB); Xen and dom0 boot")
        while not (share / "heartbeat").exists():
            if not warm.alive or time.monotonic() - began > READY_S:
                _kill(warm)
                raise RunError(f"the warm rig did not come up{dom0_says(log)}; log: {log}")
            time.sleep(0.2)
        warm = WarmRig(d, pid, starttime, memory_mb, time.time())
        state = {"pid": pid, "starttime": starttime, "memory_mb": memory_mb, "up_at": warm.up_at}
        with atomic_file(d / "state.json", "w") as f:
            json.dump(state, f)
        say(f"the warm rig is up in {time.monotonic() - began:.1f} s")
        return warm


def stop(progress: Say | None = None) -> Status:
    """Stop the rig: dom0 destroys every guest and powers off (QEMU is killed after HALT_S otherwise);
    the state is removed. Returns the status it had."""
    say = progress or (lambda _m: None)
    d = state_dir(create=False)
    if not d.is_dir():
        return status()
    with _locked(d / "lock"):
        st = status()
        if st.rig is not None:
            _kill(st.rig)
            say(f"the warm rig is stopped (it was {st.state}: {st.detail})")
        _clean(d)
        return st


def _kill(rig: WarmRig) -> None:
    """Halt the rig's dom0 (its guests destroyed), then kill its QEMU if it is still there."""
    with contextlib.suppress(OSError):
        (rig.share / "halt").touch()
    end = time.monotonic() + HALT_S
    while rig.alive and time.monotonic() < end:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not rig.alive:
            return
        os.kill(rig.pid, sig)
        time.sleep(2)


def _clean(d: Path) -> None:
    for name in ("state.json", "qemu.pid", "qmp.sock"):
        (d / name).unlink(missing_ok=True)
    for name in ("share", "ips"):
        shutil.rmtree(d / name, ignore_errors=True)


def running(progress: Say | None = None) -> WarmRig | None:
    """The warm rig when one was started: as it is when running; a crashed or wedged one is restarted
    (with one progress line) at its memory size. None when none was started."""
    st = status()
    if st.rig is None:
        return None
    if st.state == "running":
        return st.rig
    say = progress or (lambda _m: None)
    say(f"the warm rig is {st.state} ({st.detail}): restarting it")
    return start(st.rig.memory_mb, progress)


# ---- one guest in the warm rig ----------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A reserved slot: guest address 10.0.3.`slot`, its job directory's final name, its domain name."""

    rig: WarmRig
    slot: int
    id: str
    name: str

    @property
    def ip(self) -> str:
        return f"{GUEST_NET}{self.slot}"

    @property
    def dir(self) -> Path:
        return self.rig.share / "jobs" / self.id

    @property
    def dom0_boot(self) -> str:
        """Where dom0 copies the job's kernel and initrd.img before `xl create` (warm.sh): its tmpfs."""
        return f"/run/guests/{self.id}"


def reserve(rig: WarmRig, name: str) -> Job:
    """Reserve a free guest address (one whose reservation is absent or its client gone) and name a job."""
    me = f"{os.getpid()} {proc_starttime(os.getpid())}"
    for slot in range(2, 255):
        path = rig.dir / "ips" / str(slot)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            owner = path.read_text().split()
            if len(owner) == 2 and proc_starttime(int(owner[0])) == owner[1]:
                continue
            path.unlink(missing_ok=True)  # its client is gone: take it over (and its leftovers) once
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            for old in (rig.share / "jobs").glob(f"{slot}-*"):
                shutil.rmtree(old, ignore_errors=True)
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return Job(rig, slot, f"{slot}-{os.getpid()}-{int(time.time() * 1000)}", name)
    raise RunError("the warm rig has 253 guests already")


def run_job(
    job: Job,
    *,
    kernel: Path,
    initrd: Path,
    config: str,
    grace: float,
    settle: float,
    ports: Sequence[tuple[int, int]],
    timeout: float | None,
    console: BinaryIO | None,
    stop_event: threading.Event | None,
) -> RunResult:
    """Run one guest in the warm rig (module docstring): `config` is its xl config naming the job's files
    in dom0 (Job.dom0_boot); `ports` (host, guest) are forwarded host → dom0 → guest. RunError when the
    host port is taken, xl could not create the guest, or the rig stopped under it."""
    rig, d = job.rig, job.dir
    tmp = d.with_name(f".tmp-{job.id}")
    forwarded: list[int] = []
    try:
        tmp.mkdir(mode=0o700)
        shutil.copyfile(kernel, tmp / "kernel")
        shutil.copyfile(initrd, tmp / "initrd.img")
        (tmp / "guest.cfg").write_text(config)
        (tmp / "name").write_text(job.name)
        (tmp / "grace").write_text(str(int(grace)))
        (tmp / "ports").write_text("".join(f"{h} {job.ip} {g}\n" for h, g in ports))
        (tmp / "lease").write_text("0")
        (tmp / "console").symlink_to(f"../../consoles/guest-{job.name}.log")  # xenconsoled's log of it
        for h, _g in ports:
            _hostfwd(rig, "add", h)
            forwarded.append(h)
        tmp.rename(d)
        sup = Supervisor(
            console=console or sys.stdout.buffer,
            stop=lambda _s: (d / "stop").touch(),
            grace=grace + settle,
            settle=settle,
            ready_ports=[h for h, _g in ports],
            ready_hold=RELAYED_HOLD_S,
        )
        try:
            sup.start([sys.executable, str(TAIL), str(d), str(rig.pid), rig.starttime, str(HEARTBEAT_S)])
        except OSError as e:
            raise RunError(f"cannot start the warm rig's console tail: {e}") from None
        result = sup.wait(timeout, stop_event)
        gone = sup.proc is not None and sup.proc.returncode == RIG_GONE
        if result.exit_status is None and gone:
            said = sup.stderr.decode(errors="replace").strip()
            raise RunError(f"the warm rig stopped under the guest: {said} (`xbuild rig status`)")
        if result.exit_status is None and not result.console and (d / "done").exists():
            said = dom0_says(d / "xl.err")
            raise RunError(
                f"the guest could not be created or printed nothing (xl exited {_text(d / 'done')}){said}"
            )
        if result.exit_status is None:
            log = rig.dir / "console.log"
            result = replace(result, error=f"{result.error or 'no exit status'} (Xen and dom0 log: {log})")
        return result
    finally:
        _end(job, tmp, forwarded)


def _end(job: Job, tmp: Path, forwarded: list[int]) -> None:
    """The guest destroyed and gone (or DONE_WAIT_S passed, or the rig is gone), then the run's traces."""
    d = job.dir
    if d.is_dir():
        with contextlib.suppress(OSError):
            (d / "destroy").touch()
        end = time.monotonic() + DONE_WAIT_S
        while not (d / "done").exists() and job.rig.alive and time.monotonic() < end:
            time.sleep(0.1)
    for h in forwarded:
        _hostfwd(job.rig, "remove", h, check=False)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)
    (job.rig.share / "consoles" / f"guest-{job.name}.log").unlink(missing_ok=True)
    (job.rig.dir / "ips" / str(job.slot)).unlink(missing_ok=True)


def _hostfwd(rig: WarmRig, op: str, port: int, check: bool = True) -> None:
    """QMP `hostfwd_add|remove` of 127.0.0.1:port → dom0's port (BadInput when the port is taken)."""
    rule = f"tcp:127.0.0.1:{port}" + (f"-:{port}" if op == "add" else "")
    cmd = {"command-line": f"hostfwd_{op} net0 {rule}"}
    with _locked(rig.dir / "qmp.lock"):
        replies = qmp(str(rig.qmp_path), [("human-monitor-command", cmd)], timeout=30)
    said = str(replies[-1].get("return", replies[-1].get("error", ""))) if replies else "no answer"
    if check and said.strip():
        if not replies:
            raise RunError(f"the warm rig's QMP monitor ({rig.qmp_path}): {said}")
        raise BadInput(f"-p {port}: the warm rig cannot forward host port {port}: {said.strip()}")


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""
