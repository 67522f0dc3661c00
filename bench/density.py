"""Density: the smallest guest memory at which each recipe's test image works, found by bisection; and
how many nginx look-alike guests run at once in a warm nested-Xen rig of a given size.

    python bench/density.py [RECIPE...] [--boot-only] [--lo MB] [--hi MB] [--timeout S]
                            [--compression C] [--minimize auto|none]
    python bench/density.py --warm-count [--rig-memory MB] [--memory MB] [--xen-type pv|pvh]
                            [--timeout S] [--max N]

For each recipe (default: every shipped recipe; each test image is the OCI layout its tests use,
tests/fixtures/build-*-oci.sh, built on first use) the image is built with its recipe (`--minimize auto`
unless --minimize says otherwise), then booted under QEMU at memory sizes chosen by bisection between
--lo and --hi (MB, 1 MB resolution):

- a boot passes when the recipe's smoke test passes (an HTTP GET, a TCP exchange or a console pattern),
  the test `xbuild build` verifies with; `--boot-only` instead passes when the init reached its exec
  marker with its whole tree (no "Initramfs unpacking failed", no panic, no `initramfs incomplete`), the
  measurement builder/memory.py's constants are calibrated against (NIC against a smoke test over a
  forwarded port: that boot has a NIC, and with it the synchronous unpack);
- the table gives per recipe the smallest passing memory, the artifact's computed minimum
  (`guest.min_memory_mb`: `xbuild run` refuses less), the formula's parts, and the boots it took.

Cost: each boot is a TCG boot (3-15 s on 2 cores under load; a failing one ends at once when the unpack
fails, else at --timeout), about 7 boots per recipe: 2-6 min per recipe. A guest that passes at --hi is
required (else the recipe is reported as failing at --hi).

`--warm-count`: the nginx look-alike (recipe nginx) is built at --memory MB (default: its computed
minimum), a warm rig of --rig-memory MB (Xen and dom0's 512 MB included) is started in a state directory of
its own, and guests are started in it one after another, each with its own forwarded port, until one fails
to start (xl cannot create it: no memory left) or does not answer its recipe's HTTP smoke test within
--timeout s, or --max guests run. Prints the count, the per-guest memory and the rig size; every guest and
the rig are stopped at the end. Cost: one rig boot and one nested boot per guest (30-120 s each on 2 cores
under load: the guests share the rig's 2 vCPUs).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from builder.artifact import Artifact  # noqa: E402
from builder.build import BuildOptions, build  # noqa: E402
from builder.errors import XbuildError  # noqa: E402
from builder.options import Accel  # noqa: E402
from builder.recipes import Recipe, load_recipe, smoke_test  # noqa: E402
from builder.run.qemu import Qemu  # noqa: E402
from builder.verify import free_port  # noqa: E402
from tests.fixtures.minimize_images import fixture_layout  # noqa: E402

RECIPES = ("static-hello", "busybox-httpd", "nginx", "redis", "python-web")


def boots(art: Artifact, recipe: Recipe, memory: int, boot_only: bool, timeout: float) -> tuple[bool, str]:
    """One boot at `memory` MB: (passed, why)."""
    smoke = recipe.smoke
    ports = [] if boot_only or smoke is None or smoke.kind == "console" else [(free_port(), smoke.port)]
    console = io.BytesIO()
    guest = Qemu.for_artifact(art, ports=ports, memory_mb=memory, console=console, accel=Accel.TCG)
    with guest:  # started here
        end = time.monotonic() + timeout
        while guest.pump(0.2) and time.monotonic() < end:
            w = guest.watcher
            if w.fatal or w.error or w.finished:
                break
            if boot_only and w.exec_seen_at is not None:
                break
            if ports and w.exec_seen_at is not None:
                ok, why = smoke_test(recipe, b"", {smoke.port: ports[0][0]}, deadline=end)  # type: ignore[union-attr]
                return ok, why
        w = guest.watcher
        if w.fatal or w.error:
            return False, w.fatal or w.error or ""
        if boot_only:
            return w.exec_seen_at is not None, "exec marker" if w.exec_seen_at else "no exec marker"
        if smoke is not None and smoke.kind == "console":
            return smoke_test(recipe, bytes(w.buf))
        return w.exit_status == 0, f"exit status {w.exit_status}"


def bisect(
    art: Artifact, recipe: Recipe, lo: int, hi: int, boot_only: bool, timeout: float
) -> tuple[int | None, int]:
    """The smallest passing memory in (lo, hi] (lo is taken to fail), and the number of boots."""
    n = 1
    ok, why = boots(art, recipe, hi, boot_only, timeout)
    print(f"  {recipe.name} {hi} MB: {'pass' if ok else 'FAIL'} ({why})", file=sys.stderr)
    if not ok:
        return None, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, why = boots(art, recipe, mid, boot_only, timeout)
        n += 1
        print(f"  {recipe.name} {mid} MB: {'pass' if ok else 'fail'} ({why})", file=sys.stderr)
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi, n


def warm_count(rig_mb: int, memory: int | None, xen_type: str, timeout: float, most: int) -> int:
    """Guests started in a warm rig of `rig_mb` until one fails (see the module docstring); 0 on success."""
    import os
    import threading

    from builder.run import warm, xen
    from builder.run.console import RunResult

    recipe = load_recipe("nginx")
    assert recipe.smoke is not None
    with tempfile.TemporaryDirectory(prefix="xbuild-density-warm-") as tmp:
        opts = BuildOptions(
            output=Path(tmp) / "nginx", recipe="nginx", memory_mb=memory or 16, log=lambda _m: None
        )
        art = build(fixture_layout("nginx"), opts)
        guest_mb = memory or art.manifest.guest.min_memory_mb or art.manifest.guest.memory_mb
        os.environ["XBUILD_RIG"] = str(Path(tmp) / "rig")
        warm.start(rig_mb)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        ended: list[RunResult | BaseException] = []
        count, why = 0, f"--max {most} reached"

        def run(port: int) -> None:
            try:
                ended.append(
                    xen.run_nested(
                        art,
                        xen_type,
                        guest_mb,
                        None,
                        console=io.BytesIO(),
                        ports=[(port, 80)],
                        stop_event=stop,
                    )
                )
            except BaseException as e:  # noqa: BLE001 - counted as this guest's failure
                ended.append(e)

        try:
            while count < most:
                port = free_port()
                t0 = time.monotonic()
                t = threading.Thread(target=run, args=(port,), daemon=True)
                t.start()
                threads.append(t)
                ok, said = smoke_test(recipe, b"", {80: port}, deadline=time.monotonic() + timeout)
                if not ok or ended:
                    why = f"guest {count + 1}: {ended[0] if ended else said}"
                    break
                count += 1
                print(f"  guest {count} answered in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
            warm.stop()
    print(
        f"warm rig {rig_mb} MB ({xen.DOM0_MEM_MB} MB dom0), nginx look-alike {xen_type} at {guest_mb} MB each"
    )
    print(f"guests answering at once: {count}; stopped because {why}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-count", action="store_true", help="count guests at once in a warm nested-Xen rig")
    ap.add_argument("--rig-memory", type=int, default=2048, help="--warm-count: the rig's memory, MB")
    ap.add_argument(
        "--memory", type=int, help="--warm-count: each guest's memory, MB [the artifact's minimum]"
    )
    ap.add_argument("--xen-type", default="pvh", choices=["pv", "pvh"], help="--warm-count: guest type")
    ap.add_argument("--max", type=int, default=64, help="--warm-count: stop after this many guests")
    ap.add_argument("recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--boot-only", action="store_true", help="pass = exec marker with the whole tree")
    ap.add_argument("--lo", type=int, default=16)
    ap.add_argument("--hi", type=int, default=256)
    ap.add_argument("--timeout", type=float, help="per boot, seconds [60; --warm-count: 300]")
    ap.add_argument(
        "--compression", default="zstd", help="build with this compression (zstd, lz4, gzip, none)"
    )
    ap.add_argument("--minimize", default="auto", help="build with this minimize mode (auto, none)")
    args = ap.parse_args()
    if args.warm_count:
        return warm_count(args.rig_memory, args.memory, args.xen_type, args.timeout or 300.0, args.max)
    args.timeout = args.timeout or 60.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="xbuild-density-") as tmp:
        for name in args.recipes:
            recipe = load_recipe(name)
            said: list[str] = []
            # built at the smallest memory: the build's warning line then states the formula's parts
            opts = BuildOptions(
                output=Path(tmp) / name,
                recipe=name,
                compression=args.compression,
                minimize=args.minimize,
                memory_mb=16,
                log=said.append,
            )
            try:
                art = build(fixture_layout(name), opts)
            except XbuildError as e:
                print(f"{name}: build failed: {e}", file=sys.stderr)
                return 1
            started = time.monotonic()
            found, n = bisect(art, recipe, args.lo, args.hi, args.boot_only, args.timeout)
            parts = next((m.partition("(")[2].partition(");")[0] for m in said if "minimum" in m), "")
            rows.append((name, found, art.manifest.guest.min_memory_mb, parts, n, time.monotonic() - started))
    what = "boots to exec" if args.boot_only else "smoke test passes"
    print(f"{'recipe':14} {what + ' at MB':>24} {'min_memory_mb':>14} {'boots':>6} {'s':>6}  formula parts")
    for name, found, minimum, parts, n, secs in rows:
        shown = str(found) if found is not None else f"> {args.hi}"
        print(f"{name:14} {shown:>24} {minimum!s:>14} {n:>6} {secs:6.0f}  {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
