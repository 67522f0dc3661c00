"""The smallest guest memory an artifact boots in: what the kernel holds at the peak of a boot.

Two limits, the larger wins:

- the peak, at the end of the initramfs unpacking: the kernel image, the compressed initrd the boot loader
  placed in memory (freed only after unpacking), the decompressor's window and buffers, and the unpacked
  tree (every file rounded up to pages, a page per long symlink, an inode and a dentry per entry) are
  all held at once, with a fixed cost (the first MiB, firmware tables, boot page tables, per-cpu areas,
  early slab and hash tables, the init and its first program):

      peak = kernel span + initrd + window + tree + FIXED + NIC

  NIC is what a guest with a network interface adds (any artifact may be run with one: `xbuild run -p`,
  an artifact's network in xen.cfg). Unpacked asynchronously (the kernel's default), the unpack overlaps
  the device initcalls, and the NIC fills its receive ring on top of the peak: xen-netfront 256 pages
  (1 MiB) per queue when it connects, virtio-net less; the nginx look-alike with a vif failed the unpack
  at 32 MB under Xen PVH ("write error") and answered at 33, 2 MB above its exec minimum. So a guest with
  a NIC unpacks synchronously (`initramfs_async=0`, builder/run/cmdline.py): the unpack ends, the initrd
  and the window are freed, then the NIC probes. That unpack itself peaks up to 1 MiB higher than the
  asynchronous one (QEMU, the nginx look-alike with no NIC: async reaches exec at 31 MB, sync fails the
  unpack at 31 and passes at 32; not attributed further), so NIC = 1 MiB covers both the synchronous
  unpack's excess and a ring allocated after it (when the rest of the peak is the same or smaller)

- the root file system's own cap, in a stock kernel: with no `root=`, the kernel unpacks into a tmpfs whose
  default size is half of the memory the page allocator manages when it is mounted (the kernel image, the
  initrd and the boot-time reservations are not in it), so the files' pages must fit in that half:

      tmpfs = 2 x tree data + kernel span + initrd + RESERVED

  xbuild's own kernel has no such cap (kernels/patches/initramfs-all-memory.patch: the rootfs tmpfs may use
  all of memory, keeping the accounting the init's census reads, and running out is still "Initramfs
  unpacking failed: write error"); `root_uncapped` finds the patch's default options in the kernel image,
  and for such a kernel the tmpfs limit is 0 (the peak is the bound)

and the struct page array takes 64 bytes per 4 KiB page of guest memory (1/64 of it) from either. A third
limit is where the boot loader puts things: an ELF kernel is loaded at its physical addresses and QEMU (and
Xen's toolstack) place the initrd at the top of memory, so both must fit side by side, or the initrd lands on
the kernel and the guest dies before its first line (a kernel linked at 16 MB, 12 MB long, with a 5 MB
initrd, in 32 MB):

    placement = kernel load end + initrd + LOADER_TOP
    min_memory = max(max(peak, tmpfs) * 64/63, placement), rounded up to a MiB

The constants were calibrated by bisection against real boots under QEMU (`bench/density.py --boot-only`;
the README's Density section): the smallest memory at which the guest reaches the exec marker with its
whole tree. RESERVED: 296 MB for the python-web image unminimized (123.6 MiB of file data, tmpfs-bound:
3.5 MiB measured, plus a margin) with the kernel of that time (12.1 MiB span, linked at 16 MB). FIXED,
with today's kernel (6.1 MiB span, linked at 2 MB, initramfs-all-memory.patch) and zstd:9 initrds with
their 256 KiB window (kernels/README.md, "Guest memory"): static-hello 13 MB (deadlocked at 12: its
remainder 5.4-6.35 MiB) and the nginx look-alike 31 MB ("write error" at 30: 5.4-6.4 MiB), so FIXED is
6.25 MiB, and the formula gave exactly 13 and 31 before NIC was added; with it, 14 and 32, the nginx
look-alike's measured minimum with a NIC (HTTP under QEMU at 32, 31 fails; under Xen PV and PVH, with `-p`
in a warm rig, at 32, the rig's smallest guest; kernels/README.md). Below the result a guest fails to
unpack its initramfs ("Initramfs unpacking failed: write error" when its files' pages do not fit), is left
with a partial tree (the init's census refuses it), or (an unpatched kernel) the kernel deadlocks on
memory. The program's own memory is the program's: a recipe's `memory` (the smoke-tested figure of
`bench/density.py`) covers it.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from . import elf
from .compression import GZIP, LZ4, LZ4_LEGACY_CHUNK, NONE, ZSTD
from .elf import ELF_MAGIC
from .errors import KernelError
from .tree import FILE, SYMLINK, Tree

MIB = 1 << 20
ROOTFS_OPTIONS = b"size=100%\0"  # initramfs-all-memory.patch's default rootfs options, as in the image
PAGE = 4096
ENTRY_BYTES = 1024  # ramfs inode (~600 B) + dentry (192 B) + slab slack, per path
FIXED_BYTES = 6400 << 10  # 6.25 MiB, calibrated: see the module docstring
NIC_BYTES = 1 * MIB  # a guest with a NIC (its synchronous unpack, its receive ring): see the module docstring
RESERVED_BYTES = 6 * MIB  # calibrated: see the module docstring
SHORT_SYMLINK = 128  # tmpfs keeps a shorter symlink target in the inode, a longer one in a page
GZIP_BUFFERS = 256 << 10  # inflate's window and buffers
ZSTD_BLOCK = 128 << 10  # ZSTD_BLOCKSIZE_MAX: the unzstd output buffer, beside the frame's window
LOADER_TOP = 128 << 10  # what QEMU keeps free above the initrd (its ACPI tables) at the top of low memory


@dataclass(frozen=True)
class MemoryNeed:
    """The parts of the minimum, in bytes, and the minimum in MiB."""

    kernel: int
    initrd: int
    window: int
    tree: int  # everything the unpacked tree costs
    data: int  # its pages that count against the tmpfs's size
    fixed: int = FIXED_BYTES
    nic: int = NIC_BYTES
    reserved: int = RESERVED_BYTES
    load_end: int = 0  # the physical address an ELF kernel ends at (0: a relocatable bzImage)
    capped: bool = True  # the kernel's initramfs tmpfs is capped at half of memory (a stock kernel)

    @property
    def peak(self) -> int:
        return self.kernel + self.initrd + self.window + self.tree + self.fixed + self.nic

    @property
    def tmpfs(self) -> int:
        return 2 * self.data + self.kernel + self.initrd + self.reserved if self.capped else 0

    @property
    def placement(self) -> int:
        return self.load_end + self.initrd + LOADER_TOP if self.load_end else 0

    @property
    def min_mb(self) -> int:
        return math.ceil(max(max(self.peak, self.tmpfs) * 64 / 63, self.placement) / MIB)

    def summary(self) -> str:
        parts = (
            ("kernel", self.kernel),
            ("initrd", self.initrd),
            ("decompressor", self.window),
            ("tree", self.tree),
            ("fixed", self.fixed),
            ("nic", self.nic),
        )
        peak = " + ".join(f"{name} {size / MIB:.1f}" for name, size in parts)
        tmpfs = (
            f"tmpfs 2 x data {self.data / MIB:.1f} + kernel + initrd + {self.reserved / MIB:.1f} MiB"
            if self.capped
            else "tmpfs uncapped"
        )
        return f"peak {peak} MiB; {tmpfs}; +1/64 page array; placement {self.placement / MIB:.1f} MiB"


def tree_bytes(tree: Tree) -> tuple[int, int]:
    """What the unpacked tree costs the initramfs's tmpfs: (everything, the pages its size counts). Every
    entry has an inode and a dentry; files' pages (hardlinks share them) and long symlinks' pages count."""
    seen: set[int] = set()
    entries = data = 0
    for _path, node in tree.walk():
        entries += 1
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.kind == FILE:
            data += -(-node.size // PAGE) * PAGE
        elif node.kind == SYMLINK and len(os.fsencode(node.target)) >= SHORT_SYMLINK:
            data += PAGE
    return entries * ENTRY_BYTES + data, data


def _elf_loads(kernel: Path) -> list[tuple[int, int]]:
    """An ELF kernel's loadable segments as (physical address, size in memory); [] for any other file.
    KernelError if it is an ELF that cannot be read."""
    with kernel.open("rb") as f:
        if f.read(4) != ELF_MAGIC:
            return []
        return [(s.paddr, s.memsz) for s in elf.loads(f, f"kernel {kernel}", KernelError)]


def _setup_header(kernel: Path) -> bytes | None:
    """A bzImage's first 4 KiB (its boot protocol setup header), None for any other file."""
    with kernel.open("rb") as f:
        head = f.read(4096)
    return head if head[0x202:0x206] == b"HdrS" and len(head) >= 0x264 else None


def kernel_span(kernel: Path) -> int:
    """The memory the kernel image occupies once loaded: an ELF vmlinux's loadable segments from the
    first to the end of the last (the gaps between them stay reserved through the boot); a bzImage's
    setup header `init_size` (the linear memory it needs to decompress and run). A file that is neither
    counts twice its size."""
    loads = _elf_loads(kernel)
    if loads:
        return int(max(a + n for a, n in loads) - min(a for a, _ in loads))
    head = _setup_header(kernel)
    if head is not None:
        return int(struct.unpack_from("<I", head, 0x260)[0])
    return 2 * kernel.stat().st_size


def kernel_load_end(kernel: Path) -> int:
    """The physical address the kernel's image ends at where the loader must put it where it is linked: an
    ELF's last segment; a bzImage that is not relocatable, its `pref_address` + `init_size`. 0 where the
    loader may put it anywhere (a relocatable bzImage)."""
    loads = _elf_loads(kernel)
    if loads:
        return int(max(a + n for a, n in loads))
    head = _setup_header(kernel)
    if head is not None and not head[0x234]:  # relocatable_kernel
        return int(struct.unpack_from("<Q", head, 0x258)[0] + struct.unpack_from("<I", head, 0x260)[0])
    return 0


def root_uncapped(kernel: Path) -> bool:
    """Whether `kernel` lets its initramfs tmpfs use all of memory: its image (a bzImage's payload
    decompressed) holds initramfs-all-memory.patch's default rootfs options."""
    from .kernel import vmlinux

    data = kernel.read_bytes()
    try:
        image = vmlinux(kernel, data)
    except KernelError:  # an arm64 Image, or not a kernel we read: its bytes as they are
        image = data
    return ROOTFS_OPTIONS in image


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
    total, data = tree_bytes(tree)
    return MemoryNeed(
        kernel_span(kernel),
        initrd.stat().st_size,
        decompressor_bytes(initrd, compression),
        total,
        data,
        load_end=kernel_load_end(kernel),
        capped=not root_uncapped(kernel),
    )
