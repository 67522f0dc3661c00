"""Launch → exec marker under nested Xen (`xbuild run --hypervisor xen-nested`), trimmed vs stock kernel.

One run, side by side: the same busybox artifact (xbuild's init, `sh -c true`) paired with the trimmed
default kernel and Debian's cloud kernel (with `--unpatched`, also the default kernel built without
kernels/patches/: a kernel build when it is not cached), each booted as a Xen PV and a PVH guest in
the nested rig (Xen 4.17 under QEMU TCG). Prints host wall time from launch to the init's exec marker,
the guest's own boot-clock time at the marker, and the ratios. Nested TCG is slow and the machine noisy:
read the ratio, not the seconds.

`python bench/xen_boot.py --phases` prints where the time of one boot of the nginx look-alike goes, under
QEMU and as a Xen PV and PVH guest of the nested rig, each run with `-p` on port 80 (the same phases
`xbuild run --json` reports, builder/run/console.py): host seconds since launch to the first console byte,
to the init's first line, to its exec marker and to the first connection nginx accepted, and the guest's
boot clock at init start and at exec.
"""

from __future__ import annotations

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
from builder.run import xen  # noqa: E402
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
    if sys.argv[1:] == ["--phases"]:
        return phases()
    unpatched = sys.argv[1:] == ["--unpatched"]
    with tempfile.TemporaryDirectory(prefix="xbuild-xen-bench-") as tmp:
        work = Path(tmp)
        img = make_busybox_image(
            work / "oci", config_overrides={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}
        )
        kernels = [("trimmed", default_kernel().path), ("stock", stock_kernel())]
        if unpatched:
            kernels.append(("unpatched", build_kernel(DEFAULT_FRAGMENTS, patched=False).path))
        variants = {}
        for name, kernel in kernels:
            variants[name] = build(img.ref, BuildOptions(output=work / name, kernel=str(kernel))).path
        rows = {}
        for xen_type in ("pv", "pvh"):
            for name, art in variants.items():
                r = xen.run_nested(open_artifact(art), xen_type, timeout=300, console=open("/dev/null", "wb"))  # noqa: SIM115
                if r.launch_to_exec_s is None or r.boot_ms is None:
                    print(f"{name} {xen_type}: no exec marker ({r.error})", file=sys.stderr)
                    return 1
                rows[name, xen_type] = (r.launch_to_exec_s, r.boot_ms)
    print(f"{'xen-nested':10} {'kernel':8} {'launch→exec s':>14} {'guest boot ms':>14}")
    for (name, xen_type), (launch, guest) in rows.items():
        print(f"{xen_type:10} {name:8} {launch:14.2f} {guest:14.0f}")
    for xen_type in ("pv", "pvh"):
        (tl, tg), (sl, sg) = rows["trimmed", xen_type], rows["stock", xen_type]
        line = f"{xen_type}: trimmed/stock launch→exec {tl / sl:.2f}, guest boot {tg / sg:.2f}"
        if unpatched:
            line += f"; trimmed/unpatched guest boot {tg / rows['unpatched', xen_type][1]:.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
