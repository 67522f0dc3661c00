"""`xbuild rig start|status|stop`: the warm nested-Xen rig (builder/run/warm.py) for many
`xbuild run --hypervisor xen-nested` and `xbuild build --verify-on xen-nested` runs.

Exit statuses: start and stop 0 (1 on a failure to start); status 0 running, 1 crashed or wedged, 3 not
running (as `systemctl status` has it).
"""

from __future__ import annotations

import json
import sys

import click

from .options import stderr_say
from .run import warm

STATUS_EXIT = {"running": 0, "crashed": 1, "wedged": 1, "not running": 3}


@click.group("rig")
def rig_cmd() -> None:
    """Keep one nested Xen rig (Xen + dom0 in QEMU) running for many xen-nested runs."""


@rig_cmd.command("start")
@click.option(
    "--memory",
    type=click.IntRange(*warm.MEMORY_RANGE_MB),
    default=warm.DEFAULT_MEMORY_MB,
    show_default=True,
    metavar="MB",
    help="The rig's memory: Xen, dom0 (512 MB) and every guest running at once.",
)
def start_cmd(memory: int) -> None:
    """Start the warm rig in the background (a running one is kept as it is)."""
    warm.start(memory, stderr_say())


@rig_cmd.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def status_cmd(as_json: bool) -> None:
    """Say whether the warm rig runs, and its guests."""
    st = warm.status()
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=2))
    else:
        click.echo(f"{st.state}: {st.detail}")
        for name in st.guests:
            click.echo(f"  guest {name}")
    sys.exit(STATUS_EXIT[st.state])


@rig_cmd.command("stop")
def stop_cmd() -> None:
    """Stop the warm rig: its guests are destroyed, its state removed."""
    st = warm.stop(stderr_say())
    if st.rig is None:
        stderr_say()("no warm rig was running")
