"""Tree → ext4 disk image: libguestfs (`write_disk`, no root) vs `mkfs.ext4 -d` (`mkfs_fast`, root).

Run as `python bench/disk.py [--format raw|qcow2] [LAYOUT[:TAG]]` (root); the default image is the nginx
look-alike of tests/fixtures (built on first use). The image is flattened once from a warm layer cache,
then each path writes it once (the libguestfs side includes the appliance launch, the cost that dominates)
and the two disks are compared: sizes, UUIDs, and whether their bytes are equal.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import disk
from builder.flatten import flatten
from builder.reference import parse
from builder.source import load
from builder.tree import Tree
from tests.fixtures.images import nginx_layout

EPOCH = 1_700_000_000


def timed(
    label: str, write: Callable[..., disk.DiskImage], tree: Tree, out: Path, fmt: str
) -> tuple[float, disk.DiskImage]:
    start = time.perf_counter()
    image = write(tree, out, fmt=fmt, epoch=EPOCH)
    seconds = time.perf_counter() - start
    on_disk = out.stat().st_blocks * 512
    print(
        f"{label:<22} {seconds:7.1f} s   virtual {image.size_bytes / 1e6:7.1f} MB   "
        f"allocated {on_disk / 1e6:6.1f} MB   sha256 {hashlib.sha256(out.read_bytes()).hexdigest()[:12]}"
    )
    return seconds, image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="OCI layout DIR[:TAG] (default: the nginx fixture)")
    parser.add_argument("--format", default="raw", choices=disk.FORMATS)
    args = parser.parse_args()
    layout, _, tag = (args.image or f"{nginx_layout()}:nginx").partition(":")
    ref = f"oci:{layout}" + (f":{tag}" if tag else "")
    start = time.perf_counter()
    tree = flatten(load(parse(ref))).tree
    use = disk.usage(tree)
    print(
        f"{ref}: flattened in {time.perf_counter() - start:.1f} s; {use.inodes} inodes, "
        f"{use.content_bytes / 1e6:.1f} MB content, auto size {disk.auto_size(tree) / 1e6:.1f} MB, "
        f"KVM {'unusable: TCG' if disk.force_tcg() else 'works'}"
    )
    with tempfile.TemporaryDirectory(prefix="xbuild-bench-") as tmp:
        ext = "img" if args.format == "raw" else "qcow2"
        d = Path(tmp)
        guest_s, guest = timed("libguestfs tar_in", disk.write_disk, tree, d / f"g.{ext}", args.format)
        fast_s, fast = timed("mkfs.ext4 -d (root)", disk.mkfs_fast, tree, d / f"m.{ext}", args.format)
        same = (d / f"g.{ext}").read_bytes() == (d / f"m.{ext}").read_bytes()
    print(
        f"ratio libguestfs / mkfs -d: {guest_s / fast_s:.1f}x; same UUID: {guest.uuid == fast.uuid}; "
        f"byte-identical: {same}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
