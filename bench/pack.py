"""Image → zstd initramfs: xbuild (flatten + pack) vs `umoci unpack` + `find | sort | cpio` + `zstd -3`.

Run as `python bench/pack.py [--runs N] [LAYOUT[:TAG]]` (root, umoci, cpio, zstd); the default image is the
nginx look-alike of tests/fixtures (built on first use). The xbuild side runs `xbuild build --compression
zstd:3` in a subprocess from a warm layer cache (one untimed warm-up); both sides run N times, alternating,
and the medians are compared. Goals: time ratio <= 0.5, xbuild's peak RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.images import nginx_layout

TIME_GOAL, RSS_GOAL_MB = 0.5, 150
PIPELINE = (
    'set -euo pipefail; umoci unpack --image "$IMAGE" "$WORK/bundle" >/dev/null; '
    'cd "$WORK/bundle/rootfs"; '
    'find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -3 -q -o "$OUT"'
)


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `argv`; return (wall seconds, its own peak RSS in bytes). Fails loudly on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {stderr[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def xbuild(image: str, out: Path) -> tuple[float, int, int]:
    """(seconds, peak RSS, initrd bytes) of one `xbuild build`."""
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("xbuild")
    seconds, rss = run_child(
        [
            str(exe),
            "build",
            image,
            "-o",
            str(out),
            "--compression",
            "zstd:3",
            "--minimize",
            "none",
            "--kernel",
            "none",
            "-q",
        ]
    )
    return seconds, rss, (out / "initrd.img").stat().st_size


def pipeline(image: str, work: Path) -> tuple[float, int]:
    """(seconds, output bytes) of the unpack + cpio + zstd pipeline; the unpacked tree is removed after."""
    work.mkdir()
    out = work.parent / "pipeline.cpio.zst"
    env = dict(os.environ, IMAGE=image, WORK=str(work), OUT=str(out))
    out.unlink(missing_ok=True)
    seconds, _ = run_child(["bash", "-c", PIPELINE], env)
    shutil.rmtree(work)
    return seconds, out.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="OCI layout DIR[:TAG] (default: the nginx fixture)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    layout, _, tag = (args.image or f"{nginx_layout()}:nginx").partition(":")
    umoci_image, xbuild_image = f"{layout}:{tag or 'latest'}", f"oci:{layout}" + (f":{tag}" if tag else "")
    with tempfile.TemporaryDirectory(prefix="xbuild-bench-") as tmp:
        scratch = Path(tmp)
        xbuild(xbuild_image, scratch / "warm")  # fills the layer cache
        ours, theirs, rss = [], [], []
        for i in range(args.runs):
            seconds, peak, our_size = xbuild(xbuild_image, scratch / f"out{i}")
            ours.append(seconds)
            rss.append(peak)
            seconds, their_size = pipeline(umoci_image, scratch / f"work{i}")
            theirs.append(seconds)
    a, b = statistics.median(ours), statistics.median(theirs)
    peak_mb = max(rss) / 2**20
    print(f"image      {xbuild_image}   ({args.runs} runs each, alternating, medians)")
    print(f"{'':10} {'xbuild flatten+pack':>22} {'umoci+cpio+zstd -3':>22}")
    print(f"{'time':10} {a:21.2f}s {b:21.2f}s")
    print(f"{'output':10} {our_size / 1e6:20.1f}MB {their_size / 1e6:20.1f}MB")
    print(f"ratio      {a / b:.2f}  (goal <= {TIME_GOAL})  {'ok' if a / b <= TIME_GOAL else 'MISSED'}")
    print(
        f"peak RSS   {peak_mb:.0f} MB (xbuild)  (goal < {RSS_GOAL_MB} MB)  "
        f"{'ok' if peak_mb < RSS_GOAL_MB else 'MISSED'}"
    )
    print("runs       xbuild", *(f"{s:.2f}" for s in ours), " pipeline", *(f"{s:.2f}" for s in theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
