"""Boot an artifact directory under QEMU, stream its console and return the entrypoint's exit status.

The artifact dir holds `kernel` (ELF vmlinux or bzImage; `vmlinux`/`bzImage` are accepted too),
`initrd.img` and `cmdline` (one line). QEMU runs `-M pc` with the serial console on a pipe we read,
`-no-reboot`, a QMP socket for graceful stops, and - when ports are forwarded or `network=True` - user
networking on a virtio-net-pci NIC, the guest configured by the kernel's `ip=` autoconfiguration.

An artifact is booted only as a validated `Artifact` (builder/artifact.py: `Qemu.for_artifact`, `run`):
kernel, initrd, command line, memory, vcpus and disks come from it, never from a path or a word the
artifact chose. A `--format disk` artifact's root disk (disk.img, raw or qcow2, rw or ro) is attached as a
virtio-blk disk, the guest's /dev/vda, the way `docker run` uses an image: read-only for an ro disk, under a
throwaway qcow2 overlay in $TMPDIR for an rw one, so a run never changes the artifact's disk.img (see Disk).
A bare boot directory (kernel, initrd.img, cmdline; the KVM probe, tests) can be booted with `Qemu(path)`:
nothing of it is validated and no disk is attached unless given.

KVM is used only when it really works: `accel="auto"` boots the artifact's kernel once with a tiny
initrd under KVM and a short timeout, and caches the verdict in cache_dir("probe") keyed by the QEMU
version and /dev/kvm's presence. Where KVM is broken (guests hang), the probe times out and TCG is used.

A graceful stop (timeout, KeyboardInterrupt, SIGTERM, `Qemu.stop()`) sends `system_powerdown` (ACPI
power button, seen by init when the kernel has ACPI_BUTTON + INPUT_EVDEV) and ctrl-alt-del (i8042;
init gets SIGINT) over QMP; init gives the program its StopSignal and a grace period. If QEMU is still
running `stop_grace` seconds later, its process group is killed. No QEMU outlives `run()`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from ..artifact import Artifact, disk_virtual_size
from ..cache import atomic_file, cache_dir
from ..disk import FORMATS as DISK_FORMATS
from ..errors import ArtifactError, RunError
from .console import ConsoleWatcher, RunResult

QEMU = "qemu-system-x86_64"
GUEST_IP = "10.0.2.15"
NET_CMDLINE = f"ip={GUEST_IP}::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3"
DEFAULT_STOP_GRACE = 20.0        # host side: longer than init's default 10 s grace
PROBE_TIMEOUT = 30.0
KERNEL_NAMES = ("kernel", "vmlinux", "bzImage")


def kernel_path(artifact: Path) -> Path:
    for name in KERNEL_NAMES:
        if (artifact / name).is_file():
            return artifact / name
    raise RunError(f"{artifact}: no kernel (expected one of {', '.join(KERNEL_NAMES)})")


@dataclass(frozen=True)
class Disk:
    """A disk image attached to the guest as virtio-blk (in order: /dev/vda, /dev/vdb, ...).

    Opened with `-blockdev` and an explicit driver, so QEMU never probes the format and never follows a
    backing file or an external data file (`backing: null`; `open_artifact` refuses a qcow2 naming one).
    Writable disks are never written: the guest writes to a throwaway qcow2 overlay of `size` bytes in
    the runner's temp directory, whose backing is the read-only image node (given by name, not by path)."""

    path: Path
    format: str = "raw"       # raw | qcow2
    readonly: bool = False    # False: writable, but the writes go to a throwaway overlay
    size: int = 0             # the guest-visible size (for the overlay); 0: the file's size

    def qemu_args(self, index: int, scratch: Path, serial: str | None = None) -> list[str]:
        """-blockdev nodes + -device virtio-blk-pci; `scratch` holds the overlay of a writable disk;
        `serial` names it in the guest's /sys/block/vdX/serial."""
        if self.format not in DISK_FORMATS:
            raise RunError(f"{self.path}: disk format {self.format!r} (raw or qcow2 expected)")
        image: dict[str, object] = {
            "node-name": f"disk{index}", "driver": self.format, "read-only": True,
            "file": {"driver": "file", "filename": str(self.path.resolve()), "read-only": True}}
        if self.format == "qcow2":
            image["backing"] = None
        nodes = [image]
        top = f"disk{index}"
        if not self.readonly:
            overlay = scratch / f"overlay{index}.qcow2"
            size = self.size or self.path.stat().st_size
            try:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), str(size)],
                               check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                raise RunError(f"cannot create the overlay for {self.path.name}: "
                               f"{getattr(e, 'stderr', '') or e}".strip()) from None
            # cache no-flush: no flushes to an overlay that is thrown away anyway
            nodes.append({"node-name": f"disk{index}rw", "driver": "qcow2", "backing": top,
                          "cache": {"no-flush": True}, "file": {"driver": "file", "filename": str(overlay)}})
            top = f"disk{index}rw"
        dev = f"virtio-blk-pci,drive={top}" + (f",serial={serial}" if serial else "")
        return [a for n in nodes for a in ("-blockdev", json.dumps(n))] + ["-device", dev]


def root_disks(art: Artifact) -> tuple[Disk, ...]:
    """The validated artifact's root disk as a Disk (none for an initramfs artifact)."""
    if art.disk is None or art.manifest.disk is None:
        return ()
    d = art.manifest.disk
    return (Disk(art.disk, d.format, d.mode == "ro", disk_virtual_size(art)),)


def _quote(word: str) -> str:
    if '"' in word or "\n" in word or "\0" in word:
        raise RunError(f"cannot pass {word!r} on the kernel command line (no quotes or newlines)")
    return f'"{word}"' if (not word or any(c.isspace() for c in word)) else word


def guest_cmdline(base: str, *, network: bool = False, kernel_args: Sequence[str] = (),
                  extra_args: Sequence[str] = ()) -> str:
    """The artifact's command line + console + ip= + kernel_args, then ` -- extra_args` (they replace Cmd)."""
    words = base.split()
    if "--" in words:
        i = words.index("--")
        head, tail = words[:i], words[i + 1:]
    else:
        head, tail = words, []
    if not any(w.startswith("console=") for w in head):
        head.append("console=ttyS0")
    if not any(w.startswith("rdinit=") for w in head):
        from ..guest import INIT_CMDLINE
        head.append(INIT_CMDLINE)
    if not any(w.startswith("panic=") for w in head):
        head.append("panic=-1")
    if "no_timer_check" not in head:
        # QEMU always delivers the timer IRQ; on a loaded host under TCG the IO-APIC timer check can
        # fail and panic the kernel ("IO-APIC + timer doesn't work!")
        head.append("no_timer_check")
    if network and not any(w.startswith("ip=") for w in head):
        head.append(NET_CMDLINE)
    head += [_quote(w) for w in kernel_args]
    if extra_args:
        tail = [_quote(w) for w in extra_args]
    return " ".join(head + (["--", *tail] if tail else []))


def qemu_version() -> str:
    exe = shutil.which(QEMU)
    if not exe:
        raise RunError(f"{QEMU} not found (Debian: apt-get install qemu-system-x86)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    return r.stdout.splitlines()[0] if r.stdout else "unknown"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU if the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Qemu:
    """One QEMU guest: start(), pump()/wait(), stop() (graceful), kill(). Use as a context manager."""

    def __init__(self, artifact: Path, *, ports: Sequence[tuple[int, int]] = (), memory_mb: int = 256,
                 kernel_args: Sequence[str] = (), extra_args: Sequence[str] = (),
                 console: BinaryIO | None = None, accel: str = "tcg", icount: bool = False,
                 network: bool = False, initrd: Path | None = None, cmdline: str | None = None,
                 disks: Sequence[Disk] = (), vcpus: int = 1, kernel: Path | None = None):
        """Boot the bare directory `artifact` (see the module docstring); for an artifact: for_artifact."""
        self.artifact = Path(artifact)
        self.kernel = kernel or kernel_path(self.artifact)
        self.initrd = initrd or self.artifact / "initrd.img"
        if not self.initrd.is_file():
            raise RunError(f"{self.artifact}: no initrd.img")
        if cmdline is None:
            try:
                cmdline = (self.artifact / "cmdline").read_text().strip()
            except OSError:
                cmdline = ""
        self.network = network or bool(ports)
        if accel == "tcg" and "noapictimer" not in cmdline.split():
            # TCG only: the LAPIC timer calibration costs ~100 ms and makes jiffies (and so the boot
            # clock the init's marker reads) run fast; Xen and KVM never calibrate it this way
            kernel_args = ("noapictimer", *kernel_args)
        self.cmdline = guest_cmdline(cmdline, network=self.network, kernel_args=kernel_args,
                                     extra_args=extra_args)
        self.ports, self.memory_mb, self.console = tuple(ports), memory_mb, console
        self.disks, self.vcpus = tuple(disks), vcpus
        self.accel, self.icount = accel, icount
        self.watcher = ConsoleWatcher()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = bytearray()
        self.stop_requested_at: float | None = None
        self._tmp = tempfile.mkdtemp(prefix="xbq.")
        self.qmp_path = os.path.join(self._tmp, "qmp.sock")
        self._sel: selectors.BaseSelector | None = None
        self._open = 0
        self.interrupted = False

    @classmethod
    def for_artifact(cls, art: Artifact, **kw: Any) -> Qemu:
        """A guest for a validated artifact: its kernel, initrd, command line, vcpus and root disk."""
        if not art.has_kernel:
            raise ArtifactError(f"{art.path}: no kernel in the artifact (it was built with --kernel none)")
        return cls(art.path, kernel=art.kernel, initrd=art.initrd, cmdline=art.cmdline, disks=root_disks(art),
                   vcpus=art.manifest.guest.vcpus, **kw)

    def command(self) -> list[str]:
        kvm = self.accel == "kvm"
        cmd = [QEMU, "-M", "pc", "-accel", "kvm" if kvm else "tcg", "-cpu", "host" if kvm else "max",
               "-m", str(self.memory_mb), "-smp", str(self.vcpus), "-nodefaults", "-no-user-config",
               "-display", "none",
               "-no-reboot", "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline]
        for i, disk in enumerate(self.disks):
            cmd += disk.qemu_args(i, Path(self._tmp))
        if self.icount:
            cmd += ["-icount", "shift=0,sleep=off"]
        if self.network:
            fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in self.ports)
            cmd += ["-netdev", f"user,id=n0{fwd}", "-device", "virtio-net-pci,netdev=n0"]
        return cmd

    def start(self) -> Qemu:
        if not shutil.which(QEMU):
            raise RunError(f"{QEMU} not found (Debian: apt-get install qemu-system-x86)")
        self.watcher = ConsoleWatcher()
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        except OSError as e:
            raise RunError(f"cannot start {QEMU}: {e}") from None
        atexit.register(self.kill)
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout and self.proc.stderr
        for f in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)
            self._sel.register(f, selectors.EVENT_READ)
        self._open = 2
        return self

    def __enter__(self) -> Qemu:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pump(self, timeout: float = 0.2) -> bool:
        """Read what the guest printed (up to `timeout` s); False once QEMU exited and output is drained."""
        assert self.proc is not None and self._sel is not None
        if self._open == 0:
            if self.proc.poll() is None:
                time.sleep(timeout)
                return True
            return False
        for key, _ in self._sel.select(timeout):
            f = key.fileobj
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                self._sel.unregister(f)
                self._open -= 1
                continue
            if f is self.proc.stdout:
                self.watcher.feed(data)
                if self.console is not None:
                    try:
                        self.console.write(data)
                        self.console.flush()
                    except (OSError, ValueError):
                        pass
            else:
                self.stderr += data
        return self._open > 0 or self.proc.poll() is None

    def stop(self) -> None:
        """Ask the guest to shut down: ACPI power button + ctrl-alt-del, over QMP."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
        self.qmp([("system_powerdown", None), ("send-key", {"keys": keys})])

    def qmp(self, commands: list[tuple[str, dict | None]], timeout: float = 3.0) -> list[dict]:
        """Run QMP commands; returns their replies ([] if the monitor is not reachable)."""
        replies: list[dict] = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.qmp_path)
                f = s.makefile("rwb")
                f.readline()  # greeting
                for name, args in [("qmp_capabilities", None), *commands]:
                    msg: dict = {"execute": name}
                    if args:
                        msg["arguments"] = args
                    f.write(json.dumps(msg).encode() + b"\r\n")
                    f.flush()
                    while True:
                        line = f.readline()
                        if not line:
                            return replies
                        reply = json.loads(line)
                        if "return" in reply or "error" in reply:
                            replies.append(reply)
                            break
        except (OSError, ValueError):
            pass
        return replies

    def kill(self) -> None:
        """Kill QEMU's process group (no-op when it is gone) and clean up."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
            self._open = 0
        atexit.unregister(self.kill)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def wait(self, timeout: float | None = None, stop_grace: float = DEFAULT_STOP_GRACE,
             stop_event: threading.Event | None = None) -> RunResult:
        """Stream until QEMU exits. A stop (after `timeout` s, when `stop_event` is set, or on the first
        KeyboardInterrupt) is graceful; QEMU is killed `stop_grace` s after it, or on a second interrupt.
        `self.interrupted` tells whether a KeyboardInterrupt happened (the caller re-raises it)."""
        assert self.proc is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        while True:
            try:
                if not self.pump(0.2):
                    break
                now = time.monotonic()
                if self.stop_requested_at is None:
                    if stop_event is not None and stop_event.is_set():
                        self.stop()
                    elif deadline is not None and now > deadline:
                        timed_out = True
                        self.stop()
                    elif self.watcher.finished and self.running:
                        # init powers off right after its status line: give QEMU 10 s to exit by itself
                        self.stop_requested_at = now - stop_grace + 10.0
                elif now - self.stop_requested_at > stop_grace:
                    break
            except KeyboardInterrupt:
                if self.interrupted or self.stop_requested_at is not None:
                    self.interrupted = True
                    break
                self.interrupted = True
                self.stop()
        self.kill()
        result = self.watcher.result()
        rc = self.proc.returncode
        if result.exit_status is None and not result.console and rc not in (0, None, -signal.SIGKILL):
            raise RunError(f"{QEMU} failed (status {rc}): "
                           f"{bytes(self.stderr).decode(errors='replace').strip()[-500:]}")
        if timed_out and result.error is None:
            result = replace(result, error=f"timed out after {timeout:g}s")
        return result


# ------------------------------------------------------------------------------------------- KVM probe

def _probe_key() -> str:
    kvm = os.path.exists("/dev/kvm")
    return hashlib.sha256(f"{qemu_version()}\nkvm={kvm}".encode()).hexdigest()[:16]


def kvm_works(kernel: Path) -> bool:
    """Whether KVM boots a guest here (cached per QEMU version + /dev/kvm presence)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    cached = cache_dir("probe") / f"kvm-{_probe_key()}.json"
    try:
        return bool(json.loads(cached.read_text())["kvm"])
    except (OSError, ValueError, KeyError):
        pass
    ok = _probe_kvm(kernel)
    with atomic_file(cached, "w") as f:
        json.dump({"kvm": ok, "qemu": qemu_version(), "probed": time.time()}, f)
    return ok


def _probe_kvm(kernel: Path) -> bool:
    """Boot `kernel` with an initrd whose init only reports a missing program and powers off."""
    from ..cpio import pack
    from ..guest import GuestConfig, install
    from ..init import init_binary
    from ..tree import Tree

    with tempfile.TemporaryDirectory(prefix="xbuild-probe.") as tmp:
        d = Path(tmp)
        os.symlink(kernel.resolve(), d / "kernel")
        tree = Tree()
        gc = GuestConfig(argv=("/probe",), env=(), cwd="/", uid=0, gid=0, groups=(0,), stop_signal=15,
                         hostname="probe")
        install(tree, gc, init_binary())
        pack(tree, d / "initrd.img", "none")
        (d / "cmdline").write_text("console=ttyS0 quiet panic=-1\n")
        guest = Qemu(d, accel="kvm", memory_mb=128, disks=())
        try:
            guest.start()
            result = guest.wait(timeout=PROBE_TIMEOUT, stop_grace=1.0)
        except RunError:
            return False
        finally:
            guest.kill()
        return result.exit_status is not None


def choose_accel(accel: str, kernel: Path, icount: bool) -> str:
    if accel not in ("auto", "kvm", "tcg"):
        raise RunError(f"unknown accelerator {accel!r} (auto, kvm or tcg)")
    if icount:
        if accel == "kvm":
            raise RunError("-icount needs TCG: use accel='tcg' or 'auto'")
        return "tcg"
    if accel == "auto":
        return "kvm" if kvm_works(kernel) else "tcg"
    return accel


# ----------------------------------------------------------------------------------------------- run

def run(artifact: Artifact | Path, *, ports: Sequence[tuple[int, int]] = (), memory_mb: int = 256,
        timeout: float | None = None, extra_args: Sequence[str] = (),
        console: BinaryIO | None = sys.stdout.buffer, accel: str = "auto", icount: bool = False,
        kernel_args: Sequence[str] = (), network: bool = False,
        stop_grace: float = DEFAULT_STOP_GRACE) -> RunResult:
    """Boot `artifact` and return the entrypoint's result (exit_status None: no status line seen).

    An Artifact is booted as validated (Qemu.for_artifact); a Path is a bare boot directory (Qemu).

    `extra_args` go after `--` on the kernel command line (they replace the image's Cmd);
    `kernel_args` before it (e.g. `xbuild.env=K=V`, `xbuild.grace=2`, `xbuild.debug`).
    Timeout, KeyboardInterrupt and SIGTERM stop the guest gracefully; KeyboardInterrupt is re-raised.
    """
    kernel = artifact.kernel if isinstance(artifact, Artifact) else kernel_path(Path(artifact))
    kw: dict[str, Any] = dict(ports=ports, memory_mb=memory_mb, kernel_args=kernel_args,
                              extra_args=extra_args, console=console, icount=icount, network=network,
                              accel=choose_accel(accel, kernel, icount))
    guest = Qemu.for_artifact(artifact, **kw) if isinstance(artifact, Artifact) else \
        Qemu(Path(artifact), **kw)
    term = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, lambda *_: term.set()) if main else None
    try:
        guest.start()
        result = guest.wait(timeout, stop_grace, stop_event=term)
    finally:
        guest.kill()
        if main:
            signal.signal(signal.SIGTERM, old_handler if old_handler is not None else signal.SIG_DFL)
    if guest.interrupted:
        raise KeyboardInterrupt
    return result
