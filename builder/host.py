"""What xbuild needs from the build host, in one table: each tool, the feature that uses it and the Debian
package that provides it.

`check()` looks for every need (or the named ones): `xbuild doctor` shows the whole table. A stage asks
for the tools it needs by name: `require` gives where they are or raises the stage's error naming the
first one missing and the apt line for all of them; `install_hint` is that apt line for a tool run through
builder.proc.run_tool. No stage names a Debian package itself.
"""

from __future__ import annotations

import glob
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from .errors import XbuildError


@dataclass(frozen=True)
class Need:
    """One thing the host must have. `find` returns where it is, or None."""

    name: str
    package: str
    feature: str
    find: Callable[[], str | None]
    optional: bool = False  # only for a feature few hosts have (a real dom0)


def _tool(*names: str) -> Callable[[], str | None]:
    return lambda: next((p for n in names if (p := shutil.which(n))), None)


def _file(pattern: str) -> Callable[[], str | None]:
    return lambda: next(iter(sorted(glob.glob(pattern))), None)


def _module(name: str) -> Callable[[], str | None]:
    def find() -> str | None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        return spec.origin if spec else None

    return find


BUILD, KERNEL, DISK = "build (the guest init)", "kernel build", "--format disk"
TRACE, QEMU, NESTED = "--minimize trace", "run / --verify under QEMU", "run --hypervisor xen-nested"
ARM64, QEMU_ARM64 = "arm64 guests (kernel, init)", "run / --verify of arm64 guests under QEMU"
KERNEL_SOURCES = "/usr/src/linux-source-*.tar.*"  # Debian's linux-source-X.Y tarballs

NEEDS: tuple[Need, ...] = (
    Need("musl-gcc or gcc", "musl-tools", BUILD, _tool("musl-gcc", "gcc")),
    Need(
        "aarch64-linux-musl-gcc or aarch64-linux-gnu-gcc",
        "musl-dev:arm64",
        f"{BUILD} for arm64",
        _tool("aarch64-linux-musl-gcc", "aarch64-linux-gnu-gcc"),
    ),
    Need("qemu-system-x86_64", "qemu-system-x86", QEMU, _tool("qemu-system-x86_64")),
    Need("qemu-system-aarch64", "qemu-system-arm", QEMU_ARM64, _tool("qemu-system-aarch64")),
    Need("qemu-img", "qemu-utils", f"{DISK} qcow2, run of a qcow2 disk", _tool("qemu-img")),
    Need("linux-source", "linux-source-6.1", KERNEL, _file(KERNEL_SOURCES)),
    Need("make", "make", KERNEL, _tool("make")),
    Need("gcc", "build-essential", KERNEL, _tool("gcc")),
    Need("bc", "bc", KERNEL, _tool("bc")),
    Need("bison", "bison", KERNEL, _tool("bison")),
    Need("flex", "flex", KERNEL, _tool("flex")),
    Need("patch", "patch", KERNEL, _tool("patch")),
    Need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", ARM64, _tool("aarch64-linux-gnu-gcc")),
    Need("libelf.h", "libelf-dev", KERNEL, _file("/usr/include/libelf.h")),
    Need("openssl/ssl.h", "libssl-dev", KERNEL, _file("/usr/include/openssl/ssl.h")),
    Need(
        "guestfs",
        "python3-guestfs",
        f"{DISK}; a venv sees it with --system-site-packages",
        _module("guestfs"),
    ),
    Need("/boot/vmlinuz-*", "linux-image-amd64", f"{DISK}: the appliance's kernel", _file("/boot/vmlinuz-*")),
    Need("e2fsck", "e2fsprogs", DISK, _tool("e2fsck")),
    Need("strace", "strace", TRACE, _tool("strace")),
    Need("bwrap", "bubblewrap", TRACE, _tool("bwrap")),
    Need("unshare", "util-linux", TRACE, _tool("unshare")),
    Need("setpriv", "util-linux", TRACE, _tool("setpriv")),
    Need("prlimit", "util-linux", TRACE, _tool("prlimit")),
    Need("nsenter", "util-linux", TRACE, _tool("nsenter")),
    Need("mount", "mount", TRACE, _tool("mount")),
    Need("apt-get", "apt", NESTED, _tool("apt-get")),
    Need("apt-cache", "apt", NESTED, _tool("apt-cache")),
    Need("dpkg-deb", "dpkg", NESTED, _tool("dpkg-deb")),
    Need("ldd", "libc-bin", NESTED, _tool("ldd")),
    Need("xl", "xen-utils-4.17", "run --hypervisor xen (on a dom0)", _tool("xl"), optional=True),
)
_BY_NAME = {n.name: n for n in NEEDS}


def need(name: str) -> Need:
    return _BY_NAME[name]


def needs_of(feature: str) -> tuple[str, ...]:
    """The names of every need of `feature` (BUILD, KERNEL, DISK, TRACE, QEMU, NESTED, ARM64, QEMU_ARM64), in
    table order."""
    return tuple(n.name for n in NEEDS if n.feature == feature)


def install_hint(*names: str) -> str:
    """The apt line that installs the named needs (for builder.proc.run_tool's `hint`)."""
    return apt_line([need(n).package for n in names])


def require(*names: str, error: type[XbuildError]) -> list[str]:
    """Where each named need is, in order; else `error`: `NAME not found (needed for FEATURE): apt-get
    install …`, naming the first missing one and the packages of all that are missing."""
    checks = check(names)
    missing = [c for c in checks if c.found is None]
    if missing:
        first = missing[0].need
        raise error(
            f"{first.name} not found (needed for {first.feature}): "
            f"{apt_line(missing_packages(missing, optional=True))}"
        )
    return [c.found for c in checks if c.found is not None]


def apt_line(packages: list[str]) -> str:
    return "apt-get install " + " ".join(dict.fromkeys(packages))


@dataclass(frozen=True)
class Check:
    need: Need
    found: str | None


def check(names: tuple[str, ...] | None = None) -> list[Check]:
    """Every need, or those named, looked for."""
    return [Check(n, n.find()) for n in (NEEDS if names is None else [need(x) for x in names])]


def missing_packages(checks: list[Check], optional: bool = False) -> list[str]:
    """The Debian packages of what `checks` did not find (with `optional`, the optional ones too), once."""
    return list(
        dict.fromkeys(c.need.package for c in checks if c.found is None and (optional or not c.need.optional))
    )
