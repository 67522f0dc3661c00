"""The initrd compression table: build cost, size, peak RSS, guest unpack time and guest memory per codec.

Run as `nice -n 10 python bench/compression.py [--images nginx,java-http] [--no-guest]` (root; the images are
the nginx look-alike of tests/fixtures and the corpus's java-http, built on first use). Each image is
flattened once into an uncompressed cpio by `xbuild build --compression none --minimize none`; every
candidate then compresses that cpio in a child process, which reports its wall and CPU seconds, the
initrd's size and its own VmHWM (the peak RSS of the compressor, Python included). Candidates are what
xbuild writes (`builder.compression.compressor`, the codec table: zstd at levels 3-19 with the memory
bound's parameters and threads, lz4, gzip) plus zstd variants with another window or long-distance
matching (the table's parameters with one change, written by zstandard directly).

Guest unpack time: the default kernel boots each initrd under QEMU TCG with `-icount shift=0,sleep=off`
(guest time counts instructions, so it is deterministic) and `printk.time=1`; the figure is the console
timestamp of "Freeing initrd memory" minus that of "Unpacking initramfs" (or "Trying to unpack rootfs
image as initramfs"): the kernel's decompressor plus writing the same cpio into its rootfs, so the
differences between rows are the decompressors'. Guest memory is what that decompressor allocates beyond
the initrd itself: zstd's window (from the frame header), lz4's 8 MiB output block, gzip's 32 KiB window.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_boot import qemu_icount
from builder.compression import LZ4_LEGACY_CHUNK, ZSTD_DEFAULT_LEVEL

ZSTD_LEVELS = (3, 6, 9, 12, 15, 19)
GOAL_WALL, GOAL_SIZE, GOAL_RSS_MB = 2.5, 1.10, 150


@dataclass(frozen=True)
class Candidate:
    """One row: `codec` at `level`, with zstd parameter `changes` (window_log, enable_ldm...) and
    `threads` (None: what xbuild picks) applied to xbuild's own parameters for that level."""

    codec: str
    level: int
    changes: tuple[tuple[str, int], ...] = ()
    threads: int | None = None

    @property
    def label(self) -> str:
        extra = "".join(f" {k.replace('_log', '').replace('enable_', '')}={v}" for k, v in self.changes)
        return f"{self.codec}:{self.level}{extra}" + (f" t{self.threads}" if self.threads else "")


def candidates(quick: bool) -> list[Candidate]:
    """The rows: zstd levels (1 and 2 threads when not `quick`), wider windows and ldm, lz4 and gzip."""
    rows = [Candidate("zstd", lvl) for lvl in ZSTD_LEVELS]
    if not quick:
        rows += [Candidate("zstd", lvl, threads=1) for lvl in (3, ZSTD_DEFAULT_LEVEL)]
    rows += [
        Candidate("zstd", 9, (("window_log", 23),)),
        Candidate("zstd", 10, (("window_log", 23),)),
        Candidate("zstd", 12, (("window_log", 23),)),
        Candidate("zstd", 9, (("window_log", 23), ("enable_ldm", 1))),
        Candidate("lz4", 9),
        Candidate("gzip", 3),
    ]
    return rows


CHILD = r"""
import json, resource, sys, time, zstandard
from builder.compression import compressor, zstd_parameters
src, dst, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
with open(dst, "wb") as out:
    if spec["codec"] == "zstd" and (spec["changes"] or spec["threads"]):
        plan = zstd_parameters(spec["level"]).params
        fields = ("window_log", "chain_log", "hash_log", "search_log", "min_match", "target_length",
                  "strategy", "job_size", "overlap_log", "threads")
        kw = {k: getattr(plan, k) for k in fields} | dict(spec["changes"])
        if spec["threads"]:
            kw["threads"] = spec["threads"]
        params = zstandard.ZstdCompressionParameters(**kw)
        sink = zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False)
    else:
        sink = compressor(spec["codec"], out, spec["level"])
    with open(src, "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            sink.write(block)
    sink.close()
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "hwm": int(hwm.split()[1]) << 10}))
"""


def xbuild(argv: list[str]) -> tuple[float, int]:
    """Run `xbuild ARGV` (quiet); return (wall seconds, its VmHWM bytes, sampled from /proc while it runs)."""
    exe = Path(sys.executable).with_name("xbuild")
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), *argv, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = 0
    while proc.poll() is None:  # VmHWM of the child itself, sampled (ru_maxrss carries the parent's)
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = max(hwm, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) << 10)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"xbuild {' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    return wall, hwm


def compress(src: Path, dst: Path, cand: Candidate) -> dict[str, float]:
    """Compress `src` to `dst` as `cand` in a child; its wall, CPU seconds and VmHWM bytes."""
    spec = {"codec": cand.codec, "level": cand.level, "changes": list(cand.changes), "threads": cand.threads}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    return dict(json.loads(out))


def guest_memory(path: Path, codec: str) -> int:
    """Bytes the kernel's decompressor allocates for this initrd beyond the initrd itself."""
    if codec == "zstd":
        import zstandard

        with open(path, "rb") as f:
            return int(zstandard.get_frame_parameters(f.read(18)).window_size)
    return LZ4_LEGACY_CHUNK if codec == "lz4" else 32 << 10


UNPACK = re.compile(r"\[\s*(\d+\.\d+)\] (?:Unpacking initramfs|Trying to unpack rootfs image as initramfs)")
FREED = re.compile(r"\[\s*(\d+\.\d+)\] Freeing initrd memory")


def guest_unpack(bzimage: Path, initrd: Path, memory_mb: int) -> float:
    """Guest seconds (icount) from the kernel's "Unpacking initramfs" to "Freeing initrd memory"."""
    argv = [
        *qemu_icount(memory_mb),
        *("-kernel", str(bzimage), "-initrd", str(initrd), "-append"),
        "console=ttyS0 printk.time=1 loglevel=7 panic=-1 initramfs_async=0 rdinit=/xbuild-bench-none",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    start = None
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if (m := UNPACK.search(line)) and start is None:
                start = float(m.group(1))
            elif (m := FREED.search(line)) and start is not None:
                return float(m.group(1)) - start
    finally:
        proc.kill()
        proc.wait()
    raise SystemExit(f"no unpack lines on the console booting {initrd}")


def image_ref(name: str) -> str:
    """`oci:LAYOUT:TAG` of a fixture image: "nginx" (the look-alike) or a corpus application."""
    if name == "nginx":
        from tests.fixtures.images import nginx_layout

        return f"oci:{nginx_layout()}:nginx"
    from tests.fixtures.corpus import APPS, layout_ref

    return layout_ref(APPS[name])


def measure(name: str, rows: list[Candidate], guest: bool, scratch: Path) -> list[dict[str, object]]:
    """Every row of the table for image `name`."""
    from builder.kernel import default_kernel

    ref = image_ref(name)
    plain = scratch / name / "none"
    xbuild(
        ["build", ref, "-o", str(plain), "--compression", "none", "--minimize", "none", "--kernel", "none"]
    )
    cpio = plain / "initrd.img"
    bzimage = default_kernel().bzimage
    memory_mb = 512 + 3 * (cpio.stat().st_size >> 20)  # the initrd, its unpacked tree and the kernel's own
    out = []
    for cand in rows:
        dst = scratch / name / f"{cand.label.replace(' ', '_').replace(':', '-')}.img"
        got = compress(cpio, dst, cand)
        row: dict[str, object] = {"label": cand.label, "size": dst.stat().st_size, **got}
        row["window"] = guest_memory(dst, cand.codec)
        row["unpack"] = guest_unpack(bzimage, dst, memory_mb) if guest else None
        out.append(row)
        print(f"  measured {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        dst.unlink()
    return [{"label": "cpio (none)", "size": cpio.stat().st_size}, *out]


def print_table(name: str, rows: list[dict[str, object]]) -> None:
    """The table for one image, sizes and times beside zstd:3's and zstd:19's."""
    by = {r["label"]: r for r in rows}
    z3, z19 = by.get("zstd:3"), by.get("zstd:19")
    print(f"\n{name}: uncompressed cpio {int(rows[0]['size']) / 1e6:.1f} MB")  # type: ignore[call-overload]
    print(
        f"{'candidate':28} {'wall s':>7} {'cpu s':>7} {'×z3':>5} {'MB':>8} {'×z19':>6} "
        f"{'RSS MB':>7} {'unpack s':>9} {'window':>8}"
    )
    for r in rows[1:]:
        wall, cpu, size = float(r["wall"]), float(r["cpu"]), int(r["size"])  # type: ignore[arg-type, call-overload]
        rel = f"{wall / float(z3['wall']):5.2f}" if z3 else "    -"  # type: ignore[arg-type]
        srel = f"{size / int(z19['size']):6.3f}" if z19 else "     -"  # type: ignore[call-overload]
        unpack = f"{float(r['unpack']):9.3f}" if r["unpack"] is not None else "        -"  # type: ignore[arg-type]
        print(
            f"{str(r['label']):28} {wall:7.1f} {cpu:7.1f} {rel} {size / 1e6:8.2f} {srel} "
            f"{int(r['hwm']) / 2**20:7.0f} {unpack} {int(r['window']) / 2**20:6.2f}Mi"  # type: ignore[call-overload]
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="nginx,java-http", help="comma-separated: nginx, corpus apps")
    parser.add_argument("--no-guest", action="store_true", help="skip the QEMU unpack boots")
    parser.add_argument("--quick", action="store_true", help="no single-thread rows")
    parser.add_argument("--only", help="comma-separated candidate labels (e.g. zstd:3,zstd:19,lz4:9)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="xbuild-bench-compression-") as tmp:
        rows = candidates(args.quick)
        if args.only:
            rows = [c for c in rows if c.label in args.only.split(",")]
        for name in args.images.split(","):
            results[name] = measure(name, rows, not args.no_guest, Path(tmp))
            print_table(name, results[name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"\ngoals: default wall <= {GOAL_WALL}× zstd:3, size <= {GOAL_SIZE}× zstd:19, RSS < {GOAL_RSS_MB} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
