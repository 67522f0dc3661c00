"""Image → zstd initramfs: xbuild (flatten + pack) vs `umoci unpack` + `find | sort | cpio` + `zstd -3`.

Run as `python bench/pack.py [--runs N] [LAYOUT[:TAG] ...]` (root, umoci, cpio, zstd); the default images
are the nginx look-alike of tests/fixtures and the corpus's java-http (> 200 MB unminimized), built on
first use. The xbuild side runs `xbuild build --minimize none` in a subprocess from a warm layer cache
(one untimed warm-up), at `--compression zstd:3` and at the default settings; the pipeline and xbuild run
N times, alternating, and the medians are compared. The floor is reading and decompressing every layer
blob once (builder.compression.reader, in this process). Goals: zstd:3 time ratio <= 0.5 of the
pipeline; the default's wall <= 2.5× zstd:3's; xbuild's peak RSS < 150 MB at both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.compression import LAYER_CODECS, reader, sniff
from tests.fixtures.corpus import APPS, layout_ref
from tests.fixtures.images import nginx_layout

TIME_GOAL, DEFAULT_GOAL, RSS_GOAL_MB = 0.5, 2.5, 150
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


def xbuild(image: str, out: Path, compression: str | None = "zstd:3") -> tuple[float, int, int]:
    """(seconds, peak RSS, initrd bytes) of one `xbuild build` at `compression` (None: the default)."""
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("xbuild")
    flags = ["--compression", compression] if compression else []
    argv = [str(exe), "build", image, "-o", str(out), *flags, "--minimize", "none", "--kernel", "none", "-q"]
    seconds, rss = run_child(argv)
    return seconds, rss, (out / "initrd.img").stat().st_size


def floor(layout: Path, tag: str) -> float:
    """Seconds to read and decompress every layer blob of `layout`'s image `tag` once."""
    blob = lambda digest: layout / "blobs" / Path(*digest.split(":"))  # noqa: E731
    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(ref) == tag)
    layers = json.loads(blob(desc["digest"]).read_bytes())["layers"]
    start = time.perf_counter()
    for layer in layers:
        with open(blob(layer["digest"]), "rb") as f:
            codec = sniff(f.read(8), LAYER_CODECS)
            f.seek(0)
            with reader(codec, f) as r:
                while r.read(1 << 20):
                    pass
    return time.perf_counter() - start


def pipeline(image: str, work: Path) -> tuple[float, int]:
    """(seconds, output bytes) of the unpack + cpio + zstd pipeline; the unpacked tree is removed after."""
    work.mkdir()
    out = work.parent / "pipeline.cpio.zst"
    env = dict(os.environ, IMAGE=image, WORK=str(work), OUT=str(out))
    out.unlink(missing_ok=True)
    seconds, _ = run_child(["bash", "-c", PIPELINE], env)
    shutil.rmtree(work)
    return seconds, out.stat().st_size


def bench(image: str, runs: int, scratch: Path) -> None:
    """Print one image's figures: xbuild at zstd:3 and at the default, the pipeline and the floor."""
    layout, _, tag = image.partition(":")
    umoci_image, xbuild_image = f"{layout}:{tag or 'latest'}", f"oci:{layout}" + (f":{tag}" if tag else "")
    xbuild(xbuild_image, scratch / "warm")  # fills the layer cache
    ours: dict[str | None, list[float]] = {"zstd:3": [], None: []}
    rss: dict[str | None, list[int]] = {"zstd:3": [], None: []}
    size: dict[str | None, int] = {}
    theirs, floors = [], []
    for i in range(runs):
        for compression in ours:
            seconds, peak, size[compression] = xbuild(xbuild_image, scratch / f"out{i}", compression)
            ours[compression].append(seconds)
            rss[compression].append(peak)
        seconds, their_size = pipeline(umoci_image, scratch / f"work{i}")
        theirs.append(seconds)
        floors.append(floor(Path(layout), tag or "latest"))
    a, d, b, f = (statistics.median(x) for x in (ours["zstd:3"], ours[None], theirs, floors))
    print(f"image      {xbuild_image}   ({runs} runs each, alternating, medians)")
    print(f"{'':10} {'xbuild zstd:3':>16} {'xbuild default':>16} {'umoci+cpio+zstd -3':>20} {'floor':>10}")
    print(f"{'time':10} {a:15.2f}s {d:15.2f}s {b:19.2f}s {f:9.2f}s")
    print(
        f"{'output':10} {size['zstd:3'] / 1e6:14.1f}MB {size[None] / 1e6:14.1f}MB {their_size / 1e6:18.1f}MB"
    )
    peaks = {c: max(v) / 2**20 for c, v in rss.items()}
    print(f"{'peak RSS':10} {peaks['zstd:3']:14.0f}MB {peaks[None]:14.0f}MB")
    print(
        f"ratio      zstd:3/pipeline {a / b:.2f}  (goal <= {TIME_GOAL})  "
        f"{'ok' if a / b <= TIME_GOAL else 'MISSED'}"
    )
    print(
        f"ratio      default/zstd:3 {d / a:.2f}  (goal <= {DEFAULT_GOAL})  "
        f"{'ok' if d / a <= DEFAULT_GOAL else 'MISSED'};  default/floor {d / f:.1f}"
    )
    print(
        f"peak RSS   {max(peaks.values()):.0f} MB (xbuild)  (goal < {RSS_GOAL_MB} MB)  "
        f"{'ok' if max(peaks.values()) < RSS_GOAL_MB else 'MISSED'}"
    )
    print(
        "runs       zstd:3",
        *(f"{s:.2f}" for s in ours["zstd:3"]),
        " default",
        *(f"{s:.2f}" for s in ours[None]),
    )
    print("           pipeline", *(f"{s:.2f}" for s in theirs), " floor", *(f"{s:.2f}" for s in floors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="OCI layouts DIR[:TAG] (default: nginx and java-http)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    images = args.images or [f"{nginx_layout()}:nginx", layout_ref(APPS["java-http"]).removeprefix("oci:")]
    for image in images:
        with tempfile.TemporaryDirectory(prefix="xbuild-bench-") as tmp:
            bench(image, args.runs, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
