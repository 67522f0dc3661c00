"""Run an artifact under Xen: on a real dom0 with `xl` (run_xl), or nested in QEMU TCG (run_nested).

The nested rig (ensure_rig, built once into the cache from Debian packages) is Xen 4.17, Debian's standard
kernel as dom0 (it has XEN_DOM0; the cloud kernel does not) as an uncompressed ELF, and a dom0 initramfs
with busybox, the toolstack and `xenrig/dom0-init.sh`. A run appends the guest (kernel, ramdisk, rewritten
xen.cfg) to that initramfs as a second cpio archive. QEMU's COM1 is Xen's and dom0's console (a log file);
COM2, dom0's ttyS1, carries only the guest console out (xl create -c) and "stop" requests in.

Both runners take a validated Artifact (builder/artifact.py) and generate the guest's xl config from its
manifest (guest_config, through the one writer builder.artifact.xen_config); the artifact's xen.cfg is
never read. The root disk of a `--format disk` artifact is attached to the outer QEMU as virtio-blk
(builder.run.qemu.Disk: explicit driver, no backing file followed, a throwaway overlay for rw, so the
artifact's image never changes, as with `docker run`). dom0 loads virtio-blk and blkback, names it
/dev/xbuild-disk0 by its serial, and the guest's config gets a raw disk line to it.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

from builder.artifact import XEN_TYPES, Artifact, XlDisk, xen_config
from builder.cache import atomic_dir, atomic_file, cache_dir
from builder.errors import ArtifactError, ConfigError, RunError
from builder.run.console import ConsoleWatcher, RunResult
from builder.run.qemu import root_disks

RIG_RECIPE = 2  # bump when the rig's layout changes: it is part of the cache key
XEN_PACKAGES = (
    "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils", "libxenstore4",
    "libxencall1", "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1", "libxenmisc4.17",
    "libxentoollog1", "libyajl2", "libxendevicemodel1", "libxenhypfs1", "libxentoolcore1", "busybox-static",
)
DOM0_KERNEL_META = "linux-image-amd64"
DOM0_MODULES = ("xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs")
NET_MODULES = ("e1000", "xen-netback")  # loaded only when ports are forwarded
# loaded in this order only when the guest has disks: virtio-blk for QEMU's disks, blkback to serve them
BLK_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
               "virtio_blk", "xen-blkback")
TOOLS = ("xl", "xenstored", "xenconsoled", "xenconsole", "xen-init-dom0")
DOM0_INIT = Path(__file__).with_name("xenrig") / "dom0-init.sh"
VIF_SCRIPT = Path(__file__).with_name("xenrig") / "vif-xbuild.sh"
BLOCK_SCRIPT = Path(__file__).with_name("xenrig") / "block-xbuild.sh"  # dom0's /etc/xen/scripts/block
DOM0_DISK = "/dev/xbuild-disk{}"  # dom0's name of the outer QEMU's Nth virtio disk (its serial)
GUEST_IP, DOM0_VIF_IP = "10.0.3.2", "10.0.3.1"  # a point-to-point link dom0 ↔ guest (see vif-xbuild.sh)
DOM0_MEM_MB = 512
XEN_CMDLINE = (f"console=com1 com1=115200,8n1 dom0_mem={DOM0_MEM_MB}M,max:{DOM0_MEM_MB}M dom0_max_vcpus=1"
               " bootscrub=false")
DOM0_CMDLINE = "console=hvc0 quiet cryptomgr.notests"  # crypto self-tests cost dom0 ~0.5 s under TCG
GUEST_NAME = "xbuild"
GRACE_S = 10  # seconds between `xl shutdown` and `xl destroy`
EXIT_WAIT_S = 30.0  # after the guest is done (or forced off): time for dom0 and QEMU, or xl, to exit
PR_SET_PDEATHSIG = 1  # prctl: the child is killed if we die without cleaning up (even by SIGKILL)
Progress = Callable[[str], None]
Hook = Callable[[subprocess.Popen[bytes]], None]  # stops or forces off the guest of a running supervisor


@dataclass(frozen=True)
class Rig:
    """A built nested-Xen rig: the hypervisor, dom0's uncompressed kernel and dom0's initramfs."""

    xen: Path
    dom0_kernel: Path
    dom0_initrd: Path


# ---- the rig -------------------------------------------------------------------------------------------


def ensure_rig(progress: Progress | None = None) -> Rig:
    """Return the cached rig for the mirror's current package versions, building it once if needed."""
    say = progress or (lambda _msg: None)
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "ldd"):
        if shutil.which(tool) is None:
            raise RunError(f"the nested Xen rig is built from Debian packages and needs {tool} on PATH")
    recipe = [RIG_RECIPE, DOM0_INIT.read_text(), VIF_SCRIPT.read_text(), BLOCK_SCRIPT.read_text(),
              DOM0_MODULES, NET_MODULES, BLK_MODULES]
    # resolving versions costs seconds of apt-cache: remember the answer until the apt lists change
    lists = os.stat("/var/lib/apt/lists").st_mtime_ns
    pointer = cache_dir("xenrig") / f"resolved-{_digest([*recipe, lists])}"
    if pointer.exists() and (cache_dir("xenrig") / pointer.read_text() / "rig.json").exists():
        return _rig(cache_dir("xenrig") / pointer.read_text())
    kernel_pkg = _dom0_kernel_package()
    versions = _candidate_versions([*XEN_PACKAGES, kernel_pkg])
    final = cache_dir("xenrig") / _digest([*recipe, versions])
    if not (final / "rig.json").exists():
        say(f"building the nested Xen rig in {final}")
        _build_rig(final, kernel_pkg, versions, say)
    with atomic_file(pointer, "w") as f:
        f.write(final.name)
    return _rig(final)


def _build_rig(final: Path, kernel_pkg: str, versions: list[str], say: Progress) -> None:
    """Download, unpack and assemble the rig into `final` (atomically)."""
    with atomic_dir(final) as out:
        debs, root = out / "debs", out / "root"
        debs.mkdir()
        say(f"downloading {len(versions)} Debian packages")
        _run(["apt-get", "download", "-q", *versions], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        (out / "xen.elf").write_bytes(gzip.decompress(_one(root.glob("boot/xen-4*-amd64.gz")).read_bytes()))
        kver = kernel_pkg.removeprefix("linux-image-")
        config = (root / "boot" / f"config-{kver}").read_text()
        if "CONFIG_XEN_DOM0=y" not in config:
            raise RunError(f"{kernel_pkg} lacks CONFIG_XEN_DOM0: it cannot be the rig's dom0")
        say("extracting the dom0 vmlinux")
        (out / "vmlinux-dom0").write_bytes(extract_vmlinux((root / "boot" / f"vmlinuz-{kver}").read_bytes()))
        say("writing the dom0 initramfs")
        with open(out / "dom0-initrd.img", "wb") as f:
            _write_cpio(f, _dom0_tree(root, root / "lib" / "modules" / kver))
        shutil.rmtree(debs)
        shutil.rmtree(root)
        (out / "rig.json").write_text(json.dumps({"recipe": RIG_RECIPE, "packages": versions}, indent=1))


def _rig(d: Path) -> Rig:
    return Rig(d / "xen.elf", d / "vmlinux-dom0", d / "dom0-initrd.img")


def _digest(parts: list[object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _dom0_kernel_package() -> str:
    out = _run(["apt-cache", "depends", DOM0_KERNEL_META])
    names = re.findall(r"Depends: (linux-image-\S+)", out)
    if not names:
        raise RunError(f"apt-cache knows no {DOM0_KERNEL_META}: run apt-get update")
    return names[0]


def _candidate_versions(packages: Sequence[str]) -> list[str]:
    """`name=version` of each package's apt candidate (what `apt-get download` fetches)."""
    out = _run(["apt-cache", "policy", *packages])
    found = dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (\S+)", out, re.MULTILINE))
    missing = [p for p in packages if found.get(p, "(none)") == "(none)"]
    if missing:
        raise RunError(f"apt has no candidate for {', '.join(missing)}: run apt-get update")
    return [f"{p}={found[p]}" for p in packages]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF inside an x86 bzImage (xz or gzip payload), found from the setup header."""
    if bzimage[:4] == b"\x7fELF":
        return bzimage
    if bzimage[0x202:0x206] != b"HdrS":
        raise RunError("not a bzImage (no HdrS setup header)")
    start = (bzimage[0x1F1] + 1) * 512 + struct.unpack_from("<I", bzimage, 0x248)[0]
    payload = bzimage[start:start + struct.unpack_from("<I", bzimage, 0x24C)[0]]
    if payload[:6] == b"\xfd7zXZ\x00":
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload[:2] == b"\x1f\x8b":
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)  # stops at the member's end
    else:
        raise RunError(f"unsupported bzImage payload compression (magic {payload[:6].hex()})")
    if elf[:4] != b"\x7fELF":
        raise RunError("the bzImage payload is not an ELF vmlinux")
    return elf


# ---- cpio newc -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    mode: int  # including the file type bits
    data: bytes = b""  # file content or symlink target
    rdev: tuple[int, int] = (0, 0)


def _write_cpio(f: BinaryIO, tree: dict[str, _Node]) -> None:
    """Write `tree` (path → node, parents added) as one newc archive with 4-byte padding throughout."""
    full = dict(tree)
    for path in tree:
        parts = path.split("/")
        for i in range(1, len(parts)):
            full.setdefault("/".join(parts[:i]), _Node(0o40755))
    for ino, path in enumerate(sorted(full), start=1):
        _cpio_entry(f, path, full[path], ino)
    _cpio_entry(f, "TRAILER!!!", _Node(0), 0)


def _cpio_entry(f: BinaryIO, name: str, node: _Node, ino: int) -> None:
    fields = (ino, node.mode, 0, 0, 1, 0, len(node.data), 0, 0, *node.rdev, len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
    f.write(head + b"\0" * (-len(head) % 4))
    f.write(node.data + b"\0" * (-len(node.data) % 4))


def _file(path: Path, mode: int | None = None) -> _Node:
    return _Node(0o100000 | (mode if mode is not None else path.stat().st_mode & 0o7777), path.read_bytes())


def _dom0_tree(root: Path, moddir: Path) -> dict[str, _Node]:
    """busybox, the Xen modules, the toolstack binaries and their library closure, /init."""
    tree: dict[str, _Node] = {
        "init": _Node(0o100755, DOM0_INIT.read_bytes()),
        "bin/busybox": _file(root / "bin" / "busybox", 0o755),
        "bin/sh": _Node(0o120777, b"busybox"),
        "dev/console": _Node(0o20600, rdev=(5, 1)),
        "dev/null": _Node(0o20666, rdev=(1, 3)),
        "var/run": _Node(0o120777, b"../run"),
        "var/lock": _Node(0o120777, b"../run/lock"),
        "usr/bin/xenstore": _file(root / "usr" / "bin" / "xenstore"),
        "usr/bin/xenstore-ls": _Node(0o120777, b"xenstore"),
        "usr/bin/xenstore-write": _Node(0o120777, b"xenstore"),
        "usr/bin/xenstore-read": _Node(0o120777, b"xenstore"),
        "etc/xen/scripts/vif-xbuild": _Node(0o100755, VIF_SCRIPT.read_bytes()),
        "etc/xen/scripts/block": _Node(0o100755, BLOCK_SCRIPT.read_bytes()),
        "etc/xen/xl.conf": _Node(0o100644),
    }
    for d in ("proc", "sys", "run", "tmp", "root", "guest", "sbin", "usr/sbin"):
        tree[d] = _Node(0o40755)
    for name in DOM0_MODULES:
        tree[f"lib/modules/{name}.ko"] = _file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    for name in NET_MODULES:
        tree[f"lib/modules/net/{name}.ko"] = _file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    for i, name in enumerate(BLK_MODULES):  # numbered: dom0-init.sh loads them in glob order
        tree[f"lib/modules/blk/{i}-{name}.ko"] = _file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    bindir = _one(root.glob("usr/lib/xen-4*/bin"))
    binaries = [bindir / t for t in TOOLS] + [root / "usr" / "bin" / "xenstore"]
    for t in binaries:
        tree[str(t.relative_to(root))] = _file(t)
    for dest, src in _library_closure(binaries, root).items():
        tree[dest] = _file(src)
    # glibc dlopen()s libgcc_s for pthread_cancel: xl aborts without it
    tree["lib/x86_64-linux-gnu/libgcc_s.so.1"] = _file(_host_lib("libgcc_s.so.1"))
    return tree


def _library_closure(binaries: Sequence[Path], root: Path) -> dict[str, Path]:
    """Initramfs path → source of every shared library the binaries load (ldd, unpacked Xen libs first)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(root / "usr" / "lib" / "x86_64-linux-gnu")}
    libs: dict[str, Path] = {}
    for b in binaries:
        out = _run(["ldd", str(b)], env=env)
        if "not found" in out:
            raise RunError(f"{b.name} needs libraries that are neither unpacked nor on the host:\n{out}")
        for path in re.findall(r"^\s*(?:\S+ => )?(/\S+) \(0x", out, re.MULTILINE):
            src = Path(path)
            dest = src.relative_to(root) if src.is_relative_to(root) else src.relative_to("/")
            libs[str(dest)] = src
    return libs


def _host_lib(name: str) -> Path:
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        if (p := Path(d) / name).exists():
            return p
    raise RunError(f"the host has no {name} (Debian: libgcc-s1) for the rig's xl")


def _one(paths: Iterator[Path]) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise RunError(f"expected one match in the unpacked packages, found {[str(p) for p in found]}")
    return found[0]


def _run(argv: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        raise RunError(f"{' '.join(argv[:3])} failed: {(e.stderr or e.stdout).strip()[-500:]}") from e
    return done.stdout


# ---- the guest's xl config -----------------------------------------------------------------------------
#
# Generated from the validated manifest by the one xl config writer (builder.artifact.xen_config): the
# artifact's own xen.cfg is never read, so nothing it says (bootloader, device_model, scripts, absolute
# paths) reaches xl or dom0.


def with_args(extra: str, args: Sequence[str], kernel_args: Sequence[str] = ()) -> str:
    """The kernel command line + `kernel_args`, then ` -- args` (they replace the words there: the Cmd)."""
    for a in [*args, *kernel_args]:
        if not a or any(c in a for c in "\"\\\n\r\t") or not a.isprintable():
            raise ConfigError(f"argument {a!r} cannot be passed on a kernel command line")
    words = extra.split()
    head, tail = (words[:words.index("--")], words[words.index("--") + 1:]) if "--" in words else (words, [])
    head += [f'"{a}"' if " " in a else a for a in kernel_args]
    if args:
        tail = [f'"{a}"' if " " in a else a for a in args]
    return " ".join(head + (["--", *tail] if tail else []))


def xen_extra(art: Artifact) -> str:
    """The artifact's validated kernel command line with Xen's console (hvc0) instead of QEMU's."""
    return " ".join(["console=hvc0", *(w for w in art.cmdline.split() if not w.startswith("console="))])


def guest_config(art: Artifact, *, name: str, kernel: str, ramdisk: str, xen_type: str, memory_mb: int,
                 extra_args: Sequence[str] = (), kernel_args: Sequence[str] = (), disk: str | None = None,
                 network: bool = False, rig: bool = False) -> str:
    """The xl config of a run: the validated artifact's command line, vcpus and root disk mode, the given
    paths (`disk`: where xl finds the root disk) and nothing else. `rig`: for the nested rig (TCG-safe TSC;
    with `network`, one vif routed by dom0's own script and the guest's `ip=` set to match)."""
    vif = None
    extra = xen_extra(art)
    if network:
        vif = f"ip={GUEST_IP},script=/etc/xen/scripts/vif-xbuild"
        kernel_args = [*kernel_args, f"ip={GUEST_IP}::{DOM0_VIF_IP}:255.255.255.0::eth0:off"]
        extra = " ".join(w for w in extra.split() if not w.startswith("ip="))
    d = art.manifest.disk
    disks = (XlDisk(disk, "raw" if rig else d.format, d.mode),) if d and disk else ()
    return xen_config(name, with_args(extra, extra_args, kernel_args), memory_mb, art.manifest.guest.vcpus,
                      xen_type, kernel=kernel, ramdisk=ramdisk, disks=disks, vif=vif, maxmem=True,
                      tsc_native=rig and xen_type == "pvh")


# ---- running -------------------------------------------------------------------------------------------


def run_nested(art: Artifact, xen_type: str = "pv", memory_mb: int | None = None,
               timeout: float | None = None, extra_args: Sequence[str] = (),
               console: BinaryIO | None = None, ports: Sequence[tuple[int, int]] = (),
               kernel_args: Sequence[str] = (), progress: Progress | None = None,
               stop_event: threading.Event | None = None) -> RunResult:
    """Boot the validated artifact as a `xen_type` guest of Xen nested in QEMU (TCG), stream its console.

    Like builder.run.qemu.run: only the guest console reaches `console` (default stdout); `extra_args` go
    after ` -- ` on the guest's command line (they replace the Cmd), `kernel_args` before it; `ports`
    (host, guest) forward 127.0.0.1:host to the guest's port (dom0 relays). Timeout, `stop_event`,
    Ctrl-C and SIGTERM stop the guest gracefully: `xl shutdown` (its kernel runs /sbin/poweroff for the init
    to deliver the stop signal), `xl destroy` GRACE_S later; Ctrl-C is re-raised afterwards. Xen's and
    dom0's output goes to a log that is kept, and named in `error`, when no exit status was seen. RunError
    when xl could not create the guest or it printed nothing. Only the artifact's kernel and initrd go into
    dom0, with a config generated from its manifest (guest_config); its root disk goes to the outer QEMU.
    """
    if xen_type not in XEN_TYPES:
        raise ConfigError(f"xen type must be pv or pvh, not {xen_type!r}")
    guest_mb = memory_mb or art.manifest.guest.memory_mb
    if not 32 <= guest_mb <= 16384:
        raise ConfigError(f"guest memory must be 32 to 16384 MiB under the nested rig, not {guest_mb}")
    if not art.has_kernel:
        raise ArtifactError(f"{art.path}: no kernel in the artifact (it was built with --kernel none)")
    if shutil.which("qemu-system-x86_64") is None:
        raise RunError("the nested Xen runner needs qemu-system-x86_64 (Debian: qemu-system-x86)")
    # the outer QEMU opens the disk (qcow2 too) and dom0 gets it as the raw block device /dev/xbuild-disk0
    outer_disks = root_disks(art)
    cfg = guest_config(art, name=GUEST_NAME, kernel="/guest/kernel", ramdisk="/guest/initrd.img",
                       xen_type=xen_type, memory_mb=guest_mb, extra_args=extra_args, kernel_args=kernel_args,
                       disk=DOM0_DISK.format(0) if outer_disks else None, network=bool(ports), rig=True)
    rig = ensure_rig(progress)
    work = Path(tempfile.mkdtemp(prefix="xbuild-xen-"))
    log, initrd, overlays = work / "xen-console.log", work / "dom0-initrd.img", work / "overlays"
    overlays.mkdir()
    keep = True
    try:
        with open(initrd, "wb") as f, open(rig.dom0_initrd, "rb") as base:
            shutil.copyfileobj(base, f)  # a multiple of 4 bytes: the appended archive starts aligned
            _write_cpio(f, {"guest/kernel": _file(art.kernel, 0o644),
                            "guest/initrd.img": _file(art.initrd, 0o644),
                            "guest/guest.cfg": _Node(0o100644, cfg.encode())})
        dom0 = f"{DOM0_CMDLINE} xenrig.grace={GRACE_S}"
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
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max,-smap", "-smp", "2",
                "-m", str(max(1024, DOM0_MEM_MB + guest_mb + 256)), "-nodefaults", "-display", "none",
                "-no-reboot", "-chardev", f"file,id=xen,path={log},append=on", "-serial", "chardev:xen",
                "-chardev", "stdio,id=guest,signal=off", "-serial", "chardev:guest",
                *net, *blk, "-kernel", str(rig.xen), "-append", XEN_CMDLINE,
                "-initrd", f"{rig.dom0_kernel} {dom0.replace(',', ',,')},{initrd}"]
        with open(log, "ab") as err:
            result = _supervise(argv, console, timeout, stdin=subprocess.PIPE, stderr=err,
                                stop=_ask_dom0_to_stop, force=lambda _p: None, stop_event=stop_event)
        xl_failed = re.search(rb"xl exited [1-9]", log.read_bytes()) is not None
        if result.exit_status is None and (xl_failed or not result.console):
            raise RunError(f"the guest could not be created or printed nothing{_dom0_says(log)}; log: {log}")
        keep = result.exit_status is None
        if keep:
            result = replace(result, error=f"{result.error or 'no exit status'} (Xen and dom0 log: {log})")
        return result
    finally:
        initrd.unlink(missing_ok=True)
        shutil.rmtree(overlays, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _dom0_says(log: Path) -> str:
    """dom0's last own line and the toolstack's first error, from the log."""
    text = log.read_bytes() if log.exists() else b""
    own = re.findall(rb"xenrig: (.*?)\r?$", text, re.MULTILINE)[-1:]
    errors = re.findall(rb"(?:xc|libxl): error: (.*?)\r?$", text, re.MULTILINE)[:1]
    said = own + errors
    return f" (dom0: {'; '.join(s.decode(errors='replace') for s in said)})" if said else ""


def run_xl(art: Artifact, xen_type: str | None = None, memory_mb: int | None = None,
           timeout: float | None = None, extra_args: Sequence[str] = (), console: BinaryIO | None = None,
           kernel_args: Sequence[str] = (), stop_event: threading.Event | None = None) -> RunResult:
    """`xl create -c` of a config generated from the validated artifact, on this host, a Xen dom0.

    Same contract as run_nested. The config (guest_config) names the artifact's kernel and initrd by
    absolute path, the guest by its hostname, and no device but the root disk: an rw disk is a throwaway
    sparse copy (reflinked where the filesystem can) in a temp directory, like `docker run`, so the run
    leaves disk.img as it was; an ro disk is used in place. The artifact's xen.cfg is not read.
    """
    caps = Path("/proc/xen/capabilities")
    if shutil.which("xl") is None or not caps.exists() or "control_d" not in caps.read_text():
        raise RunError("not a Xen dom0 (no /proc/xen/capabilities with control_d)")
    if xen_type not in (None, *XEN_TYPES):
        raise ConfigError(f"xen type must be pv or pvh, not {xen_type!r}")
    if not art.has_kernel:
        raise ArtifactError(f"{art.path}: no kernel in the artifact (it was built with --kernel none)")
    guest = art.manifest.guest
    scratch = Path(tempfile.mkdtemp(prefix="xbuild-run-"))
    try:
        disk = None
        if art.disk is not None and art.manifest.disk is not None:
            disk = art.disk.resolve()
            if art.manifest.disk.mode == "rw":
                disk = _throwaway_copy(disk, scratch)
        cfg = scratch / "guest.cfg"
        cfg.write_text(guest_config(art, name=guest.hostname, kernel=str(art.kernel.resolve()),
                                    ramdisk=str(art.initrd.resolve()), xen_type=xen_type or guest.xen_type,
                                    memory_mb=memory_mb or guest.memory_mb, extra_args=extra_args,
                                    kernel_args=kernel_args, disk=str(disk) if disk else None))
        return _supervise(["xl", "create", "-c", str(cfg)], console, timeout, stdin=None, stderr=None,
                          cwd=scratch, stop=lambda _p: _xl("shutdown", guest.hostname),
                          force=lambda _p: _xl("destroy", guest.hostname), stop_event=stop_event)
    finally:
        _xl("destroy", guest.hostname)
        shutil.rmtree(scratch, ignore_errors=True)


def _throwaway_copy(path: Path, scratch: Path) -> Path:
    """A sparse (reflinked where the filesystem can) copy of the disk `path` in `scratch`."""
    copy = scratch / path.name
    try:
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(path), str(copy)],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise RunError(f"cannot copy {path} for the run: {e.stderr.strip()}") from None
    return copy


def _xl(*args: str) -> None:
    subprocess.run(["xl", *args], check=False, stdin=subprocess.DEVNULL, capture_output=True)


def _ask_dom0_to_stop(proc: subprocess.Popen[bytes]) -> None:
    """QEMU's stdin is COM2, dom0's ttyS1: dom0 shuts the guest down, destroys it after the grace."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
    except BrokenPipeError:
        pass


def _supervise(argv: list[str], console: BinaryIO | None, timeout: float | None, *, stdin: int | None,
               stderr: BinaryIO | None, cwd: Path | None = None, stop: Hook, force: Hook,
               stop_event: threading.Event | None = None) -> RunResult:
    """Run `argv` in its own process group and stream its stdout; on timeout, `stop_event`, Ctrl-C or
    SIGTERM call `stop`, then `force` GRACE_S later. The process group is killed on the way out."""
    console = console or sys.stdout.buffer
    term = stop_event or threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: term.set()) if main else None
    watcher = ConsoleWatcher()  # at launch: the exec marker's arrival measures launch → exec
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the child only calls it
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, cwd=cwd,
                            start_new_session=True,
                            preexec_fn=lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL))  # noqa: PLW1509
    interrupted = False
    ended: str = ""  # how the first _pump returned
    try:
        try:
            until = math.inf if timeout is None else watcher.started + timeout
            ended = _pump(proc, console, watcher, until, term)
        except KeyboardInterrupt:
            interrupted, ended = True, "interrupted"
        if ended in ("deadline", "terminated", "interrupted"):
            stop(proc)
            if _pump(proc, console, watcher, time.monotonic() + GRACE_S) == "deadline":
                force(proc)
                _pump(proc, console, watcher, time.monotonic() + EXIT_WAIT_S)
    finally:
        _kill_group(proc)
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if interrupted:
        raise KeyboardInterrupt
    result = watcher.result()
    if ended == "deadline" and result.error is None:
        result = replace(result, error=f"timed out after {timeout:g}s")
    return result


def _pump(proc: subprocess.Popen[bytes], console: BinaryIO, watcher: ConsoleWatcher, until: float,
          term: threading.Event | None = None) -> Literal["exited", "deadline", "lingers", "terminated"]:
    """Copy the guest console until the process closes it, `until` passes, `term` is set, or it lingers
    EXIT_WAIT_S after the guest reported its exit status."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lingers = False
    while True:
        if watcher.finished and not lingers:
            lingers, until = True, min(until, time.monotonic() + EXIT_WAIT_S)
        if term is not None and term.is_set():
            return "terminated"
        left = until - time.monotonic()
        if left <= 0:
            return "lingers" if lingers else "deadline"
        if select.select([fd], [], [], min(left, 0.5))[0]:
            data = os.read(fd, 65536)
            if not data:
                return "exited"
            console.write(data)
            console.flush()
            watcher.feed(data)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End the process and everything it started (its own session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; anything left in its group still gets the signal next round
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
