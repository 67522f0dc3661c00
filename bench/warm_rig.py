"""Warm vs cold nested-Xen rig: launch → exec of the same `xbuild run --hypervisor xen-nested`, side by side,
and where a warm run's time goes.

    python bench/warm_rig.py [--xen-type pv|pvh] [--repeat N] [--rig-memory MB] [--dom0-vcpus N [N ...]]

One artifact (the busybox image of bench/xen_boot.py: xbuild's init, `sh -c true`, the default kernel)
is run N times (default 1) as a cold run (QEMU, Xen and dom0 booted for the run, builder.run.xen) and as
a run in each warm rig (builder/run/warm.py; one rig per --dom0-vcpus value, started here in state
directories of their own and stopped at the end), alternating cold and warm. Prints, per run, host seconds
from the call to its return and from launch to the init's exec marker, the guest's boot clock at exec,
and for a warm run its phases in host seconds, each from the previous one:
  stage     the client copied kernel, initrd and config into the share (until jobs/ID is renamed in)
  notice    dom0's job loop took it (its `noticed` marker appeared)
  prep      dom0 set up the job (relays, lease watch, kernel and initrd copied to its tmpfs) until `creating`
  xl        until xenconsoled opened the guest's console log: xl read kernel and initrd, built the domain
  kernel    until the guest's first console byte reached the client
  exec      until the init's exec marker reached the client
  back      until the run returned (guest gone, `done`, the job directory removed)
Then each warm rig's start time (Xen + dom0 boot) and the warm/cold ratio of the launch → exec medians
(the goal: ≤ 0.3). Nested TCG is slow and the machine noisy: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from builder.build import BuildOptions, build  # noqa: E402
from builder.run import warm, xen  # noqa: E402
from tests.fixtures.images import make_busybox_image  # noqa: E402

PHASES = ("stage", "notice", "prep", "xl", "kernel", "exec", "back")


@dataclass(frozen=True)
class Row:
    kind: str
    total_s: float
    launch_to_exec_s: float
    boot_ms: float
    phases: dict[str, float]


def _watch(share: Path, marks: dict[str, float], stop: threading.Event) -> None:
    """Host monotonic times at which a warm job's files appeared (polled every 20 ms)."""
    while not stop.is_set():
        now = time.monotonic()
        for d in (share / "jobs").glob("[0-9]*"):
            marks.setdefault("staged", now)
            for name in ("noticed", "creating"):
                if (d / name).exists():
                    marks.setdefault(name, now)
        if any((share / "consoles").glob("guest-*.log")):
            marks.setdefault("domain", now)
        time.sleep(0.02)


def run_once(art: object, kind: str, state: Path, xen_type: str) -> Row:
    os.environ["XBUILD_RIG"] = str(state)
    marks: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(state / "share", marks, stop), daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with open(os.devnull, "wb") as null:
            r = xen.run_nested(art, xen_type, timeout=600, console=null)  # type: ignore[arg-type]
    finally:
        end = time.monotonic()
        stop.set()
        watcher.join()
    if r.exit_status != 0 or r.launch_to_exec_s is None or r.boot_ms is None:
        raise SystemExit(f"{kind}: exit {r.exit_status}, no exec marker? ({r.error})")
    phases: dict[str, float] = {}
    launch = marks.get("staged")
    first = r.phases.first_output_s
    if launch is not None and first is not None and {"noticed", "creating", "domain"} <= marks.keys():
        points = [t0, launch, marks["noticed"], marks["creating"], marks["domain"], launch + first]
        points += [launch + r.launch_to_exec_s, end]
        phases = {name: b - a for name, a, b in zip(PHASES, points[:-1], points[1:], strict=True)}
    return Row(kind, end - t0, r.launch_to_exec_s, r.boot_ms, phases)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xen-type", default="pv", choices=["pv", "pvh"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rig-memory", type=int, default=warm.DEFAULT_MEMORY_MB)
    ap.add_argument("--dom0-vcpus", type=int, nargs="+", default=[warm.DOM0_VCPUS])
    args = ap.parse_args()
    rows: list[Row] = []
    started: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="xbuild-warm-bench-") as tmp:
        work = Path(tmp)
        img = make_busybox_image(
            work / "oci", config_overrides={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}
        )
        art = build(img.ref, BuildOptions(output=work / "art", log=lambda _m: None))
        rigs = {f"warm{n}": work / f"rig{n}" for n in args.dom0_vcpus}
        try:
            for (kind, state), vcpus in zip(rigs.items(), args.dom0_vcpus, strict=True):
                os.environ["XBUILD_RIG"] = str(state)
                t0 = time.monotonic()
                warm.start(args.rig_memory, dom0_vcpus=vcpus)
                started[kind] = time.monotonic() - t0
            for _ in range(args.repeat):
                for kind, state in (("cold", work / "no-rig"), *rigs.items()):
                    rows.append(run_once(art, kind, state, args.xen_type))
        finally:
            for state in rigs.values():
                os.environ["XBUILD_RIG"] = str(state)
                warm.stop()
    print(
        f"xen-nested {args.xen_type}, busybox `sh -c true`; warmN: a warm rig ({args.rig_memory} MB)"
        f" whose dom0 has N vCPUs; started in " + ", ".join(f"{k} {s:.1f} s" for k, s in started.items())
    )
    head = f"{'rig':6} {'total s':>8} {'launch→exec s':>14} {'guest ms':>9}  "
    print(head + " ".join(f"{p:>6}" for p in PHASES))
    for row in rows:
        cells = " ".join(f"{row.phases[p]:6.2f}" if row.phases else f"{'-':>6}" for p in PHASES)
        print(f"{row.kind:6} {row.total_s:8.2f} {row.launch_to_exec_s:14.2f} {row.boot_ms:9.0f}  {cells}")
    cold = statistics.median(r.launch_to_exec_s for r in rows if r.kind == "cold")
    for kind in rigs:
        hot = statistics.median(r.launch_to_exec_s for r in rows if r.kind == kind)
        print(f"{kind}/cold launch→exec (medians): {hot / cold:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
