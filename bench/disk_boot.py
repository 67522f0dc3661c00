"""A big image as an initramfs vs as a root disk: boot time to exec and the RAM left to the program.

Run as `python bench/disk_boot.py [--memory MB ...]` (root: the fixture is built with debootstrap on first
use). The image is the python-web fixture (Debian + python3, ~118 MB of files) built twice, not minimized,
with the default kernel: `--format initramfs` (zstd:3) and `--format disk`. Each boots under QEMU TCG
`-icount shift=0,sleep=off` (deterministic guest time; `noapictimer`, as `xbuild run` adds under TCG) with
the program replaced by `sh -c "grep Mem /proc/meminfo"`: the init's exec marker gives the boot time, the
meminfo lines what the program would have. Every memory size is tried for both formats; an initramfs that
does not fit in RAM fails to boot, which is the point of the disk format.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.artifact import Artifact
from builder.build import BuildOptions, build
from tests.fixtures.minimize_images import fixture_layout

QEMU = [
    "qemu-system-x86_64",
    "-accel",
    "tcg",
    "-icount",
    "shift=0,sleep=off",
    "-M",
    "pc",
    "-nographic",
    "-no-reboot",
    "-net",
    "none",
]
MARKER = re.compile(r"xbuild: exec \S+ at (\d+)us")
MEM = re.compile(r"(MemTotal|MemAvailable):\s+(\d+) kB")
PROBE = '-- sh -c "grep Mem /proc/meminfo"'


def boot(art: Artifact, memory_mb: int) -> str:
    """One boot; a line: exec time, MemTotal/MemAvailable, wall time, or why it did not get there."""
    cmdline = f"{(art.path / 'cmdline').read_text().strip()} noapictimer {PROBE}"
    argv = [
        *QEMU,
        "-m",
        str(memory_mb),
        "-kernel",
        str(art.kernel),
        "-initrd",
        str(art.initrd),
        "-append",
        cmdline,
    ]
    if art.disk:
        argv += ["-drive", f"file={art.disk},if=virtio,format={art.disk_format},snapshot=on"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=600, check=False)
    wall = time.monotonic() - t0
    out = proc.stdout.decode(errors="replace")
    m = MARKER.search(out)
    if not m:
        last = [line for line in out.splitlines() if line.strip()][-1:] or ["(no output)"]
        return f"did not boot ({last[0].strip()[:70]})"
    mem = {k: int(v) // 1024 for k, v in MEM.findall(out)}
    if not mem:
        said = [line.strip() for line in out.splitlines() if "xbuild: error" in line or "panic" in line]
        return f"exec at {int(m[1]) / 1000:7.1f} ms, the program failed: {' | '.join(said[-1:])[:100]}"
    return (
        f"exec at {int(m[1]) / 1000:7.1f} ms   MemTotal {mem.get('MemTotal', 0):4d} MB   "
        f"MemAvailable {mem.get('MemAvailable', 0):4d} MB   wall {wall:5.1f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, nargs="+", default=[128, 512], metavar="MB")
    args = parser.parse_args()
    ref = fixture_layout("python-web")
    with tempfile.TemporaryDirectory(prefix="xbuild-bench-") as tmp:
        arts = {}
        for fmt in ("initramfs", "disk"):
            t0 = time.monotonic()
            arts[fmt] = build(
                ref,
                BuildOptions(
                    output=Path(tmp) / fmt,
                    format=fmt,
                    minimize="none",
                    recipe="python-web",
                    compression="zstd",
                    level=3,
                ),
            )
            m = arts[fmt].manifest.to_json()
            disk = f", disk {m['disk']['size'] / 1e6:.1f} MB" if "disk" in m else ""
            took = time.monotonic() - t0
            print(
                f"{fmt:<9} built in {took:5.1f} s: initrd {m['initrd']['size'] / 1e6:.1f} MB"
                f" ({m['initrd']['uncompressed_size'] / 1e6:.1f} MB uncompressed){disk}"
            )
        for memory in args.memory:
            for fmt, art in arts.items():
                print(f"{memory:4d} MB  {fmt:<9}  {boot(art, memory)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
