"""The nested Xen rig: Xen, a dom0 kernel and a dom0 initramfs, built once into the cache from Debian
packages.

`ensure_rig` returns the rig for the apt mirror's current package versions (Xen 4.17, Debian's standard
kernel as dom0: it has XEN_DOM0, the cloud kernel does not), building it the first time: the packages are
downloaded with `apt-get download` and unpacked with `dpkg-deb -x` (no root, nothing installed), Xen is
gunzipped, dom0's vmlinuz unpacked to its ELF (builder.kernel.vmlinux), and dom0's initramfs written with
builder.cpio.write_cpio: busybox, the Xen modules, the toolstack and its library closure (ldd), and
`xenrig/dom0-init.sh` as /init. builder/run/xen.py runs guests on it.

Per architecture (ARCHES, data rather than code paths): amd64 is the rig above, booted under
qemu-system-x86_64; arm64 is Xen 4.17 for arm64 and Debian's arm64 kernel as dom0 (its `Image` used as it
is), booted under `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3` with QEMU's guest-loader
device loading dom0, the guest's console relayed over a virtio console (dom0 has no second UART).
arm64's packages are apt's foreign-architecture ones (`NAME:arm64`), its library closure is found with
builder.elf.Resolver in the unpacked packages (libc6 and libgcc-s1 among them), never the host's ldd.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from ..cache import atomic_dir, atomic_file, cache_dir
from ..cpio import write_cpio
from ..elf import Resolver
from ..errors import MinimizeError, RunError
from ..host import NESTED, needs_of, require
from ..kernel import vmlinux
from ..options import NESTED_XEN_TYPE, Say, XenType
from ..proc import run_tool
from ..tree import CHAR, DIR, FILE, SYMLINK, Content, Inode, Tree, directory, regular

RIG_RECIPE = 3  # bump when the rig's layout changes: it is part of the cache key
XEN_PACKAGES = (  # amd64's hypervisor is ArchSpec.hypervisor
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxenstore4",
    "libxencall1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenmisc4.17",
    "libxentoollog1",
    "libyajl2",
    "libxendevicemodel1",
    "libxenhypfs1",
    "libxentoolcore1",
    "busybox-static",
)
DOM0_MODULES = ("xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs")
NET_MODULES = ("e1000", "xen-netback")  # loaded only when ports are forwarded
# loaded in this order only when the guest has disks: virtio-blk for QEMU's disks, blkback to serve them
BLK_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "xen-blkback",
)
BRIDGE_MODULES = ("llc", "stp", "bridge")  # loaded in this order in bridge mode (xenrig.bridge=)
# the warm rig's virtio-9p share (builder/run/warm.py), loaded in this order after BLK_MODULES' virtio ones
WARM_MODULES = ("netfs", "fscache", "9pnet", "9pnet_virtio", "9p")
TOOLS = ("xl", "xenstored", "xenconsoled", "xenconsole", "xen-init-dom0")
DOM0_INIT = Path(__file__).with_name("xenrig") / "dom0-init.sh"
VIF_SCRIPT = Path(__file__).with_name("xenrig") / "vif-xbuild.sh"
VIF_BRIDGE_SCRIPT = Path(__file__).with_name("xenrig") / "vif-bridge.sh"  # dom0's /etc/xen/scripts/vif-bridge
BLOCK_SCRIPT = Path(__file__).with_name("xenrig") / "block-xbuild.sh"  # dom0's /etc/xen/scripts/block
# dom0's /etc/xenrig/stopguest.sh: a guest's graceful stop, sourced by dom0-init.sh and the warm rig's warm.sh
STOP_SCRIPT = Path(__file__).with_name("xenrig") / "stopguest.sh"


@dataclass(frozen=True)
class ArchSpec:
    """What the rig of one architecture is made of and how the outer QEMU boots it.

    `hypervisor`: Xen's package, `xen_file` its file in the unpacked packages (gunzipped when it ends in
    .gz); `libraries`: packages that hold the toolstack's library closure (empty: the host's, by ldd);
    `dom0_modules`: loaded by dom0-init.sh at start, besides DOM0_MODULES; `relay`: dom0's tty for the
    guest's console (ttyS1: the outer QEMU's second UART; else a virtio console's); `machine`: the outer
    QEMU's arguments before the devices (its binary: builder.run.qemu's Machine of the platform);
    `guest_types`: the xl types Xen boots there (the first is the default); `needs`: the builder.host needs
    of building and booting the rig."""

    apt_suffix: str  # "" for the host's own architecture, ":arm64" for a foreign one
    hypervisor: str
    xen_file: str
    kernel_meta: str
    libraries: tuple[str, ...]
    dom0_modules: tuple[str, ...]
    relay: str
    machine: tuple[str, ...]
    guest_types: tuple[str, ...]
    needs: tuple[str, ...]


ARCHES = {
    "amd64": ArchSpec(
        apt_suffix="",
        hypervisor="xen-hypervisor-4.17-amd64",
        xen_file="boot/xen-4*-amd64.gz",
        kernel_meta="linux-image-amd64",
        libraries=(),
        dom0_modules=(),
        relay="ttyS1",
        machine=("-accel", "tcg", "-cpu", "max,-smap", "-smp", "2"),
        guest_types=(NESTED_XEN_TYPE, XenType.PVH),  # the first: the rig's default
        needs=needs_of(NESTED),
    ),
    "arm64": ArchSpec(
        apt_suffix=":arm64",
        hypervisor="xen-hypervisor-4.17-arm64",
        xen_file="boot/xen-4*-arm64",
        kernel_meta="linux-image-arm64",
        libraries=(
            "libc6",
            "libgcc-s1",  # glibc dlopen()s it for pthread_cancel: xl aborts without it
            "libncurses6",
            "libtinfo6",
            "libext2fs2",
            "libcom-err2",
            "libfdt1",
            "libuuid1",
            "zlib1g",
            "liblzma5",
            "libzstd1",
            "libbz2-1.0",
            "liblzo2-2",
        ),
        dom0_modules=("virtio_mmio", "virtio_console"),
        relay="hvc1",  # a virtio console: hvc0 is Xen's
        # cortex-a57: EL2 under TCG without max's pointer authentication, which TCG emulates slowly
        machine=(
            "-accel",
            "tcg",
            "-M",
            "virt,virtualization=on,gic-version=3",
            "-cpu",
            "cortex-a57",
            "-smp",
            "2",
        ),
        guest_types=(XenType.PVH,),  # Xen on arm has one guest type, xl's "pvh"
        needs=("apt-get", "apt-cache", "dpkg-deb", "qemu-system-aarch64"),  # no ldd: builder.elf
    ),
}


@dataclass(frozen=True)
class Rig:
    """A built nested-Xen rig: the hypervisor, dom0's uncompressed kernel and dom0's initramfs."""

    xen: Path
    dom0_kernel: Path
    dom0_initrd: Path
    arch: str = "amd64"


def ensure_rig(progress: Say | None = None, arch: str = "amd64") -> Rig:
    """Return the cached rig of `arch` (an ARCHES key) for the mirror's current package versions, building
    it once if needed."""
    say = progress or (lambda _msg: None)
    spec = ARCHES[arch]
    require(*spec.needs, error=RunError)  # the rig is built from Debian packages
    recipe = [
        RIG_RECIPE,
        DOM0_INIT.read_text(),
        VIF_SCRIPT.read_text(),
        BLOCK_SCRIPT.read_text(),
        DOM0_MODULES,
        NET_MODULES,
        BLK_MODULES,
        BRIDGE_MODULES,
        VIF_BRIDGE_SCRIPT.read_text(),
        WARM_MODULES,
        STOP_SCRIPT.read_text(),
        *([] if arch == "amd64" else [list(astuple(spec))]),  # the amd64 rig's key as it was
    ]
    # resolving versions costs seconds of apt-cache: remember the answer until the apt lists change
    lists = os.stat("/var/lib/apt/lists").st_mtime_ns
    pointer = cache_dir("xenrig") / f"resolved-{_digest([*recipe, lists])}"
    if pointer.exists() and (cache_dir("xenrig") / pointer.read_text() / "rig.json").exists():
        return _rig(cache_dir("xenrig") / pointer.read_text(), arch)
    kernel_pkg = _dom0_kernel_package(spec)
    packages = [spec.hypervisor, *XEN_PACKAGES, *spec.libraries]
    versions = _candidate_versions([*(p + spec.apt_suffix for p in packages), kernel_pkg])
    final = cache_dir("xenrig") / _digest([*recipe, versions])
    if not (final / "rig.json").exists():
        say(f"building the nested Xen rig ({arch}) in {final}")
        _build_rig(final, spec, kernel_pkg, versions, say)
    with atomic_file(pointer, "w") as f:
        f.write(final.name)
    return _rig(final, arch)


def _build_rig(final: Path, spec: ArchSpec, kernel_pkg: str, versions: list[str], say: Say) -> None:
    """Download, unpack and assemble the rig into `final` (atomically)."""
    with atomic_dir(final) as out:
        debs, root = out / "debs", out / "root"
        debs.mkdir()
        say(f"downloading {len(versions)} Debian packages")
        run_tool(["apt-get", "download", "-q", *versions], RunError, cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            run_tool(["dpkg-deb", "-x", str(deb), str(root)], RunError)
        xen = _one(root.glob(spec.xen_file))
        (out / "xen.elf").write_bytes(
            gzip.decompress(xen.read_bytes()) if xen.suffix == ".gz" else xen.read_bytes()
        )
        kver = kernel_pkg.removeprefix("linux-image-").removesuffix(spec.apt_suffix)
        config = (root / "boot" / f"config-{kver}").read_text()
        if "CONFIG_XEN_DOM0=y" not in config:
            raise RunError(f"{kernel_pkg} lacks CONFIG_XEN_DOM0: it cannot be the rig's dom0")
        vmlinuz = root / "boot" / f"vmlinuz-{kver}"
        if spec.apt_suffix:  # arm64's vmlinuz is the Image Xen loads as it is
            shutil.copyfile(vmlinuz, out / "vmlinux-dom0")
        else:
            say("extracting the dom0 vmlinux")
            (out / "vmlinux-dom0").write_bytes(vmlinux(vmlinuz, vmlinuz.read_bytes()))
        say("writing the dom0 initramfs")
        with open(out / "dom0-initrd.img", "wb") as f:
            write_cpio(f, dom0_tree(root, root / "lib" / "modules" / kver, spec))
        shutil.rmtree(debs)
        shutil.rmtree(root)
        (out / "rig.json").write_text(json.dumps({"recipe": RIG_RECIPE, "packages": versions}, indent=1))


def _rig(d: Path, arch: str) -> Rig:
    return Rig(d / "xen.elf", d / "vmlinux-dom0", d / "dom0-initrd.img", arch)


def _digest(parts: list[object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _dom0_kernel_package(spec: ArchSpec) -> str:
    meta = spec.kernel_meta + spec.apt_suffix
    out = run_tool(["apt-cache", "depends", meta], RunError, check=False).stdout  # unknown: exit 100
    names = re.findall(r"Depends: (linux-image-\S+)", out)
    if not names:
        raise RunError(f"apt-cache knows no {meta}: {_apt_hint(spec)}")
    return str(names[0])


def _apt_hint(spec: ArchSpec) -> str:
    if spec.apt_suffix:
        return f"run dpkg --add-architecture {spec.apt_suffix[1:]} && apt-get update"
    return "run apt-get update"


def _candidate_versions(packages: Sequence[str]) -> list[str]:
    """`name=version` of each package's apt candidate (what `apt-get download` fetches)."""
    out = run_tool(["apt-cache", "policy", *packages], RunError).stdout
    found = dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (\S+)", out, re.MULTILINE))
    missing = [p for p in packages if found.get(p, "(none)") == "(none)"]
    if missing:
        foreign = next(
            (s for s in ARCHES.values() if s.apt_suffix and missing[0].endswith(s.apt_suffix)), None
        )
        hint = _apt_hint(foreign) if foreign else "run apt-get update"
        raise RunError(f"apt has no candidate for {', '.join(missing)}: {hint}")
    return [f"{p}={found[p]}" for p in packages]


def host_file(path: Path, mode: int | None = None) -> Inode:
    """A regular file whose content is read from the host's `path` when written (mode: the file's own)."""
    size = path.stat().st_size
    perm = stat.S_IMODE(path.stat().st_mode) if mode is None else mode
    return Inode(FILE, perm, size=size, content=Content(str(path), 0, size))


def _symlink(target: str) -> Inode:
    return Inode(SYMLINK, 0o777, target=target)


def dom0_tree(root: Path, moddir: Path, spec: ArchSpec = ARCHES["amd64"]) -> Tree:
    """busybox, the Xen modules, the toolstack binaries and their library closure, /init."""
    tree = Tree()
    entries: dict[str, Inode] = {
        "init": regular(DOM0_INIT.read_bytes(), 0o755),
        "bin/busybox": host_file(root / "bin" / "busybox", 0o755),
        "bin/sh": _symlink("busybox"),
        "dev/console": Inode(CHAR, 0o600, rdev=(5, 1)),
        "dev/null": Inode(CHAR, 0o666, rdev=(1, 3)),
        "var/run": _symlink("../run"),
        "var/lock": _symlink("../run/lock"),
        "usr/bin/xenstore": host_file(root / "usr" / "bin" / "xenstore"),
        "usr/bin/xenstore-ls": _symlink("xenstore"),
        "usr/bin/xenstore-write": _symlink("xenstore"),
        "usr/bin/xenstore-read": _symlink("xenstore"),
        "etc/xen/scripts/vif-xbuild": regular(VIF_SCRIPT.read_bytes(), 0o755),
        "etc/xen/scripts/block": regular(BLOCK_SCRIPT.read_bytes(), 0o755),
        "etc/xen/scripts/vif-bridge": regular(VIF_BRIDGE_SCRIPT.read_bytes(), 0o755),
        "etc/xen/xl.conf": regular(b"", 0o644),
        "etc/xenrig/stopguest.sh": regular(STOP_SCRIPT.read_bytes(), 0o644),
    }
    for d in ("proc", "sys", "run", "tmp", "root", "guest", "share", "sbin", "usr/sbin"):
        entries[d] = directory()
    # a module the kernel has built in (arm64's virtio, virtio_ring) is left out
    builtin = {Path(line).name for line in (moddir / "modules.builtin").read_text().split()}
    for name in (*DOM0_MODULES, *spec.dom0_modules):
        entries[f"lib/modules/{name}.ko"] = host_file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    for name in NET_MODULES:
        entries[f"lib/modules/net/{name}.ko"] = host_file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    for i, name in enumerate(BRIDGE_MODULES):
        entries[f"lib/modules/bridge/{i}-{name}.ko"] = host_file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    for i, name in enumerate(n for n in WARM_MODULES if f"{n}.ko" not in builtin):
        entries[f"lib/modules/warm/{i}-{name}.ko"] = host_file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    for i, name in enumerate(n for n in BLK_MODULES if f"{n}.ko" not in builtin):  # loaded in glob order
        entries[f"lib/modules/blk/{i}-{name}.ko"] = host_file(_one(moddir.rglob(f"{name}.ko")), 0o644)
    bindir = _one(root.glob("usr/lib/xen-4*/bin"))
    binaries = [bindir / t for t in TOOLS] + [root / "usr" / "bin" / "xenstore"]
    for t in binaries:
        entries[str(t.relative_to(root))] = host_file(t)
    # glibc dlopen()s libgcc_s for pthread_cancel: xl aborts without it
    if spec.libraries:
        closure = _package_closure(binaries, root)
        gcc_s = _one(root.glob("lib/*-linux-gnu/libgcc_s.so.1"))
        closure[str(gcc_s.relative_to(root))] = gcc_s
    else:
        closure = _library_closure(binaries, root)
        closure["lib/x86_64-linux-gnu/libgcc_s.so.1"] = _host_lib("libgcc_s.so.1")
    for dest, src in closure.items():
        entries[dest] = host_file(src)
    for path in sorted(entries, key=lambda p: p.count("/")):  # a directory before what it holds
        if entries[path].kind != DIR or tree.lookup(path) is None:
            tree.add(path, entries[path])
    return tree


def _package_closure(binaries: Sequence[Path], root: Path) -> dict[str, Path]:
    """Initramfs path → source of every shared library the binaries load, found as ld.so would find it
    (builder.elf.Resolver) among the unpacked packages' libraries: no host library, no host ldd."""
    libs = Tree()
    for top in ("lib", "usr/lib"):
        for dirpath, dirnames, filenames in os.walk(root / top):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if d != "modules"]
            for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
                path = here / name
                rel = str(path.relative_to(root))
                if path.is_symlink():
                    libs.add(rel, _symlink(os.readlink(path)))
                elif path.is_file():
                    libs.add(rel, host_file(path))
    closure: dict[str, Path] = {}
    for b in binaries:
        rel = str(b.relative_to(root))
        libs.add(rel, host_file(b))
        try:
            loaded, _missing = Resolver(libs).closure(rel)
        except MinimizeError as e:
            raise RunError(f"the rig's {b.name}: {e} (a library package missing from rig.ARCHES)") from None
        for obj in loaded[1:]:
            closure[obj.path] = root / obj.real
    return closure


def _library_closure(binaries: Sequence[Path], root: Path) -> dict[str, Path]:
    """Initramfs path → source of every shared library the binaries load (ldd, unpacked Xen libs first)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(root / "usr" / "lib" / "x86_64-linux-gnu")}
    libs: dict[str, Path] = {}
    for b in binaries:
        out = run_tool(["ldd", str(b)], RunError, env=env).stdout
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
