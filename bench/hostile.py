"""Peak memory of xbuild against inputs built to exhaust it: a layer that expands 1000x and a 50 MB config.

Run as `python bench/hostile.py [--expand-mib N]`. Both images are generated into a temp OCI layout:

- bomb: one gzip layer holding one file of N MiB of zeros (default 1024: ~1 MB on the wire, 1000x);
  built twice, with the decompressed-layer cap below the layer (refused) and above it (accepted,
  `--minimize none --compression none`, the 1 GiB file is packed);
- config: a 50 MB image config (one label of 50 MB), as an OCI layout; refused or accepted, its memory is
  what counts.

Each build is a subprocess; its own peak RSS is read from wait4(). Goal: every figure < 150 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.images import file, make_busybox_image, write_blob, write_oci_image

RSS_GOAL_MB = 150
CHUNK = 1 << 20


class _Zeros:
    """A file object of `n` zero bytes."""

    def __init__(self, n: int):
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


class _GzipSink:
    """Writes a gzip member to `out`, hashing the plain bytes (diff_id) and the compressed ones (digest)."""

    def __init__(self, out: Any):
        self.out, self.plain, self.packed = out, hashlib.sha256(), hashlib.sha256()
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self.size = 0

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.packed.update(data)
        self.size += len(data)

    def write(self, data: bytes) -> int:
        self.plain.update(data)
        self._emit(self.z.compress(data))
        return len(data)

    def finish(self) -> None:
        self._emit(self.z.flush())


def bomb_layout(layout: Path, mib: int) -> None:
    """An OCI layout tagged `bomb`: busybox plus a layer with /zeros of `mib` MiB."""
    make_busybox_image(layout, ref="bomb")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    tmp = layout / "bomb.tar.gz"
    with open(tmp, "wb") as out:
        sink = _GzipSink(out)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            info = tarfile.TarInfo("zeros")
            info.size, info.mode, info.mtime = mib << 20, 0o644, 1700000000
            tar.addfile(info, _Zeros(info.size))  # type: ignore[arg-type]
        sink.finish()
    digest = sink.packed.hexdigest()
    tmp.rename(layout / "blobs" / "sha256" / digest)
    manifest["layers"].append(
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": f"sha256:{digest}",
            "size": sink.size,
        }
    )
    config["rootfs"]["diff_ids"].append(f"sha256:{sink.plain.hexdigest()}")
    config["history"].append(config["history"][-1])
    manifest["config"] = write_blob(layout, json.dumps(config).encode(), manifest["config"]["mediaType"])
    desc = write_blob(layout, json.dumps(manifest).encode(), index["manifests"][0]["mediaType"])
    index["manifests"] = [dict(desc, annotations=index["manifests"][0]["annotations"])]
    (layout / "index.json").write_text(json.dumps(index))
    print(f"bomb layer: {sink.size / 1e6:.2f} MB gzip -> {mib} MiB ({(mib << 20) / sink.size:.0f}x)")


def config_layout(layout: Path, mb: int) -> None:
    """An OCI layout tagged `bigconfig` whose image config is `mb` MB (one huge label)."""
    write_oci_image(
        layout,
        "bigconfig",
        [[file("hello", b"hi\n")]],
        {"Cmd": ["/hello"]},
        image_config={"config": {"Cmd": ["/hello"], "Labels": {"big": "x" * (mb * 10**6)}}},
    )


def build(image: str, out: Path, cache: Path, *args: str) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS bytes, last stderr line) of one `xbuild build` subprocess."""
    exe = Path(sys.executable).with_name("xbuild")
    env = dict(os.environ, XBUILD_CACHE=str(cache))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(exe), "build", image, "-o", str(out), "--kernel", "none", "-q", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace").strip()
    _, status, usage = os.wait4(proc.pid, 0)
    return (
        os.waitstatus_to_exitcode(status),
        time.perf_counter() - start,
        usage.ru_maxrss * 1024,
        err.splitlines()[-1] if err else "",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expand-mib", type=int, default=1024)
    parser.add_argument("--config-mb", type=int, default=50)
    parser.add_argument("--generate", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:  # in a child: the builds' peak RSS must not start from the generator's memory
        bomb_layout(Path(args.generate) / "bomb", args.expand_mib)
        config_layout(Path(args.generate) / "config", args.config_mb)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="xbuild-bench-hostile-") as tmp:
        scratch = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--generate",
                tmp,
                "--expand-mib",
                str(args.expand_mib),
                "--config-mb",
                str(args.config_mb),
            ],
            check=True,
        )
        bomb, big = f"oci:{scratch}/bomb:bomb", f"oci:{scratch}/config:bigconfig"
        below = f"{args.expand_mib // 2}M"
        above = f"{args.expand_mib * 2}M"
        cases = [
            (f"layer x1000, cap {below} (refused)", bomb, ("--max-layer-size", below)),
            (
                f"layer x1000, cap {above} (accepted)",
                bomb,
                ("--max-layer-size", above, "--minimize", "none", "--compression", "none"),
            ),
            (f"config {args.config_mb} MB", big, ()),
        ]
        for i, (what, image, extra) in enumerate(cases):
            code, seconds, rss, last = build(image, scratch / f"out{i}", scratch / f"cache{i}", *extra)
            rows.append((what, code, seconds, rss / 2**20, last))
    print(f"{'case':40} {'exit':>4} {'wall':>7} {'peak RSS':>9}  goal < {RSS_GOAL_MB} MB")
    for what, code, seconds, mb, last in rows:
        verdict = "ok" if mb < RSS_GOAL_MB else "MISSED"
        print(f"{what:40} {code:4d} {seconds:6.1f}s {mb:7.0f}MB  {verdict}  {last[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
