"""`--verify`: boot a built artifact under QEMU (or nested Xen) and run its recipe's smoke test against it.

A failure is a VerifyError naming the likely missing files (from the console and the minimize report).
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .artifact import Artifact
from .errors import XbuildError
from .explain import likely_missing
from .options import VERIFY_HYPERVISORS, Accel, Hypervisor, choices
from .recipes import Recipe, load_recipe, smoke_test
from .run.console import RunResult
from .run.qemu import Qemu, choose_accel

NESTED_SLACK_S = 90


class VerifyError(XbuildError):
    """The booted guest failed its smoke test."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verify_artifact(art: Artifact, log: Callable[[str], None] = lambda m: None,
                    hypervisor: str = Hypervisor.QEMU) -> str:
    """Boot `art` under `hypervisor` (qemu, or xen-nested as the artifact's xen_type) and check its
    recipe's smoke test; return a one-line verdict or raise VerifyError."""
    guest = art.manifest.guest
    name = guest.recipe
    recipe: Recipe | None = load_recipe(name) if name else None
    if not art.has_kernel:
        raise VerifyError(f"{art.path}: --verify needs a kernel in the artifact (built with --kernel none?)")
    if hypervisor not in choices(VERIFY_HYPERVISORS):
        raise VerifyError(f"cannot verify under {hypervisor!r}: choose from "
                          f"{', '.join(choices(VERIFY_HYPERVISORS))}")
    smoke = recipe.smoke if recipe else None
    ports = [(free_port(), p) for p in (recipe.guest_ports if recipe else ())]
    console = io.BytesIO()
    memory = max(guest.memory_mb, 64)
    # the nested rig boots Xen and dom0 (~10 s under TCG) before the guest
    slack = NESTED_SLACK_S if hypervisor == Hypervisor.XEN_NESTED else 0
    limit = (smoke.timeout if smoke else 60) + 30 + slack
    stop = threading.Event()
    result: list[Any] = []
    xen_type = guest.xen_type
    qemu = Qemu.for_artifact(art, ports=ports, memory_mb=memory, console=console,
                             accel=choose_accel(Accel.AUTO, art.kernel, False), network=bool(ports)) \
        if hypervisor == Hypervisor.QEMU else None

    def wait() -> None:
        from .run.xen import run_nested

        try:
            result.append(qemu.wait(limit, stop_event=stop) if qemu else
                          run_nested(art, xen_type, memory, limit, console=console, ports=ports,
                                     stop_event=stop))
        except XbuildError as e:
            result.append(e)

    where = "QEMU" if qemu else f"nested Xen ({xen_type})"
    if qemu:
        qemu.start()

    log(f"verify: booting {art.path} under {where}" + (f" (smoke test: {smoke.kind})" if smoke else ""))
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        if recipe is None or smoke is None:
            waiter.join()
            status = result[0].exit_status if result and isinstance(result[0], RunResult) else None
            ok = status == 0
            msg = f"entrypoint exit status {status}"
        elif smoke.kind == "console":
            waiter.join(smoke.timeout + slack)
            ok, msg = smoke_test(recipe, console.getvalue())
        else:
            ok, msg = smoke_test(recipe, b"", {guest_port: host for host, guest_port in ports},
                                 deadline=time.monotonic() + smoke.timeout + slack)
    finally:
        if waiter.is_alive():
            stop.set()
            waiter.join(60)
        if qemu:
            qemu.kill()
    if result and isinstance(result[0], XbuildError) and not ok:
        msg += f" ({result[0]})"
    if not ok:
        missing = likely_missing(art.manifest.minimize, console.getvalue())
        hint = f"; likely missing: {', '.join(missing)}" if missing else ""
        raise VerifyError(f"verify failed for {art.path}: {msg}{hint}")
    return f"verify: passed ({msg})"
