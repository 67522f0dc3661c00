"""The runner options, each defined once as an enum: the CLI's choices, the defaults and the checks all
come from here (click gets the values, `choices`).

Members are `StrEnum`s: they compare equal to their value and format as it, so a value read from a flag,
a manifest or a caller's string is one of them by `in`.
"""

from __future__ import annotations

from enum import StrEnum


class Hypervisor(StrEnum):
    """What `xbuild run --hypervisor` boots under; `auto` is xen on a Xen dom0, else qemu."""

    AUTO = "auto"
    QEMU = "qemu"
    XEN = "xen"                # xl on this host, a Xen dom0
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


DEFAULT_XEN_TYPE = XenType.PVH  # what a build writes into the artifact
NESTED_XEN_TYPE = XenType.PV    # what the nested rig boots when the run does not say


def choices(members: type[StrEnum] | tuple[StrEnum, ...]) -> list[str]:
    """The members' values, in order, for click.Choice (which would show an Enum's names)."""
    return [m.value for m in members]
