"""Proof by booting: `xbuild IMAGE` verifies its result when it knows how, `--verify` always.

`plan(art)` says what a verification of the artifact checks: its recipe's smoke test and/or the image's
HEALTHCHECK (the init's health probe). A build verifies by default when the plan is not empty
(`--no-verify` skips it); `skip_reason` says why it cannot (no kernel in the artifact, no QEMU): one line,
not an error. `--verify` forces a boot even without a plan (then the entrypoint must exit 0).

`verify_artifact` boots the artifact under QEMU (or the nested Xen rig), runs the smoke test, then waits
for the health probe's verdict: the init reports `xbuild: health: healthy|unhealthy`. Under verify the
probe runs every second (`xbuild.health.interval=1`, `.start_interval=1`) and its failures count only
after the time Docker would give the program before calling it unhealthy (start period + retries x
interval; `.start_period=` that many seconds), so a healthy program is found within a second of being
ready, and a sick one is not called so earlier than under Docker. A failure is a VerifyError (exit 1)
naming the files minimize dropped that the console points at (`explain.likely_missing`: "not found",
exit 127, "No such file or directory", "cannot open shared object file" lines).
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from typing import Any

from .artifact import Artifact
from .errors import XbuildError
from .explain import likely_missing
from .host import install_hint
from .options import VERIFY_HYPERVISORS, VERIFY_MEMORY_MB, Accel, Hypervisor, Say, choices
from .recipes import Recipe, load_recipe, smoke_test
from .run.console import HEALTH_RE, RunResult
from .run.qemu import MACHINES, Qemu, choose_accel

NESTED_SLACK_S = 90
HEALTH_WAIT_MAX_S = 600  # the longest verify waits for a health verdict


class VerifyError(XbuildError):
    """The booted guest failed its smoke test or its HEALTHCHECK (exit 1)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def artifact_recipe(art: Artifact, given: Recipe | None = None) -> Recipe | None:
    """The recipe `art` was built with: `given` (the build's own, e.g. from a --recipe FILE), else the
    shipped recipe its manifest names."""
    return given or (load_recipe(art.manifest.guest.recipe) if art.manifest.guest.recipe else None)


def plan(art: Artifact, given: Recipe | None = None) -> list[str]:
    """What verifying `art` checks: "recipe NAME's KIND smoke test", "the image's HEALTHCHECK"."""
    guest = art.manifest.guest
    recipe = artifact_recipe(art, given)
    out = [f"recipe {recipe.name}'s {recipe.smoke.kind} smoke test"] if recipe and recipe.smoke else []
    return out + (["the image's HEALTHCHECK"] if guest.health else [])


def skip_reason(art: Artifact, hypervisor: str = Hypervisor.QEMU) -> str | None:
    """Why `art` cannot be booted here (None: it can)."""
    if not art.has_kernel:
        return "the artifact has no kernel (--kernel none)"
    if hypervisor == Hypervisor.QEMU:
        machine = MACHINES.get(art.manifest.source.platform)
        if machine is None:
            return f"xbuild cannot run a {art.manifest.source.platform} guest under QEMU"
        if shutil.which(machine.binary) is None:
            return f"{machine.binary} is not installed ({install_hint(machine.binary)})"
    return None


def _health_args(art: Artifact) -> tuple[list[str], float]:
    """The probe's command-line overrides under verify and how long a verdict may take (seconds)."""
    h = art.manifest.guest.health
    if h is None:
        return [], 0.0
    start_s = min(-(-(h.start_period_ms + h.retries * h.interval_ms) // 1000), HEALTH_WAIT_MAX_S)
    wait = min(start_s + h.retries * (1 + h.timeout_ms / 1000) + 5, HEALTH_WAIT_MAX_S)
    return [
        "xbuild.health.interval=1",
        "xbuild.health.start_interval=1",
        f"xbuild.health.start_period={start_s}",
    ], wait


def _health_verdict(console: io.BytesIO, waiter: threading.Thread, deadline: float) -> str | None:
    """The first health state the init reports (None: the guest ended or `deadline` passed first)."""
    while True:
        m = next((m for m in map(HEALTH_RE.search, console.getvalue().splitlines()) if m), None)
        if m:
            return m["state"].decode()
        if not waiter.is_alive() or time.monotonic() >= deadline:
            return None
        waiter.join(0.25)


def verify_artifact(
    art: Artifact, log: Say = lambda m: None, hypervisor: str = Hypervisor.QEMU, given: Recipe | None = None
) -> str:
    """Boot `art` under `hypervisor` (qemu, or xen-nested as the artifact's xen_type), check its recipe's
    smoke test and its HEALTHCHECK (the entrypoint's exit status 0 when it has neither); return a
    one-line verdict or raise VerifyError."""
    guest = art.manifest.guest
    recipe = artifact_recipe(art, given)
    reason = skip_reason(art, hypervisor)
    if reason:
        raise VerifyError(f"{art.path}: cannot verify: {reason}")
    if hypervisor not in choices(VERIFY_HYPERVISORS):
        raise VerifyError(
            f"cannot verify under {hypervisor!r}: choose from {', '.join(choices(VERIFY_HYPERVISORS))}"
        )
    smoke = recipe.smoke if recipe else None
    health_args, health_wait = _health_args(art)
    ports = [(free_port(), p) for p in (recipe.guest_ports if recipe else ())]
    console = io.BytesIO()
    memory = max(guest.memory_mb, VERIFY_MEMORY_MB)
    # the nested rig boots Xen and dom0 (~10 s under TCG) before the guest
    slack = NESTED_SLACK_S if hypervisor == Hypervisor.XEN_NESTED else 0
    limit = (smoke.timeout if smoke else 60) + health_wait + 30 + slack
    stop = threading.Event()
    result: list[Any] = []
    xen_type = guest.xen_type
    qemu = (
        Qemu.for_artifact(
            art,
            ports=ports,
            memory_mb=memory,
            console=console,
            kernel_args=health_args,
            accel=choose_accel(Accel.AUTO, art.kernel, False, art.manifest.source.platform),
            network=bool(ports),
        )
        if hypervisor == Hypervisor.QEMU
        else None
    )

    def wait() -> None:
        from .run.xen import run_nested

        try:
            result.append(
                qemu.wait(limit, stop_event=stop)
                if qemu
                else run_nested(
                    art,
                    xen_type,
                    memory,
                    limit,
                    console=console,
                    ports=ports,
                    kernel_args=health_args,
                    stop_event=stop,
                    progress=log,
                )
            )
        except XbuildError as e:
            result.append(e)

    where = "QEMU" if qemu else f"nested Xen ({xen_type})"
    if qemu:
        qemu.start()

    checks = plan(art)
    log(f"verify: booting {art.path} under {where}" + (f" ({', '.join(checks)})" if checks else ""))
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    verdicts: list[str] = []
    try:
        if smoke is None and guest.health is None:
            waiter.join()
            status = result[0].exit_status if result and isinstance(result[0], RunResult) else None
            ok = status == 0
            verdicts.append(f"entrypoint exit status {status}")
        else:
            ok = True
            if recipe is not None and smoke is not None:
                if smoke.kind == "console":
                    waiter.join(smoke.timeout + slack)
                    ok, msg = smoke_test(recipe, console.getvalue())
                else:
                    ok, msg = smoke_test(
                        recipe,
                        b"",
                        {guest_port: host for host, guest_port in ports},
                        deadline=time.monotonic() + smoke.timeout + slack,
                    )
                verdicts.append(msg)
            if ok and guest.health is not None:
                state = _health_verdict(console, waiter, time.monotonic() + health_wait + slack)
                ok = state == "healthy"
                verdicts.append(
                    f"HEALTHCHECK {state}"
                    if state
                    else "HEALTHCHECK gave no verdict"
                    + (" (the guest ended first)" if not waiter.is_alive() else "")
                )
    finally:
        if waiter.is_alive():
            stop.set()
            waiter.join(60)
        if qemu:
            qemu.kill()
    msg = "; ".join(verdicts)
    if result and isinstance(result[0], XbuildError) and not ok:
        msg += f" ({result[0]})"
    if not ok:
        raise VerifyError(f"verify failed for {art.path}: {msg}{dropped_hint(art, console.getvalue())}")
    return f"verify: passed ({msg})"


def dropped_hint(art: Artifact, console: bytes) -> str:
    """'; dropped by minimize: /p (reason), …; keep …' for the dropped files a failed boot's console
    points at ('' when it points at none)."""
    items = [f"{path} ({reason})" for path, reason in likely_missing(art.manifest.minimize, console)]
    if not items:
        return ""
    return (
        f"; dropped by minimize: {', '.join(items)}; keep "
        f"{'it' if len(items) == 1 else 'them'} with the recipe's [keep] paths, or --minimize none"
    )
