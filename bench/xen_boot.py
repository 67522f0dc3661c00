"""Guest clock at exec under nested Xen, trimmed vs stock kernel, interleaved in one warm rig.

    python bench/xen_boot.py [--runs N] [--unpatched]
    python bench/xen_boot.py --phases

The same busybox artifact (xbuild's init, `sh -c true`) paired with the trimmed default kernel and Debian's
cloud kernel (with `--unpatched`, also the default kernel built without kernels/patches/: a kernel build
when it is not cached), each booted as a Xen PV and a PVH guest in one warm rig (builder/run/warm.py, Xen
4.17 under QEMU TCG, started here in a state directory of its own and stopped at the end). The kernels are
interleaved, N rounds (default 3) of trimmed, stock[, unpatched] per guest type, so that every kernel
sees the load of the same minutes. Prints each boot's host seconds from launch to the init's exec marker
and the guest's own boot clock at the marker, then per guest type the medians and the ratio of the medians.
Under the nested rig the guest clock is real time of a TCG guest: the load scales it, hence the medians of
interleaved runs; read the ratio, not the milliseconds.

`python bench/xen_boot.py --phases` prints where the time of one boot of the nginx look-alike goes, under
QEMU and as a Xen PV and PVH guest of the nested rig, each run with `-p` on port 80 (the same phases
`xbuild run --json` reports, builder/run/console.py): host seconds since launch to the first console byte,
to the init's first line, to its exec marker and to the first connection nginx accepted, and the guest's
boot clock at init start and at exec.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from kernel_boot import stock_kernel  # noqa: E402

from builder.artifact import open_artifact  # noqa: E402
from builder.build import BuildOptions, build  # noqa: E402
from builder.kernel import DEFAULT_FRAGMENTS, default_kernel  # noqa: E402
from builder.kernel import build as build_kernel  # noqa: E402
from builder.run import warm, xen  # noqa: E402
from tests.fixtures.images import make_busybox_image  # noqa: E402


def phases() -> int:
    from builder.run import qemu
    from builder.verify import free_port
    from tests.fixtures.minimize_images import fixture_layout

    with tempfile.TemporaryDirectory(prefix="xbuild-phases-bench-") as tmp:
        art = build(fixture_layout("nginx"), BuildOptions(output=Path(tmp) / "nginx", recipe="nginx"))
        memory = art.manifest.guest.memory_mb
        print(f"nginx look-alike, {memory} MB; host s since launch (guest boot clock ms)")
        print(f"{'run':12} {'first output':>12} {'init':>16} {'exec':>16} {'app ready':>10}")
        for name in ("qemu", "xen pv", "xen pvh"):
            ports = [(free_port(), 80)]
            with open("/dev/null", "wb") as null:
                if name == "qemu":
                    r = qemu.run(art, ports=ports, memory_mb=memory, timeout=30, console=null)
                else:
                    r = xen.run_nested(art, name.split()[1], memory, 300, console=null, ports=ports)
            p = r.phases

            def at(host: float | None, guest: int | None = None) -> str:
                shown = "-" if host is None else f"{host:.2f}"
                return shown + ("" if guest is None else f" ({guest / 1000:.0f})")

            print(
                f"{name:12} {at(p.first_output_s):>12} {at(p.init_s, p.init_us):>16} "
                f"{at(p.exec_s, p.exec_us):>16} {at(p.ready_s):>10}"
            )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", action="store_true", help="the phases of one nginx look-alike boot")
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds per guest type (default 3)")
    ap.add_argument("--unpatched", action="store_true", help="also the default kernel without the patches")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs: at least 1")
    if args.phases:
        return phases()
    with tempfile.TemporaryDirectory(prefix="xbuild-xen-bench-") as tmp:
        work = Path(tmp)
        img = make_busybox_image(
            work / "oci", config_overrides={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}
        )
        kernels = [("trimmed", default_kernel().path), ("stock", stock_kernel())]
        if args.unpatched:
            kernels.append(("unpatched", build_kernel(DEFAULT_FRAGMENTS, patched=False).path))
        variants = {}
        for name, kernel in kernels:
            art = build(img.ref, BuildOptions(output=work / name, kernel=str(kernel), log=lambda _m: None))
            variants[name] = open_artifact(art.path)
        os.environ["XBUILD_RIG"] = str(work / "rig")  # a warm rig of the bench's own
        warm.start()
        rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
        try:
            print(f"{'round':5} {'xen':4} {'kernel':9} {'launch→exec s':>14} {'guest ms at exec':>17}")
            for i in range(args.runs):
                for xen_type in ("pv", "pvh"):
                    for name, art in variants.items():
                        with open(os.devnull, "wb") as null:
                            r = xen.run_nested(art, xen_type, timeout=300, console=null)
                        if r.exit_status != 0 or r.launch_to_exec_s is None or r.boot_ms is None:
                            print(
                                f"{name} {xen_type}: exit {r.exit_status}, no exec marker? ({r.error})",
                                file=sys.stderr,
                            )
                            return 1
                        rows.setdefault((name, xen_type), []).append((r.launch_to_exec_s, r.boot_ms))
                        print(
                            f"{i + 1:5} {xen_type:4} {name:9} {r.launch_to_exec_s:14.2f} {r.boot_ms:17.0f}",
                            flush=True,
                        )
        finally:
            warm.stop()
    print(f"medians of {args.runs} interleaved runs:")
    for xen_type in ("pv", "pvh"):
        med = {
            name: (statistics.median(s for s, _g in runs), statistics.median(g for _s, g in runs))
            for (name, t), runs in rows.items()
            if t == xen_type
        }
        (tl, tg), (sl, sg) = med["trimmed"], med["stock"]
        line = (
            f"{xen_type}: guest ms at exec trimmed {tg:.0f}, stock {sg:.0f}: trimmed/stock {tg / sg:.2f}"
            f" (launch→exec {tl:.1f} / {sl:.1f} s: {tl / sl:.2f})"
        )
        if "unpatched" in med:
            line += f"; trimmed/unpatched guest ms {tg / med['unpatched'][1]:.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
