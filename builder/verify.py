"""`--verify`: boot a built artifact under QEMU and run its recipe's smoke test against it.

A failure is a VerifyError naming the likely missing files (from the console and the minimize report).
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable

from .artifact import Artifact
from .errors import XbuildError
from .explain import likely_missing
from .recipes import Recipe, load_recipe, smoke_test
from .run.qemu import Qemu, choose_accel


class VerifyError(XbuildError):
    """The booted guest failed its smoke test."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verify_artifact(art: Artifact, log: Callable[[str], None] = lambda m: None) -> str:
    """Boot `art` and check its recipe's smoke test; return a one-line verdict or raise VerifyError."""
    name = art.manifest.get("guest", {}).get("recipe")
    recipe: Recipe | None = load_recipe(name) if name else None
    if not art.kernel.is_file():
        raise VerifyError(f"{art.path}: --verify needs a kernel in the artifact (built with --kernel none?)")
    smoke = recipe.smoke if recipe else None
    ports = [(free_port(), p) for p in (recipe.guest_ports if recipe else ())]
    console = io.BytesIO()
    memory = art.manifest.get("guest", {}).get("memory_mb", 256)
    guest = Qemu(art.path, ports=ports, memory_mb=max(memory, 64), console=console,
                 accel=choose_accel("auto", art.kernel, False), network=bool(ports))
    log(f"verify: booting {art.path} under QEMU" + (f" (smoke test: {smoke.kind})" if smoke else ""))
    result: list = []
    guest.start()
    waiter = threading.Thread(target=lambda: result.append(guest.wait((smoke.timeout if smoke else 60) + 30)),
                              daemon=True)
    waiter.start()
    try:
        if recipe is None or smoke is None:
            waiter.join()
            status = result[0].exit_status if result else None
            ok = status == 0
            msg = f"entrypoint exit status {status}"
        elif smoke.kind == "console":
            waiter.join(smoke.timeout)
            ok, msg = smoke_test(recipe, console.getvalue())
        else:
            ok, msg = smoke_test(recipe, b"", {guest_port: host for host, guest_port in ports})
    finally:
        if waiter.is_alive():
            guest.stop()
            waiter.join(40)
        guest.kill()
    if not ok:
        missing = likely_missing(art.manifest, console.getvalue())
        hint = f"; likely missing: {', '.join(missing)}" if missing else ""
        raise VerifyError(f"verify failed for {art.path}: {msg}{hint}")
    return f"verify: passed ({msg})"
