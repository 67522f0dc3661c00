"""The smallest guest memory an artifact boots in: what the kernel holds at the peak of a boot.

The peak is the end of the initramfs unpacking: the kernel image, the compressed initrd the boot loader
placed in memory (freed only after unpacking), the decompressor's window and buffers, and the unpacked
tree in the initramfs's RAM file system (every file rounded up to pages, a page per symlink, an inode and
a dentry per entry) are all held at once. To that come a fixed cost (the first MiB, firmware tables, boot
page tables, per-cpu areas, early slab and hash tables, the init and its first program) and the struct
page array, 64 bytes per 4 KiB page of guest memory (1/64 of it).

    min_memory = (kernel span + initrd + window + tree + FIXED) * 64/63, rounded up to a MiB

The constants were calibrated by bisection against real boots under QEMU (`bench/density.py --calibrate`;
see the README's Density section): the smallest memory at which the guest reaches the exec marker with
its whole tree was found for a busybox image, the nginx look-alike and a larger unminimized tree, and
FIXED is the largest remainder seen plus a margin. Below the result a guest fails to unpack its
initramfs ("Initramfs unpacking failed"), is left with a partial tree, or the kernel deadlocks on memory;
at or above it the init runs. The program's own memory is the program's: a recipe's `memory` (the
smoke-tested figure of `bench/density.py`) covers it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .compression import GZIP, LZ4, LZ4_LEGACY_CHUNK, NONE, ZSTD
from .tree import FILE, SYMLINK, Tree

MIB = 1 << 20
PAGE = 4096
ENTRY_BYTES = 1024  # ramfs inode (~600 B) + dentry (192 B) + slab slack, per path
FIXED_BYTES = 8704 << 10  # 8.5 MiB, calibrated: see the module docstring
GZIP_BUFFERS = 256 << 10  # inflate's window and buffers
ZSTD_BLOCK = 128 << 10  # ZSTD_BLOCKSIZE_MAX: the unzstd output buffer, beside the frame's window


@dataclass(frozen=True)
class MemoryNeed:
    """The parts of the minimum, in bytes, and the minimum in MiB."""

    kernel: int
    initrd: int
    window: int
    tree: int
    fixed: int = FIXED_BYTES

    @property
    def min_mb(self) -> int:
        total = self.kernel + self.initrd + self.window + self.tree + self.fixed
        return math.ceil(total * 64 / 63 / MIB)

    def summary(self) -> str:
        parts = (
            ("kernel", self.kernel),
            ("initrd", self.initrd),
            ("decompressor", self.window),
            ("tree", self.tree),
            ("fixed", self.fixed),
        )
        return " + ".join(f"{name} {size / MIB:.1f}" for name, size in parts) + " MiB (+1/64: page array)"


def tree_bytes(tree: Tree) -> int:
    """What the unpacked tree costs the initramfs's RAM file system (hardlinks share their pages)."""
    seen: set[int] = set()
    total = 0
    for _path, node in tree.walk():
        total += ENTRY_BYTES
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.kind == FILE:
            total += -(-node.size // PAGE) * PAGE
        elif node.kind == SYMLINK:
            total += PAGE
    return total


def kernel_span(kernel: Path) -> int:
    """The memory the kernel image occupies once loaded: an ELF vmlinux's loadable segments from the
    first to the end of the last (the gaps between them stay reserved through the boot); a bzImage's
    setup header `init_size` (the linear memory it needs to decompress and run). A file that is neither
    counts twice its size."""
    with kernel.open("rb") as f:
        head = f.read(4096)
        if head[:4] == b"\x7fELF":
            from elftools.elf.elffile import ELFFile

            f.seek(0)
            loads = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
            if loads:
                start = min(s["p_paddr"] for s in loads)
                return int(max(s["p_paddr"] + s["p_memsz"] for s in loads) - start)
        if head[0x202:0x206] == b"HdrS" and len(head) >= 0x264:
            return int(struct.unpack_from("<I", head, 0x260)[0])
    return 2 * kernel.stat().st_size


def decompressor_bytes(initrd: Path, compression: str) -> int:
    """What the kernel's decompressor allocates to unpack `initrd`: for zstd, the frame's window (written
    in its header) and a block buffer; lz4's legacy format an 8 MiB chunk; gzip its window; none nothing."""
    if compression == ZSTD.name:
        import zstandard

        with initrd.open("rb") as f:
            window = zstandard.get_frame_parameters(f.read(18)).window_size
        return int(window) + ZSTD_BLOCK
    if compression == LZ4.name:
        return LZ4_LEGACY_CHUNK
    if compression == GZIP.name:
        return GZIP_BUFFERS
    assert compression == NONE.name, compression
    return 0


def memory_need(kernel: Path, initrd: Path, compression: str, tree: Tree) -> MemoryNeed:
    """The parts of the minimum memory for booting `kernel` with `initrd` (packed from `tree`)."""
    return MemoryNeed(
        kernel_span(kernel),
        initrd.stat().st_size,
        decompressor_bytes(initrd, compression),
        tree_bytes(tree),
    )
