"""Run an artifact under Xen: on a real dom0 with `xl` (run_xl), or nested in QEMU TCG (run_nested).

The nested run boots the rig (builder/run/rig.py: Xen 4.17, Debian's standard kernel as dom0, a dom0
initramfs with busybox, the toolstack and `xenrig/dom0-init.sh`) and appends the guest (kernel, ramdisk,
generated xl config) to dom0's initramfs as a second cpio archive (builder.cpio.write_cpio). QEMU's COM1 is
Xen's and dom0's console (a log file); COM2, dom0's ttyS1, carries only the guest console out
(xl create -c) and "stop" requests in. A linux/arm64 artifact runs on the arm64 rig (rig.ARCHES["arm64"]):
Xen loaded by `qemu-system-aarch64 -M virt,virtualization=on` as its kernel, dom0's kernel and initramfs
by QEMU's guest-loader device, Xen's and dom0's console on the virt board's PL011 (the log), the guest's
console and "stop" on a virtio console (dom0's hvc1, xenrig.relay), and the guest booted as xl's "pvh"
(the only type on arm), its kernel the artifact's arm64 Image.

Both runners take a validated Artifact (builder/artifact.py) and generate the guest's xl config from its
manifest (guest_config, through the one writer builder.artifact.xen_config); the artifact's xen.cfg is
never read (but by the test rig's BridgeProbe mode, which runs it inside the nested dom0). The root disk
of a `--format disk` artifact is attached to the outer QEMU as virtio-blk (builder.run.qemu.Disk:
explicit driver, no backing file followed, a throwaway overlay for rw, so the artifact's image never
changes, as with `docker run`). dom0 loads virtio-blk and blkback, names it
/dev/xbuild-disk0 by its serial, and the guest's config gets a raw disk line to it.

A warm rig (builder/run/warm.py) runs the same dom0 in the background and takes the guest's files through
a virtio-9p share instead; both build the outer QEMU's argv with rig_qemu_argv.

The outer QEMU, or `xl create -c`, is run by a builder.proc.Supervisor: its own session, killed with the
runner, SIGTERM/SIGINT/timeout as a stop request (`stop` to dom0, or `xl shutdown`), `xl destroy` GRACE_S
later, the process group killed EXIT_WAIT_S after that or after the guest's exit status.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from ..artifact import NAMES, Artifact, XlDisk, xen_config
from ..cpio import write_cpio
from ..errors import ConfigError, RunError
from ..options import (
    NESTED_MEMORY_MB,
    DiskFormat,
    DiskMode,
    Say,
    XenType,
    choices,
    memory_outside,
)
from ..proc import Supervisor, run_tool
from ..tree import Tree, directory, regular
from . import cmdline
from .console import RunResult
from .qemu import machine_for, qemu_binary, root_disks
from .ready import RELAYED_HOLD_S
from .rig import ARCHES, ArchSpec, Rig, ensure_rig, host_file

DOM0_DISK = "/dev/xbuild-disk{}"  # dom0's name of the outer QEMU's Nth virtio disk (its serial)
GUEST_IP, DOM0_VIF_IP = "10.0.3.2", "10.0.3.1"  # a point-to-point link dom0 ↔ guest (see vif-xbuild.sh)
DOM0_MEM_MB = 512
XEN_CMDLINE = {  # per rig architecture: Xen's console is COM1 on amd64, the PL011 of the device tree on arm
    "amd64": f"console=com1 com1=115200,8n1 dom0_mem={DOM0_MEM_MB}M,max:{DOM0_MEM_MB}M bootscrub=false",
    "arm64": f"console=dtuart dom0_mem={DOM0_MEM_MB}M bootscrub=false",
}  # rig_qemu_argv adds dom0_max_vcpus
# arm64: where QEMU's guest-loader puts dom0's kernel (RAM starts at 0x40000000 on virt, Xen sits at its
# start) and the lowest address of dom0's initramfs (above the device tree QEMU puts at 0x48000000)
ARM_DOM0_KERNEL_ADDR, ARM_DOM0_INITRD_MIN = 0x42000000, 0x4A000000
DOM0_CMDLINE = "console=hvc0 quiet cryptomgr.notests"  # crypto self-tests cost dom0 ~0.5 s under TCG
GUEST_NAME = "xbuild"
GRACE_S = 10  # seconds between `xl shutdown` and `xl destroy`
EXIT_WAIT_S = 30.0  # after the guest is done (or forced off): time for dom0 and QEMU, or xl, to exit


# ---- the guest's xl config -----------------------------------------------------------------------------
#
# Generated from the validated manifest by the one xl config writer (builder.artifact.xen_config): the
# artifact's own xen.cfg is never read, so nothing it says (bootloader, device_model, scripts, absolute
# paths) reaches xl or dom0.


def _check_xen_type(xen_type: str, arch: str = "amd64") -> None:
    if xen_type not in choices(XenType):
        raise ConfigError(f"xen type must be {' or '.join(choices(XenType))}, not {xen_type!r}")
    if xen_type not in (types := ARCHES[arch].guest_types):
        raise ConfigError(f"Xen on {arch} boots {' or '.join(types)} guests only, not {xen_type}")


def artifact_arch(art: Artifact) -> str:
    """The rig architecture of the artifact's platform (linux/amd64, linux/arm64); ConfigError for another."""
    os_name, _, arch = art.manifest.source.platform.partition("/")
    arch = arch.split("/")[0]
    if os_name != "linux" or arch not in ARCHES:
        raise ConfigError(
            f"no nested Xen rig for {art.manifest.source.platform}: "
            f"{', '.join('linux/' + a for a in ARCHES)} only"
        )
    return arch


def xen_extra(art: Artifact) -> str:
    """The artifact's validated kernel command line with Xen's console (hvc0) instead of QEMU's."""
    return " ".join(["console=hvc0", *(w for w in art.cmdline.split() if not w.startswith("console="))])


def guest_config(
    art: Artifact,
    *,
    name: str,
    kernel: str,
    ramdisk: str,
    xen_type: str,
    memory_mb: int,
    extra_args: Sequence[str] = (),
    kernel_args: Sequence[str] = (),
    disk: str | None = None,
    network: bool = False,
    rig: bool = False,
    guest_ip: str = GUEST_IP,
) -> str:
    """The xl config of a run: the validated artifact's command line, vcpus and root disk mode, the given
    paths (`disk`: where xl finds the root disk) and nothing else. `rig`: for the nested rig (TCG-safe TSC;
    with `network`, one vif routed by dom0's own script to `guest_ip` and the guest's `ip=` set to match; a
    warm rig gives each guest its own); otherwise the
    manifest's network, as the artifact's xen.cfg has it (a vif on its bridge, its `ip=`). The runner's
    `ip=` replaces any the artifact's command line has."""
    vif, ip_word = None, None
    if rig and network:
        vif = f"ip={guest_ip},script=/etc/xen/scripts/vif-xbuild"
        ip_word = f"ip={guest_ip}::{DOM0_VIF_IP}:255.255.255.0::eth0:off"
    elif not rig and (net := art.manifest.network):
        vif, ip_word = net.vif, net.ip_word
    extra = cmdline.with_ip(xen_extra(art), ip_word) if ip_word else xen_extra(art)
    d = art.manifest.disk
    disks = (XlDisk(disk, DiskFormat.RAW if rig else d.format, d.mode),) if d and disk else ()
    line = cmdline.with_args(extra, kernel_args, extra_args)
    return xen_config(
        name,
        line,
        memory_mb,
        art.manifest.guest.vcpus,
        xen_type,
        kernel=kernel,
        ramdisk=ramdisk,
        disks=disks,
        vif=vif,
        maxmem=True,
        tsc_native=rig and xen_type == XenType.PVH and artifact_arch(art) == "amd64",  # x86's TSC
    )


# ---- running -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeProbe:
    """run_nested's hand-run check (xenrig/dom0-init.sh's bridge mode): a dom0 set up as Debian's Xen wiki
    documents (a bridge, the manifest's, holding dom0's address; busybox udhcpd as the network's DHCP
    server) runs the artifact's OWN xen.cfg as a user would (`cd ARTIFACT && xl create -c xen.cfg`), waits
    for the guest's lease and sends `GET /` to LEASED:port with busybox nc. dom0's `xenrig: guest leased
    …` and `xenrig: GET … answered: …` lines come between the guest's console lines; then dom0 shuts the
    guest down. The only place an artifact's xen.cfg is read, and only inside the rig's dom0."""

    port: int = 80


def run_nested(
    art: Artifact,
    xen_type: str | None = None,
    memory_mb: int | None = None,
    timeout: float | None = None,
    extra_args: Sequence[str] = (),
    console: BinaryIO | None = None,
    ports: Sequence[tuple[int, int]] = (),
    kernel_args: Sequence[str] = (),
    progress: Say | None = None,
    stop_event: threading.Event | None = None,
    probe: BridgeProbe | None = None,
) -> RunResult:
    """Boot the validated artifact as a `xen_type` guest of Xen nested in QEMU (TCG), stream its console.

    Like builder.run.qemu.run: only the guest console reaches `console` (default stdout); `extra_args` go
    after ` -- ` on the guest's command line (they replace the Cmd), `kernel_args` before it; `ports`
    (host, guest) forward 127.0.0.1:host to the guest's port (dom0 relays). Timeout, `stop_event`,
    Ctrl-C and SIGTERM stop the guest gracefully: `xl shutdown` (its kernel runs /sbin/poweroff for the init
    to deliver the stop signal), `xl destroy` GRACE_S later; Ctrl-C is re-raised afterwards. Xen's and
    dom0's output goes to a log that is kept, and named in `error`, when no exit status was seen. RunError
    when xl could not create the guest or it printed nothing. Only the artifact's kernel and initrd go into
    dom0, with a config generated from its manifest (guest_config); its root disk goes to the outer QEMU.
    With `probe` (BridgeProbe): the artifact directory goes into dom0 and its own xen.cfg is run instead;
    an initramfs artifact whose xen.cfg has a vif only (ConfigError), no `ports`, `xen_type` is xen.cfg's;
    when dom0 reports no answer from the guest, the log is kept and named in `error` too.
    When a warm rig was started (builder/run/warm.py, `xbuild rig start`; a crashed one is restarted) and
    the run is amd64's and has neither a root disk nor a probe, the guest runs in it instead, with one
    progress line, under the same contract; RunError also when the warm rig stops under the guest.
    The rig is the artifact platform's (artifact_arch); `xen_type` None: that rig's default (amd64: pv,
    arm64: pvh, its only type).
    """
    arch = artifact_arch(art)
    spec = ARCHES[arch]
    xen_type = xen_type or spec.guest_types[0]
    _check_xen_type(xen_type, arch)
    guest_mb = memory_mb or art.manifest.guest.memory_mb
    if why := memory_outside(guest_mb, NESTED_MEMORY_MB):
        raise ConfigError(f"guest memory under the nested rig: {why}")
    art.bootable()
    network = art.manifest.network
    if probe is not None and (network is None or art.manifest.disk is not None or ports):
        raise ConfigError(
            "the hand-run check needs an initramfs artifact whose xen.cfg has a vif, and no forwarded ports"
        )
    outer_qemu(arch)  # before the rig is built: a host without it is told at once
    # the outer QEMU opens the disk (qcow2 too) and dom0 gets it as the raw block device /dev/xbuild-disk0
    outer_disks = root_disks(art)
    cfg = guest_config(
        art,
        name=GUEST_NAME,
        kernel="/guest/kernel",
        ramdisk="/guest/initrd.img",
        xen_type=xen_type,
        memory_mb=guest_mb,
        extra_args=extra_args,
        kernel_args=kernel_args,
        disk=DOM0_DISK.format(0) if outer_disks else None,
        network=bool(ports),
        rig=True,
    )
    if probe is None and not outer_disks and arch == "amd64":  # the warm rig is amd64's
        from . import warm

        if (up := warm.running(progress)) is not None:
            job = warm.reserve(up, domain_name(art.manifest.guest.hostname))
            if progress is not None:
                progress(f"running in the warm rig (QEMU pid {up.pid}, guest {job.ip})")
            return warm.run_job(
                job,
                kernel=art.kernel,
                initrd=art.initrd,
                config=guest_config(
                    art,
                    name=job.name,
                    kernel=f"{job.dom0_boot}/kernel",
                    ramdisk=f"{job.dom0_boot}/initrd.img",
                    xen_type=xen_type,
                    memory_mb=guest_mb,
                    extra_args=extra_args,
                    kernel_args=kernel_args,
                    network=bool(ports),
                    rig=True,
                    guest_ip=job.ip,
                ),
                grace=GRACE_S,
                settle=EXIT_WAIT_S,
                ports=ports,
                timeout=timeout,
                console=console,
                stop_event=stop_event,
            )
    rig = ensure_rig(progress, arch)
    work = Path(tempfile.mkdtemp(prefix="xbuild-xen-"))
    log, initrd, overlays = work / "xen-console.log", work / "dom0-initrd.img", work / "overlays"
    overlays.mkdir()
    keep = False  # True only once the log is named in an error or the result
    try:
        with open(initrd, "wb") as f, open(rig.dom0_initrd, "rb") as base:
            shutil.copyfileobj(base, f)  # a multiple of 4 bytes: the appended archive starts aligned
            guest = Tree()
            if probe is not None:  # the artifact directory as it is, its xen.cfg included
                guest.add("artifact", directory())
                for name in NAMES:
                    if (art.path / name).is_file():
                        guest.add(f"artifact/{name}", host_file(art.path / name, 0o644))
            else:
                guest.add("guest/kernel", host_file(art.kernel, 0o644))
                guest.add("guest/initrd.img", host_file(art.initrd, 0o644))
                guest.add("guest/guest.cfg", regular(cfg.encode(), 0o644))
            write_cpio(f, guest)
        dom0 = f"{DOM0_CMDLINE} xenrig.grace={GRACE_S}"
        if probe is not None and network is not None:
            dom0 += f" xenrig.bridge={network.bridge} xenrig.probe={int(probe.port)}"
        blk: list[str] = []
        if outer_disks:
            dom0 += f" xenrig.disks={len(outer_disks)}"
            for i, d in enumerate(outer_disks):
                blk += d.qemu_args(i, overlays, serial=DOM0_DISK.format(i).removeprefix("/dev/"))
        net: list[str] = []
        if ports:  # QEMU user net → dom0 eth0 (busybox nc relays each port) → the guest's vif
            dom0 += f" xenrig.guest={GUEST_IP} xenrig.ports={','.join(str(g) for _h, g in ports)}"
            fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in ports)
            net = ["-netdev", f"user,id=net0{fwd}", "-device", "e1000,netdev=net0"]
        if spec.relay != "ttyS1":
            dom0 += f" xenrig.relay={spec.relay}"
        argv = rig_qemu_argv(
            rig,
            memory_mb=max(1024, DOM0_MEM_MB + guest_mb + 256),
            log=log,
            initrd=initrd,
            dom0=dom0,
            devices=[*guest_relay(spec), *net, *blk],
        )
        with open(log, "ab") as err:
            # QEMU's stdin is COM2, dom0's ttyS1: dom0 shuts the guest down, destroys it after its grace
            sup = Supervisor(
                console=console or sys.stdout.buffer,
                stop=lambda s: s.write(b"stop\n"),
                grace=GRACE_S + EXIT_WAIT_S,
                settle=EXIT_WAIT_S,
                stdin=subprocess.PIPE,
                stderr=err,
                ready_ports=[h for h, _g in ports],
                ready_hold=RELAYED_HOLD_S,
            )
            result = _supervise(sup, argv, timeout, stop_event)
        xl_failed = re.search(rb"xl exited [1-9]", log.read_bytes()) is not None
        unanswered = probe is not None and b" answered: " not in result.console  # dom0 says why, in the log
        keep = result.exit_status is None or unanswered
        if result.exit_status is None and (xl_failed or not result.console):
            raise RunError(f"the guest could not be created or printed nothing{dom0_says(log)}; log: {log}")
        if keep:
            why = result.error or (
                "no exit status" if result.exit_status is None else "the probe got no answer"
            )
            result = replace(result, error=f"{why} (Xen and dom0 log: {log})")
        return result
    finally:
        initrd.unlink(missing_ok=True)
        shutil.rmtree(overlays, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def outer_qemu(arch: str) -> str:
    """The outer QEMU of `arch`'s rig (a needs error naming the package when the host has none)."""
    return qemu_binary(machine_for(f"linux/{arch}"))


def guest_relay(spec: ArchSpec) -> list[str]:
    """The outer QEMU's devices carrying the guest's console out and "stop" in on stdin/stdout: amd64's
    COM2 (dom0's ttyS1), else a virtio console (dom0's hvc1)."""
    relay = ["-chardev", "stdio,id=guest,signal=off"]
    if spec.relay == "ttyS1":
        return [*relay, "-serial", "chardev:guest"]
    return [*relay, "-device", "virtio-serial-device", "-device", "virtconsole,chardev=guest"]


def rig_qemu_argv(
    rig: Rig,
    *,
    memory_mb: int,
    log: Path,
    initrd: Path,
    dom0: str,
    devices: Sequence[str],
    dom0_vcpus: int = 1,
) -> list[str]:
    """The outer QEMU's argv, cold rig or warm (builder/run/warm.py): the rig's architecture's machine (TCG),
    `memory_mb` of RAM, Xen as the kernel (XEN_CMDLINE, dom0_max_vcpus=`dom0_vcpus`: at most the machine's
    -smp), dom0's kernel with command line `dom0` and `initrd`
    (amd64: as Xen's multiboot modules; arm64: through QEMU's guest-loader device), the first serial port
    (Xen's and dom0's console) appended to `log`, then `devices` (the guest relay first, see guest_relay;
    network, disks...)."""
    spec = ARCHES[rig.arch]
    argv = [
        outer_qemu(rig.arch),
        *spec.machine,
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        f"file,id=xen,path={log},append=on",
        "-serial",
        "chardev:xen",
        *devices,
        "-kernel",
        str(rig.xen),
        "-append",
        f"{XEN_CMDLINE[rig.arch]} dom0_max_vcpus={dom0_vcpus}",
    ]
    dom0 = dom0.replace(",", ",,")  # QEMU's option syntax
    if rig.arch == "amd64":  # multiboot: a module's command line follows its path
        return [*argv, "-initrd", f"{rig.dom0_kernel} {dom0},{initrd}"]
    kernel_end = ARM_DOM0_KERNEL_ADDR + rig.dom0_kernel.stat().st_size
    initrd_addr = max(ARM_DOM0_INITRD_MIN, -(-kernel_end // 0x200000) * 0x200000)  # 2 MiB aligned
    return [
        *argv,
        "-device",
        f"guest-loader,addr={ARM_DOM0_KERNEL_ADDR:#x},kernel={rig.dom0_kernel},bootargs={dom0}",
        "-device",
        f"guest-loader,addr={initrd_addr:#x},initrd={initrd}",
    ]


def dom0_says(log: Path) -> str:
    """dom0's last own line and the toolstack's first error, from the log."""
    text = log.read_bytes() if log.exists() else b""
    own = re.findall(rb"xenrig: (.*?)\r*$", text, re.MULTILINE)[-1:]  # arm64: hvc0 lines end \r\r\n
    errors = re.findall(rb"(?:xc|libxl): error: (.*?)\r*$", text, re.MULTILINE)[:1]
    said = own + errors
    return f" (dom0: {'; '.join(s.decode(errors='replace') for s in said)})" if said else ""


def run_xl(
    art: Artifact,
    xen_type: str | None = None,
    memory_mb: int | None = None,
    timeout: float | None = None,
    extra_args: Sequence[str] = (),
    console: BinaryIO | None = None,
    kernel_args: Sequence[str] = (),
    stop_event: threading.Event | None = None,
) -> RunResult:
    """`xl create -c` of a config generated from the validated artifact, on this host, a Xen dom0.

    Same contract as run_nested. The config (guest_config) names the artifact's kernel and initrd by
    absolute path, the guest by a name of its own (domain_name: no other domain's, never taken for a domid)
    and no device but the root disk: an rw disk is a throwaway sparse copy (reflinked where the filesystem
    can) in a temp directory beside the artifact directory, on its filesystem ($TMPDIR when that directory
    is read-only), like `docker run`, so the run leaves disk.img as it was; an ro disk is used in place.
    The temp directory is removed after the run. `xl shutdown` and `xl destroy` only ever name the domain
    this run's `xl create` made.
    The artifact's xen.cfg is not read.
    """
    caps = Path("/proc/xen/capabilities")
    if shutil.which("xl") is None or not caps.exists() or "control_d" not in caps.read_text():
        raise RunError("not a Xen dom0 (no /proc/xen/capabilities with control_d)")
    if xen_type is not None:
        _check_xen_type(xen_type)
    art.bootable()
    guest, d = art.manifest.guest, art.manifest.disk
    disk = art.disk.resolve() if art.disk is not None and d is not None else None
    # beside the artifact directory, not in it: an artifact holds only its own files (open_artifact)
    scratch = _scratch_dir(art.path.resolve().parent if disk and d and d.mode == DiskMode.RW else None)
    try:
        if disk and d and d.mode == DiskMode.RW:
            disk = _throwaway_copy(disk, scratch)
        name = domain_name(guest.hostname)
        cfg = scratch / "guest.cfg"
        cfg.write_text(
            guest_config(
                art,
                name=name,
                kernel=str(art.kernel.resolve()),
                ramdisk=str(art.initrd.resolve()),
                xen_type=xen_type or guest.xen_type,
                memory_mb=memory_mb or guest.memory_mb,
                extra_args=extra_args,
                kernel_args=kernel_args,
                disk=str(disk) if disk else None,
            )
        )
        sup = Supervisor(
            console=console or sys.stdout.buffer,
            stop=lambda _s: _xl("shutdown", name),
            force=lambda _s: _xl("destroy", name),
            grace=GRACE_S,
            settle=EXIT_WAIT_S,
            stdin=None,
            stderr=None,
            cwd=scratch,
        )
        try:
            return _supervise(sup, ["xl", "create", "-c", str(cfg)], timeout, stop_event)
        finally:
            if sup.proc is not None:  # xl create ran: a domain of this name is this run's
                _xl("destroy", name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def domain_name(hostname: str) -> str:
    """A domain name for one run: `xbuild-HOSTNAME-PID-RANDOM` (the hostname cut to 32 characters). Unique,
    so `xl create` never meets an existing domain and `xl shutdown`/`xl destroy` never reach another
    one; never all digits, which xl would take for a domid."""
    return f"xbuild-{hostname[:32]}-{os.getpid()}-{secrets.token_hex(4)}"


def _scratch_dir(beside: Path | None) -> Path:
    """A new temp directory in `beside` (so a reflink copy of a disk there is instant and never lands on
    a tmpfs $TMPDIR), or in $TMPDIR when `beside` is None or cannot take one."""
    if beside is not None:
        try:
            return Path(tempfile.mkdtemp(prefix=".xbuild-run-", dir=beside))
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="xbuild-run-"))


def _supervise(
    sup: Supervisor, argv: list[str], timeout: float | None, stop_event: threading.Event | None
) -> RunResult:
    try:
        sup.start(argv)
    except OSError as e:
        raise RunError(f"cannot start {argv[0]}: {e}") from None
    return sup.wait(timeout, stop_event)


def _throwaway_copy(path: Path, scratch: Path) -> Path:
    """A sparse (reflinked where the filesystem can) copy of the disk `path` in `scratch`."""
    copy = scratch / path.name
    run_tool(["cp", "--sparse=always", "--reflink=auto", str(path), str(copy)], RunError)
    return copy


def _xl(*args: str) -> None:
    """`xl ARGS` whatever it answers: shutdown and destroy of a guest that may be gone already."""
    run_tool(["xl", *args], RunError, check=False)
