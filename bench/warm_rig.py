"""Warm vs cold nested-Xen rig: launch → exec of the same `xbuild run --hypervisor xen-nested`, side by side.

    python bench/warm_rig.py [--xen-type pv|pvh] [--repeat N] [--rig-memory MB]

One artifact (the busybox image of bench/xen_boot.py: xbuild's init, `sh -c true`, the default kernel)
is run N times (default 1) as a cold run (QEMU, Xen and dom0 booted for the run, builder.run.xen) and as
a run in a warm rig (builder/run/warm.py, started once here in a state directory of its own and stopped
at the end), alternating cold and warm. Prints host seconds from launch to the init's exec marker and the
guest's boot clock at exec for each, the warm rig's own start time, and the warm/cold ratio of the
medians (the goal: ≤ 0.3). Nested TCG is slow and the machine noisy: read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from builder.build import BuildOptions, build  # noqa: E402
from builder.run import warm, xen  # noqa: E402
from tests.fixtures.images import make_busybox_image  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xen-type", default="pv", choices=["pv", "pvh"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rig-memory", type=int, default=warm.DEFAULT_MEMORY_MB)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xbuild-warm-bench-") as tmp:
        work = Path(tmp)
        img = make_busybox_image(
            work / "oci", config_overrides={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}
        )
        art = build(img.ref, BuildOptions(output=work / "art", log=lambda _m: None))
        cold_dir, warm_dir = work / "no-rig", work / "rig"
        os.environ["XBUILD_RIG"] = str(warm_dir)
        t0 = time.monotonic()
        warm.start(args.rig_memory)
        started = time.monotonic() - t0
        rows: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
        try:
            for _ in range(args.repeat):
                for kind, state in (("cold", cold_dir), ("warm", warm_dir)):
                    os.environ["XBUILD_RIG"] = str(state)
                    with open(os.devnull, "wb") as null:
                        r = xen.run_nested(art, args.xen_type, timeout=600, console=null)
                    if r.exit_status != 0 or r.launch_to_exec_s is None or r.boot_ms is None:
                        print(f"{kind}: exit {r.exit_status}, no exec marker? ({r.error})", file=sys.stderr)
                        return 1
                    rows[kind].append((r.launch_to_exec_s, r.boot_ms))
        finally:
            os.environ["XBUILD_RIG"] = str(warm_dir)
            warm.stop()
    print(
        f"xen-nested {args.xen_type}, busybox `sh -c true`;"
        f" warm rig ({args.rig_memory} MB) started in {started:.1f} s"
    )
    print(f"{'rig':6} {'launch→exec s':>14} {'guest boot ms':>14}")
    for kind, runs in rows.items():
        for launch, guest in runs:
            print(f"{kind:6} {launch:14.2f} {guest:14.0f}")
    cold, hot = (statistics.median(x for x, _ in rows[k]) for k in ("cold", "warm"))
    print(f"warm/cold launch→exec (medians): {hot / cold:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
