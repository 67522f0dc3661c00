"""Boot an artifact directory under QEMU, stream its console and return the entrypoint's exit status.

The artifact dir holds `kernel` (ELF vmlinux or bzImage; `vmlinux`/`bzImage` are accepted too; an arm64
Image for a linux/arm64 artifact), `initrd.img` and `cmdline` (one line). The guest's platform (the
manifest's source.platform) picks a Machine, the only place the architectures differ: linux/amd64 runs
under `qemu-system-x86_64 -M pc` (console ttyS0), linux/arm64 under `qemu-system-aarch64 -M virt -cpu
max,pauth-impdef=on` (TCG only on this amd64 host; PL011 console ttyAMA0); a platform with no Machine is
refused (exit 2). Either way QEMU gets the serial console on a pipe we read, `-no-reboot`, a QMP socket for
graceful stops, and - when ports are forwarded or `network=True` - user networking on a virtio-net-pci NIC,
the guest configured by the kernel's `ip=` autoconfiguration (and unpacking its initramfs before the NIC
probes: builder/run/cmdline.py, SYNC_UNPACK).

An artifact is booted only as a validated `Artifact` (builder/artifact.py: `Qemu.for_artifact`, `run`):
kernel, initrd, command line, memory, vcpus and disks come from it, never from a path or a word the
artifact chose. A `--format disk` artifact's root disk (disk.img, raw or qcow2, rw or ro) is attached as a
virtio-blk disk, the guest's /dev/vda, the way `docker run` uses an image: read-only for an ro disk, under a
throwaway qcow2 overlay in $TMPDIR for an rw one, so a run never changes the artifact's disk.img (see Disk).
A bare boot directory (kernel, initrd.img, cmdline; the KVM probe, tests) can be booted with `Qemu(path)`:
nothing of it is validated and no disk is attached unless given.

KVM is used only when it really works (`kvm_works`, the one KVM probe, also deciding for the disk writer's
libguestfs appliance): `accel="auto"` boots a kernel once with a tiny initrd under KVM and a short timeout,
and caches the verdict in cache_dir("probe") keyed by the QEMU version, the host kernel's release and
/dev/kvm. Where KVM is broken (guests hang), the probe times out and TCG is used.

QEMU runs under a builder.proc.Supervisor (own session, killed with its runner, console into the marker
watcher). A graceful stop (timeout, SIGINT, SIGTERM, `Qemu.stop()`) sends `system_powerdown` (ACPI power
button, seen by init when the kernel has ACPI_BUTTON + INPUT_EVDEV) and ctrl-alt-del (i8042; init gets
SIGINT) over QMP; init gives the program its StopSignal and a grace period. If QEMU is still running
`stop_grace` seconds later, its process group is killed. No QEMU outlives `run()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..artifact import Artifact, disk_virtual_size
from ..cache import atomic_file, cache_dir
from ..errors import ArtifactError, RunError
from ..host import install_hint, require
from ..options import DEFAULT_MEMORY_MB, Accel, DiskFormat, DiskMode, choices
from ..proc import Supervisor, run_tool
from . import cmdline
from .console import ConsoleWatcher, RunResult


@dataclass(frozen=True)
class Machine:
    """How QEMU boots guests of one platform: everything that differs between architectures."""

    platform: str  # OCI platform of the guest: "linux/amd64", "linux/arm64"
    binary: str  # the QEMU system emulator (a builder/host.py need)
    machine: str  # -M
    tcg_cpu: str  # -cpu under TCG (KVM: host)
    console: str  # the kernel's console= for the first serial port
    kernel_args: tuple[str, ...]  # added to every command line (unless there)
    tcg_args: tuple[str, ...]  # added under TCG only
    uname: str  # os.uname().machine of a host whose KVM runs it (anywhere else: TCG only)

    @property
    def kvm(self) -> bool:
        """Whether KVM can run this machine's guests on this host."""
        return os.uname().machine == self.uname


MACHINES = {
    m.platform: m
    for m in (
        # no_timer_check: QEMU always delivers the timer IRQ; on a loaded host under TCG the IO-APIC timer
        # check can fail and panic the kernel ("IO-APIC + timer doesn't work!"). noapictimer: under TCG the
        # LAPIC timer calibration costs ~100 ms and makes jiffies (and so the boot clock the init's marker
        # reads) run fast; Xen and KVM never calibrate it this way
        Machine(
            "linux/amd64",
            "qemu-system-x86_64",
            "pc",
            "max",
            "ttyS0",
            ("no_timer_check",),
            ("noapictimer",),
            "x86_64",
        ),
        # virt: device tree, GIC, PSCI, PL011, virtio-mmio and a PCIe host; the architected timer needs no
        # calibration. -cpu max: every feature an image may probe for; pauth-impdef=on: QEMU's cheap pointer
        # authentication instead of the architected QARMA5, which made a Debian kernel's boot 3.4x slower in
        # wall time under TCG at the same guest time (kernels/README.md, arm64)
        Machine(
            "linux/arm64", "qemu-system-aarch64", "virt", "max,pauth-impdef=on", "ttyAMA0", (), (), "aarch64"
        ),
    )
}
AMD64 = MACHINES["linux/amd64"]
QEMU = AMD64.binary  # the host's own: the KVM probe's
GUEST_IP = "10.0.2.15"
NET_CMDLINE = f"ip={GUEST_IP}::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3"
DEFAULT_STOP_GRACE = 20.0  # host side: longer than init's default 10 s grace
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
    format: str = DiskFormat.RAW
    readonly: bool = False  # False: writable, but the writes go to a throwaway overlay
    size: int = 0  # the guest-visible size (for the overlay); 0: the file's size

    def qemu_args(self, index: int, scratch: Path, serial: str | None = None) -> list[str]:
        """-blockdev nodes + -device virtio-blk-pci; `scratch` holds the overlay of a writable disk;
        `serial` names it in the guest's /sys/block/vdX/serial."""
        if self.format not in choices(DiskFormat):
            raise RunError(
                f"{self.path}: disk format {self.format!r} ({' or '.join(choices(DiskFormat))} expected)"
            )
        image: dict[str, object] = {
            "node-name": f"disk{index}",
            "driver": self.format,
            "read-only": True,
            "file": {"driver": "file", "filename": str(self.path.resolve()), "read-only": True},
        }
        if self.format == DiskFormat.QCOW2:
            image["backing"] = None
        nodes = [image]
        top = f"disk{index}"
        if not self.readonly:
            overlay = scratch / f"overlay{index}.qcow2"
            size = self.size or self.path.stat().st_size
            run_tool(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), str(size)],
                RunError,
                hint=install_hint("qemu-img"),
            )
            # cache no-flush: no flushes to an overlay that is thrown away anyway
            nodes.append(
                {
                    "node-name": f"disk{index}rw",
                    "driver": "qcow2",
                    "backing": top,
                    "cache": {"no-flush": True},
                    "file": {"driver": "file", "filename": str(overlay)},
                }
            )
            top = f"disk{index}rw"
        dev = f"virtio-blk-pci,drive={top}" + (f",serial={serial}" if serial else "")
        return [a for n in nodes for a in ("-blockdev", json.dumps(n))] + ["-device", dev]


def machine_for(platform: str) -> Machine:
    """The Machine that runs guests of `platform`; ArtifactError (exit 2) for one xbuild cannot run."""
    try:
        return MACHINES[platform]
    except KeyError:
        raise ArtifactError(
            f"cannot run a {platform[:40]!r} guest: xbuild runs {' and '.join(MACHINES)} guests under QEMU"
        ) from None


def root_disks(art: Artifact) -> tuple[Disk, ...]:
    """The validated artifact's root disk as a Disk (none for an initramfs artifact)."""
    if art.disk is None or art.manifest.disk is None:
        return ()
    d = art.manifest.disk
    return (Disk(art.disk, d.format, d.mode == DiskMode.RO, disk_virtual_size(art)),)


def guest_cmdline(
    base: str,
    *,
    network: bool = False,
    kernel_args: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    machine: Machine = AMD64,
) -> str:
    """The artifact's command line + the machine's console and flags + ip= + kernel_args, then
    ` -- extra_args` (they replace Cmd); the user's words are quoted for the init (builder/run/cmdline.py)."""
    head, tail = cmdline.split(base)
    if not any(w.startswith("console=") for w in head):
        head.append(f"console={machine.console}")
    if not any(w.startswith("rdinit=") for w in head):
        from ..guest import INIT_CMDLINE

        head.append(INIT_CMDLINE)
    if not any(w.startswith("panic=") for w in head):
        head.append("panic=-1")
    head += [w for w in machine.kernel_args if w not in head]
    if network and cmdline.SYNC_UNPACK not in head:  # the NIC's ring after the unpack (cmdline.with_ip)
        head.append(cmdline.SYNC_UNPACK)
    if network and not any(w.startswith("ip=") for w in head):
        head.append(NET_CMDLINE)
    return cmdline.with_args(
        " ".join(head + ([cmdline.SEPARATOR, *tail] if tail else [])), kernel_args, extra_args
    )


def qemu_binary(machine: Machine = AMD64) -> str:
    """Where the machine's QEMU is; RunError naming its Debian package when it is not installed
    (builder/host.py)."""
    (exe,) = require(machine.binary, error=RunError)
    return exe


def qemu_version() -> str:
    """The version line of the host's own QEMU (the KVM probe's key)."""
    out = run_tool([qemu_binary(), "--version"], RunError, timeout=30).stdout
    return out.splitlines()[0] if out else "unknown"


class Qemu:
    """One QEMU guest: start(), pump()/wait(), stop() (graceful), kill(). Use as a context manager.

    The process is run by a builder.proc.Supervisor (session, parent-death kill, signals, grace, console
    into the marker watcher); this class knows QEMU's command line and its QMP monitor."""

    def __init__(
        self,
        artifact: Path,
        *,
        ports: Sequence[tuple[int, int]] = (),
        memory_mb: int = DEFAULT_MEMORY_MB,
        kernel_args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        console: BinaryIO | None = None,
        accel: str = Accel.TCG,
        icount: bool = False,
        network: bool = False,
        initrd: Path | None = None,
        cmdline: str | None = None,
        disks: Sequence[Disk] = (),
        vcpus: int = 1,
        kernel: Path | None = None,
        stop_grace: float = DEFAULT_STOP_GRACE,
        platform: str = AMD64.platform,
    ):
        """Boot the bare directory `artifact` (see the module docstring) as a `platform` guest; for an
        artifact: for_artifact."""
        self.machine = machine_for(platform)
        if accel == Accel.KVM and not self.machine.kvm:
            raise RunError(f"KVM cannot run a {platform} guest on this host: use TCG")
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
        if accel == Accel.TCG:
            kernel_args = (*(w for w in self.machine.tcg_args if w not in cmdline.split()), *kernel_args)
        self.cmdline = guest_cmdline(
            cmdline,
            network=self.network,
            kernel_args=kernel_args,
            extra_args=extra_args,
            machine=self.machine,
        )
        self.ports, self.memory_mb = tuple(ports), memory_mb
        self.disks, self.vcpus = tuple(disks), vcpus
        self.accel, self.icount = accel, icount
        self._tmp = tempfile.mkdtemp(prefix="xbq.")
        self.qmp_path = os.path.join(self._tmp, "qmp.sock")
        self._power_button_only = False
        # init powers off right after its status line: QEMU gets 10 s to exit by itself
        self.supervisor = Supervisor(
            console=console,
            stop=self._stop_guest,
            grace=stop_grace,
            settle=10.0,
            ready_ports=[host for host, _ in self.ports],
        )

    @classmethod
    def for_artifact(cls, art: Artifact, **kw: Any) -> Qemu:
        """A guest for a validated artifact: its platform, kernel, initrd, command line, vcpus and root
        disk."""
        art.bootable()
        return cls(
            art.path,
            kernel=art.kernel,
            initrd=art.initrd,
            cmdline=art.cmdline,
            disks=root_disks(art),
            vcpus=art.manifest.guest.vcpus,
            platform=art.manifest.source.platform,
            **kw,
        )

    def command(self) -> list[str]:
        kvm = self.accel == Accel.KVM
        cmd = [
            self.machine.binary,
            "-M",
            self.machine.machine,
            "-accel",
            "kvm" if kvm else "tcg",
            "-cpu",
            "host" if kvm else self.machine.tcg_cpu,
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.vcpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-chardev",
            "stdio,id=con,signal=off",
            "-serial",
            "chardev:con",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            self.cmdline,
        ]
        for i, disk in enumerate(self.disks):
            cmd += disk.qemu_args(i, Path(self._tmp))
        if self.icount:
            cmd += ["-icount", "shift=0,sleep=off"]
        if self.network:
            fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in self.ports)
            cmd += ["-netdev", f"user,id=n0{fwd}", "-device", "virtio-net-pci,netdev=n0"]
        return cmd

    def start(self) -> Qemu:
        """Start QEMU (its overlays made by qemu-img first). On any failure, the guest's temp directory
        is removed (kill) before the exception propagates: nothing is left when start() raises."""
        try:
            qemu_binary(self.machine)
            try:
                self.supervisor.start(self.command())
            except OSError as e:
                raise RunError(f"cannot start {self.machine.binary}: {e}") from None
        except BaseException:
            self.kill()
            raise
        return self

    def __enter__(self) -> Qemu:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.supervisor.proc

    @property
    def watcher(self) -> ConsoleWatcher:
        return self.supervisor.watcher

    @property
    def running(self) -> bool:
        return self.supervisor.running

    def pump(self, timeout: float = 0.2) -> bool:
        """Read what the guest printed (up to `timeout` s); False once QEMU exited and output is drained."""
        return self.supervisor.pump(timeout)

    def stop(self, power_button_only: bool = False) -> None:
        """Ask the guest to shut down: ACPI power button + ctrl-alt-del (or the button alone), over QMP."""
        self._power_button_only = power_button_only
        self.supervisor.stop()

    def _stop_guest(self, _sup: Supervisor) -> None:
        commands: list[tuple[str, dict[str, Any] | None]] = [("system_powerdown", None)]
        if not self._power_button_only:
            keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
            commands.append(("send-key", {"keys": keys}))
        self.qmp(commands)

    def qmp(
        self, commands: list[tuple[str, dict[str, Any] | None]], timeout: float = 3.0
    ) -> list[dict[str, Any]]:
        """Run QMP commands on this QEMU (see qmp)."""
        return qmp(self.qmp_path, commands, timeout)

    def kill(self) -> None:
        """Kill QEMU's process group (no-op when it is gone) and clean up."""
        self.supervisor.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def wait(self, timeout: float | None = None, stop_event: threading.Event | None = None) -> RunResult:
        """Stream until QEMU exits: builder.proc.Supervisor.wait (a stop after `timeout` s, on `stop_event`,
        SIGTERM or SIGINT; killed the stop grace later; KeyboardInterrupt re-raised after a SIGINT).
        RunError when QEMU exited by itself with a failure status before the guest printed anything."""
        try:
            result = self.supervisor.wait(timeout, stop_event)
        finally:
            self.kill()
        rc = self.supervisor.proc.returncode if self.supervisor.proc else None
        if result.exit_status is None and not result.console and not self.supervisor.killed and rc:
            raise RunError(
                f"{self.machine.binary} failed (status {rc}): "
                f"{bytes(self.supervisor.stderr).decode(errors='replace').strip()[-500:]}"
            )
        return result


def qmp(
    path: str, commands: list[tuple[str, dict[str, Any] | None]], timeout: float = 3.0
) -> list[dict[str, Any]]:
    """Run QMP commands on the monitor socket `path`; returns their replies ([] if it is not reachable)."""
    replies: list[dict[str, Any]] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            f = s.makefile("rwb")
            f.readline()  # greeting
            for name, args in [("qmp_capabilities", None), *commands]:
                msg: dict[str, Any] = {"execute": name}
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


# ------------------------------------------------------------------------------------------- KVM probe


def _probe_key() -> str:
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    return hashlib.sha256(f"{qemu_version()}\n{os.uname().release}\nkvm={usable}".encode()).hexdigest()[:16]


def host_kernel() -> Path | None:
    """The host's newest /boot/vmlinuz-* (the kernel libguestfs's appliance boots), if any."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    return kernels[-1] if kernels else None


def kvm_works(kernel: Path | None = None) -> bool:
    """Whether KVM boots a guest on this host: the one KVM probe, for the runner and the disk writer.

    False without a usable /dev/kvm or QEMU. Else the verdict cached in cache_dir("probe")/kvm-KEY.json,
    KEY from the QEMU version, the host kernel's release and /dev/kvm (a property of the host, not of the
    kernel booted), or a probe boot of `kernel` (default: host_kernel(); none: False) that is cached."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not shutil.which(QEMU):
        return False
    cached = cache_dir("probe") / f"kvm-{_probe_key()}.json"
    try:
        return bool(json.loads(cached.read_text())["kvm"])
    except (OSError, ValueError, KeyError):
        pass
    kernel = kernel or host_kernel()
    if kernel is None:
        return False
    ok = _probe_kvm(kernel)
    with atomic_file(cached, "w") as f:
        json.dump({"kvm": ok, "qemu": qemu_version(), "kernel": str(kernel), "probed": time.time()}, f)
    return ok


def _probe_kvm(kernel: Path) -> bool:
    """Boot `kernel` under KVM with an initrd whose init only reports a missing program and powers off:
    KVM works when the init's exit status line arrives within PROBE_TIMEOUT (a broken KVM hangs)."""
    from ..cpio import pack
    from ..guest import GuestConfig, install
    from ..init import init_binary
    from ..tree import Tree

    with tempfile.TemporaryDirectory(prefix="xbuild-probe.") as tmp:
        d = Path(tmp)
        tree = Tree()
        gc = GuestConfig(
            argv=("/probe",), env=(), cwd="/", uid=0, gid=0, groups=(0,), stop_signal=15, hostname="probe"
        )
        install(tree, gc, init_binary())
        pack(tree, d / "initrd.img", "none")
        guest = Qemu(
            d,
            kernel=kernel.resolve(),
            cmdline="console=ttyS0 quiet panic=-1",
            accel=Accel.KVM,
            memory_mb=128,
            stop_grace=1.0,
        )
        try:
            guest.start()
            result = guest.wait(timeout=PROBE_TIMEOUT)
        except RunError:
            return False
        finally:
            guest.kill()
        return result.exit_status is not None


def choose_accel(accel: str, kernel: Path, icount: bool, platform: str = AMD64.platform) -> str:
    """The accelerator for `accel` ("auto": KVM where it works and can run the platform, else TCG)."""
    if accel not in choices(Accel):
        raise RunError(f"unknown accelerator {accel!r} ({', '.join(choices(Accel))})")
    if icount:
        if accel == Accel.KVM:
            raise RunError("-icount needs TCG: use accel='tcg' or 'auto'")
        return Accel.TCG
    if accel == Accel.AUTO:
        return Accel.KVM if machine_for(platform).kvm and kvm_works(kernel) else Accel.TCG
    return accel


# ----------------------------------------------------------------------------------------------- run


def run(
    artifact: Artifact | Path,
    *,
    ports: Sequence[tuple[int, int]] = (),
    memory_mb: int = DEFAULT_MEMORY_MB,
    timeout: float | None = None,
    extra_args: Sequence[str] = (),
    console: BinaryIO | None = sys.stdout.buffer,
    accel: str = Accel.AUTO,
    icount: bool = False,
    kernel_args: Sequence[str] = (),
    network: bool = False,
    stop_grace: float = DEFAULT_STOP_GRACE,
    platform: str = AMD64.platform,
) -> RunResult:
    """Boot `artifact` and return the entrypoint's result (exit_status None: no status line seen).

    An Artifact is booted as validated (Qemu.for_artifact, on its manifest's platform); a Path is a bare
    boot directory (Qemu) booted as a `platform` guest.

    `extra_args` go after `--` on the kernel command line (they replace the image's Cmd);
    `kernel_args` before it (e.g. `xbuild.env=K=V`, `xbuild.grace=2`, `xbuild.debug`).
    Timeout, SIGINT and SIGTERM stop the guest gracefully; after a SIGINT, KeyboardInterrupt is raised.
    """
    if isinstance(artifact, Artifact):
        kernel, platform = artifact.kernel, artifact.manifest.source.platform
    else:
        kernel = kernel_path(Path(artifact))
    kw: dict[str, Any] = dict(
        ports=ports,
        memory_mb=memory_mb,
        kernel_args=kernel_args,
        extra_args=extra_args,
        console=console,
        icount=icount,
        network=network,
        accel=choose_accel(accel, kernel, icount, platform),
        stop_grace=stop_grace,
    )
    guest = (
        Qemu.for_artifact(artifact, **kw)
        if isinstance(artifact, Artifact)
        else Qemu(Path(artifact), platform=platform, **kw)
    )
    with guest:
        return guest.wait(timeout)
