"""The options, each defined once as an enum, and the guest memory bounds: the CLI's choices, the
defaults, the manifest's checks and the stages' branches all come from here (click gets the values,
`choices`). Also the two callback shapes the stages report through (`Say`, `Progress`).

Members are `StrEnum`s: they compare equal to their value and format as it, so a value read from a flag,
a manifest or a caller's string is one of them by `in`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import click

# ---- build ------------------------------------------------------------------------------------------------


class MinimizeMode(StrEnum):
    """`--minimize`: what minimize keeps of the image."""

    AUTO = "auto"  # static analysis: the entrypoint's closure, packages, the recipe's keep list
    NONE = "none"  # everything
    TRACE = "trace"  # auto, plus what the entrypoint opens when run in the probe


class OutputFormat(StrEnum):
    """`--format`: where the guest's files go."""

    INITRAMFS = "initramfs"  # all in the initramfs, in guest RAM
    DISK = "disk"  # an ext4 root disk (disk.img); the initramfs holds only the init


class DiskFormat(StrEnum):
    """`--disk-format`: the root disk image's file format (and the xl/QEMU driver that opens it)."""

    RAW = "raw"
    QCOW2 = "qcow2"


class DiskMode(StrEnum):
    """`--disk-mode`: how the guest mounts its root disk."""

    RW = "rw"
    RO = "ro"


# ---- run and verify ---------------------------------------------------------------------------------------


class Hypervisor(StrEnum):
    """What `xbuild run --hypervisor` boots under; `auto` is xen on a Xen dom0, else qemu."""

    AUTO = "auto"
    QEMU = "qemu"
    XEN = "xen"  # xl on this host, a Xen dom0
    XEN_NESTED = "xen-nested"  # Xen and a dom0 nested in QEMU TCG (the rig)


VERIFY_HYPERVISORS = (Hypervisor.QEMU, Hypervisor.XEN_NESTED)  # what `--verify-on` can boot under


class Accel(StrEnum):
    """QEMU's accelerator; `auto` is KVM only where a probe boot proved it works (builder/run/qemu.py)."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class XenType(StrEnum):
    """The Xen guest type an artifact boots as (the xl config's `type`)."""

    PVH = "pvh"
    PV = "pv"


class NetworkMode(StrEnum):
    """Whether xen.cfg gets a vif (docker's `--network` words): `auto` when the image exposes ports."""

    AUTO = "auto"
    BRIDGE = "bridge"
    NONE = "none"


DEFAULT_BRIDGE = "xenbr0"  # the bridge of Debian's documented Xen network setup (wiki.debian.org/Xen)
DEFAULT_XEN_TYPE = XenType.PVH  # what a build writes into the artifact
NESTED_XEN_TYPE = XenType.PV  # what the nested rig boots when the run does not say


def choices(members: type[StrEnum] | tuple[StrEnum, ...]) -> list[str]:
    """The members' values, in order, for click.Choice (which would show an Enum's names)."""
    return [m.value for m in members]


# ---- guest memory (MiB) -----------------------------------------------------------------------------------

MEMORY_MB = (16, 65536)  # what an artifact, a recipe, `--memory` or `run --memory` may give a guest
DEFAULT_MEMORY_MB = 256  # a build's when neither --memory nor the recipe says
DISK_MEMORY_MB = 128  # a `--format disk` guest's default and cap: its files are not in RAM
VERIFY_MEMORY_MB = 64  # `--verify` boots a guest with at least this much
NESTED_MEMORY_MB = (32, 16384)  # what the nested Xen rig can give its guest (beside dom0, in its QEMU)


def memory_outside(mb: int, bounds: tuple[int, int] = MEMORY_MB) -> str | None:
    """None when `mb` lies within `bounds` (inclusive), else the one way to say it is not."""
    lo, hi = bounds
    return None if lo <= mb <= hi else f"{mb} MiB is outside {lo}..{hi}"


# ---- what the stages report through ------------------------------------------------------------------------

Say = Callable[[str], None]  # one line of news (`xbuild: …` on stderr, or nothing)
Progress = Callable[[str, int], Callable[[int], None]]  # a progress bar: (label, total) → advance it by n


def stderr_say(quiet: bool = False) -> Say:
    """The commands' Say: `xbuild: MESSAGE` on stderr, or nothing when `quiet`."""
    return (lambda msg: None) if quiet else (lambda msg: click.echo(f"xbuild: {msg}", err=True))
