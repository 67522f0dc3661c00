"""Boot time to /init's marker: xbuild's default kernel vs Debian's cloud kernel, under QEMU TCG -icount.

Run as `python bench/kernel_boot.py [--runs N] [--arch arm64 [--cpu MODEL]]` with xbuild installed (make
venv). Both kernels boot the same initramfs: kernels/marker.c as /init (amd64: plus static busybox), which
prints `xbuild: exec <path> at <N>us` (N = CLOCK_BOOTTIME) and the time since reset, then powers off. With
`-icount shift=0,sleep=off` guest time is deterministic; the time since reset (the TSC on amd64, the
architected counter on arm64: `tsc` below) counts guest nanoseconds, so it also covers firmware and the
bzImage decompressor; CLOCK_BOOTTIME is inflated under TCG on amd64 (see kernels/README.md).

`--arch arm64`: xbuild's arm64 Image against Debian's arm64 cloud kernel (linux-image-cloud-arm64:arm64)
under `qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on` (`--cpu MODEL` to compare), the marker
cross-compiled with aarch64-linux-gnu-gcc.

`python bench/kernel_boot.py --cost FRAGMENT...` prices fragments instead: the default kernel without them
against the one with them (both built and cached by builder.kernel.build): stripped vmlinux and bzImage
sizes, TSC and marker times of one boot each (deterministic), the .config symbols that change, and the
initcalls only the larger kernel runs with their µs (one `initcall_debug` boot each, names from System.map).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from builder.cache import atomic_file, cache_dir
from builder.kernel import (
    DEFAULT_FRAGMENTS,
    KERNELS_DIR,
    Kernel,
    build,
    cmdline,
    default_kernel,
    parse_config,
)
from builder.run.qemu import MACHINES


@dataclass(frozen=True)
class Target:
    """What differs between the architectures measured: the emulator, console, marker compiler, reference."""

    arch: str
    qemu: tuple[str, ...]  # the emulator and its machine (QEMU_FLAGS follow)
    console: str
    cc: tuple[str, ...]  # the marker's compiler: the first found
    stock_package: str  # Debian's cloud kernel metapackage
    busybox: bool  # the host's static busybox in the marker initramfs (amd64, as measured since the start)


ARM64 = MACHINES["linux/arm64"]
TARGETS = {
    "amd64": Target(
        "amd64", ("qemu-system-x86_64",), "ttyS0", ("musl-gcc", "gcc"), "linux-image-cloud-amd64", True
    ),
    "arm64": Target(  # the machine `xbuild run` boots arm64 guests on
        "arm64",
        (ARM64.binary, "-M", ARM64.machine, "-cpu", ARM64.tcg_cpu),
        ARM64.console,
        ("aarch64-linux-gnu-gcc",),
        "linux-image-cloud-arm64",
        False,
    ),
}
AMD64 = TARGETS["amd64"]


def qemu_icount(memory_mb: int, qemu: tuple[str, ...] = AMD64.qemu) -> list[str]:
    """`qemu` (an emulator and its machine, a Target's) under TCG with `memory_mb` of RAM, guest time
    counted in instructions (deterministic), console on stdio, no network, no reboot: the argv every -icount
    bench boots with (`-kernel` ... to be appended)."""
    return [
        *qemu,
        *("-accel", "tcg", "-icount", "shift=0,sleep=off", "-m", str(memory_mb)),
        *("-nographic", "-no-reboot", "-net", "none"),
    ]


MARKER = re.compile(r"xbuild: exec (\S+) at (\d+)us")
TSC = re.compile(r"xbuild: tsc (\d+)")


@dataclass(frozen=True)
class Boot:
    """One boot: guest µs to the marker (CLOCK_BOOTTIME and TSC since reset), host wall seconds."""

    marker_us: int
    tsc_us: int | None
    wall_s: float
    console: str


def marker_initramfs(target: Target = AMD64) -> Path:
    """An uncompressed newc cpio: /dev/console, busybox (+ /bin/sh) where `target.busybox`, the marker
    program as /init.

    Cached by the hash of marker.c, the compiler's name and busybox.
    """
    cc = next((c for c in target.cc if shutil.which(c)), None)
    if cc is None:
        sys.exit(f"no compiler for the {target.arch} marker ({' or '.join(target.cc)})")
    busybox = shutil.which("busybox") if target.busybox else None
    if target.busybox and not busybox:
        sys.exit("busybox not found: apt-get install busybox-static")
    inputs = (KERNELS_DIR / "marker.c").read_bytes() + (
        Path(busybox).read_bytes() if busybox else cc.encode()
    )
    out = cache_dir("bench") / f"marker-initramfs-{hashlib.sha256(inputs).hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    init = cache_dir("bench") / f"marker-{target.arch}"
    subprocess.run([cc, "-static", "-Os", "-s", "-o", str(init), str(KERNELS_DIR / "marker.c")], check=True)
    entries = [("dev", 0o040755, b"", 0), ("dev/console", 0o020600, b"", (5 << 8) | 1)]
    if busybox:
        entries += [
            ("bin", 0o040755, b"", 0),
            ("bin/busybox", 0o100755, Path(busybox).read_bytes(), 0),
            ("bin/sh", 0o120777, b"busybox", 0),
        ]
    entries.append(("init", 0o100755, init.read_bytes(), 0))
    with atomic_file(out) as f:
        for ino, (name, mode, data, rdev) in enumerate(entries + [("TRAILER!!!", 0, b"", 0)], 1):
            f.write(_newc(ino, name, mode, data, rdev))
    return out


def _newc(ino: int, name: str, mode: int, data: bytes, rdev: int) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def stock_kernel(target: Target = AMD64) -> Path:
    """Debian's cloud kernel (vmlinuz) for `target`, fetched with apt-get download and unpacked into the
    cache once."""
    d = cache_dir("bench", "stock" if target.arch == "amd64" else f"stock-{target.arch}")
    found = sorted(glob.glob(str(d / "x/boot/vmlinuz-*")))
    if found:
        return Path(found[-1])
    meta = f"{target.stock_package}:{target.arch}"
    deps = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True, check=True)
    pkg = re.search(r"Depends: (linux-image-[^\s:]+)", deps.stdout)
    if not pkg:
        sys.exit(f"cannot resolve {meta}: {deps.stdout}")
    subprocess.run(["apt-get", "download", f"{pkg[1]}:{target.arch}"], cwd=d, check=True, capture_output=True)
    deb = max(d.glob(f"{pkg[1]}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(d / "x")], check=True)
    deb.unlink()
    return Path(max(glob.glob(str(d / "x/boot/vmlinuz-*"))))


def boot(
    kernel: Path, initrd: Path, append: str, timeout: float = 300, qemu: tuple[str, ...] = AMD64.qemu
) -> Boot:
    """Boot `kernel` under `qemu` (TCG, -icount) to the marker; raise RuntimeError if it never prints it."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [*qemu_icount(256, qemu), "-kernel", str(kernel), "-initrd", str(initrd), "-append", append],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    wall = time.monotonic() - t0
    console = proc.stdout.decode(errors="replace")
    m = MARKER.search(console)
    if not m:
        raise RuntimeError(f"{kernel}: no marker (qemu rc={proc.returncode})\n{console[-3000:]}")
    t = TSC.search(console)
    return Boot(int(m[2]), int(t[1]) // 1000 if t else None, wall, console)


def bzimage(kernel: Kernel) -> Path:
    """The bzImage an amd64 kernel is built with (the amd64 measurements compare it with the vmlinux)."""
    if kernel.bzimage is None:
        raise SystemExit(f"kernel {kernel.key[:12]} ({kernel.arch}) has no bzImage")
    return kernel.bzimage


INITCALL = re.compile(r"initcall (\S+) returned -?\d+ after (\d+) usecs")


def initcalls(kernel: Kernel, initrd: Path) -> dict[str, int]:
    """µs per initcall (named from the kernel's System.map) in one boot with `initcall_debug`."""
    names: dict[int, str] = {}
    for line in (kernel.path.parent / "System.map").read_text().splitlines():
        addr, _, name = line.split(maxsplit=2)
        names.setdefault(int(addr, 16), name)
    b = boot(kernel.path, initrd, f"console=ttyS0 panic=-1 {cmdline()} initcall_debug loglevel=8")
    out: dict[str, int] = {}
    for m in INITCALL.finditer(b.console):
        fn = names.get(int(m[1], 16), m[1]) if m[1].startswith("0x") else m[1].split("+")[0]
        out[fn] = out.get(fn, 0) + int(m[2])
    return out


def fragment_cost(names: list[str]) -> None:
    """Price fragments: the kernel of DEFAULT_FRAGMENTS without `names` against the kernel with them (both
    built by builder.kernel.build, so cached), as Markdown: sizes, boot time, the .config symbols that
    change, and the initcalls only the larger kernel runs (µs under initcall_debug)."""
    initrd = marker_initramfs()

    def say(line: str) -> None:
        if line.startswith("xbuild:"):
            print(line, file=sys.stderr)

    smaller = tuple(f for f in DEFAULT_FRAGMENTS if f not in names)
    larger = DEFAULT_FRAGMENTS + tuple(n for n in names if n not in DEFAULT_FRAGMENTS)
    kernels = [build(smaller, None, say), build(larger, None, say)]
    append = f"console=ttyS0 panic=-1 {cmdline()}"
    print(f"initramfs {initrd}; append: {append} [+ noapictimer]")
    print("| kernel | vmlinux MB | bzImage MB | TSC ms | marker ms | TSC ms, noapictimer |")
    print("|---|---|---|---|---|---|")
    rows = []
    for k in kernels:
        shipped, nolapic = boot(k.path, initrd, append), boot(k.path, initrd, f"{append} noapictimer")
        rows.append(
            (
                k.size / 1e6,
                bzimage(k).stat().st_size / 1e6,
                (shipped.tsc_us or 0) / 1e3,
                shipped.marker_us / 1e3,
                (nolapic.tsc_us or 0) / 1e3,
            )
        )
        cells = " | ".join(f"{v:.3f}" for v in rows[-1])
        print(f"| {'+'.join(k.fragments)} ({k.key[:12]}) | {cells} |")
    print("| difference | " + " | ".join(f"{b - a:+.3f}" for a, b in zip(*rows, strict=True)) + " |")
    before, after = (parse_config((k.path.parent / "config").read_text()) for k in kernels)
    changed = sorted(s for s in before.keys() | after.keys() if before.get(s, "n") != after.get(s, "n"))
    print(
        "\n.config symbols that change: "
        + " ".join(f"{s}={before.get(s, 'n')}->{after.get(s, 'n')}" for s in changed)
    )
    calls = [initcalls(k, initrd) for k in kernels]
    new = sorted(((us, fn) for fn, us in calls[1].items() if fn not in calls[0]), reverse=True)
    print(f"\ninitcalls only in the larger kernel: {sum(us for us, _ in new)} µs in all")
    for us, fn in new:
        print(f"  {us:>6} µs  {fn}")
    print(f"all initcalls: {sum(calls[0].values())} µs -> {sum(calls[1].values())} µs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="boots per kernel and flag set (the median is shown)")
    ap.add_argument(
        "--cost",
        nargs="+",
        metavar="FRAGMENT",
        help="price these fragments: the default kernel without them against the one with them",
    )
    ap.add_argument("--arch", choices=list(TARGETS), default="amd64", help="the guest architecture measured")
    ap.add_argument(
        "--cpu", help="arm64: the -cpu model [default: max,pauth-impdef=on, as `xbuild run` uses]"
    )
    args = ap.parse_args()
    if args.cost:
        fragment_cost(args.cost)
        return
    if args.arch != "amd64":
        arm64(TARGETS[args.arch], args.runs, args.cpu)
        return

    kernel = default_kernel(progress=lambda line: print(line, file=sys.stderr))
    stock = stock_kernel()
    initrd = marker_initramfs()
    kernels = [
        ("xbuild " + kernel.fmt, kernel.path, f"console=ttyS0 panic=-1 {cmdline()}"),
        ("xbuild bzImage", bzimage(kernel), f"console=ttyS0 panic=-1 {cmdline()}"),
        ("stock cloud", stock, "console=ttyS0 panic=-1 quiet"),
    ]
    sizes = {
        kernels[0][0]: kernel.size,
        kernels[1][0]: bzimage(kernel).stat().st_size,
        kernels[2][0]: stock.stat().st_size,
    }
    print(f"initramfs {initrd} ({initrd.stat().st_size} bytes); median of {args.runs} run(s)")
    print(
        f"xbuild kernel {kernel.key[:12]} {kernel.release} ({'+'.join(kernel.fragments)}), "
        f"cmdline: {cmdline()}; stock: {stock.name}"
    )
    for flags, note in TCG_FLAG_SETS:
        print(f"\n== extra flags {flags or '(none)'}: {note}")
        print(
            f"{'kernel':<16}{'size MB':>8}{'marker ms':>11}{'tsc ms':>9}{'wall s':>8}"
            "  (marker: CLOCK_BOOTTIME; tsc: guest time since reset)"
        )
        res = {}
        for name, path, append in kernels:
            res[name] = medians(path, initrd, f"{append} {flags}".strip(), args.runs)
            marker, tsc, wall = res[name]
            print(f"{name:<16}{sizes[name] / 1e6:>8.2f}{marker:>11.1f}{tsc:>9.1f}{wall:>8.2f}")
        s_marker, s_tsc, s_wall = res["stock cloud"]
        for name, _, _ in kernels[:2]:
            marker, tsc, wall = res[name]
            print(
                f"ratio {name} / stock: marker {marker / s_marker:.3f}  tsc {tsc / s_tsc:.3f}  "
                f"wall {wall / s_wall:.3f}"
            )


def medians(
    kernel: Path, initrd: Path, append: str, runs: int, qemu: tuple[str, ...] = AMD64.qemu
) -> tuple[float, float, float]:
    """`runs` boots of `kernel` to the marker: the medians of the marker's ms, the time-since-reset ms and
    the host's wall seconds."""
    boots = [boot(kernel, initrd, append, qemu=qemu) for _ in range(runs)]
    return (
        statistics.median(b.marker_us for b in boots) / 1000,
        statistics.median(b.tsc_us or 0 for b in boots) / 1000,
        statistics.median(b.wall_s for b in boots),
    )


def arm64(target: Target, runs: int, cpu: str | None) -> None:
    """xbuild's arm64 Image against Debian's arm64 cloud kernel, the marker's times and the ratio."""
    kernel = default_kernel(progress=lambda line: print(line, file=sys.stderr), arch=target.arch)
    stock = stock_kernel(target)
    initrd = marker_initramfs(target)
    qemu = target.qemu if cpu is None else (*target.qemu[: target.qemu.index("-cpu")], "-cpu", cpu)
    kernels = [
        (f"xbuild {kernel.fmt}", kernel.path, f"console={target.console} panic=-1 {cmdline(target.arch)}"),
        ("stock cloud", stock, f"console={target.console} panic=-1 quiet"),
    ]
    print(f"initramfs {initrd} ({initrd.stat().st_size} bytes); median of {runs} run(s); {' '.join(qemu)}")
    print(
        f"xbuild kernel {kernel.key[:12]} {kernel.release} ({'+'.join(kernel.fragments)}), "
        f"cmdline: {cmdline(target.arch)}; stock: {stock.name}"
    )
    print(f"{'kernel':<16}{'size MB':>8}{'marker ms':>11}{'tsc ms':>9}{'wall s':>8}")
    res = {}
    for name, path, append in kernels:
        res[name] = medians(path, initrd, append, runs, qemu)
        marker, tsc, wall = res[name]
        print(f"{name:<16}{path.stat().st_size / 1e6:>8.2f}{marker:>11.1f}{tsc:>9.1f}{wall:>8.2f}")
    (m, t, w), (sm, st, sw) = res[kernels[0][0]], res["stock cloud"]
    print(f"ratio xbuild / stock: marker {m / sm:.3f}  tsc {t / st:.3f}  wall {w / sw:.3f}")


TCG_FLAG_SETS = [
    ("", "as shipped"),
    (
        "noapictimer",
        (
            "TCG only: skips the LAPIC timer calibration (~107 ms of guest time), which Xen guests and "
            "CPUs with a TSC-deadline timer never run"
        ),
    ),
]


if __name__ == "__main__":
    main()
