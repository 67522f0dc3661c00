"""Pack: write a `Tree` as a reproducible cpio `newc` initramfs, compressed for the kernel.

Entries come in depth-first order with names sorted bytewise (parents before children), inodes are
renumbered from 1 in that order, mtimes are clamped to the epoch (SOURCE_DATE_EPOCH), hardlinked
paths share an inode number and carry the data on their last occurrence (as GNU cpio does; the
kernel accepts it on any). The same tree gives the same bytes on any machine.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import lz4.block
import zstandard
from isal import isal_zlib

from .blobs import HashingWriter
from .cache import atomic_file
from .errors import PackError
from .tree import DIR, FILE, Content, Inode, Tree

COMPRESSIONS = ("zstd", "lz4", "gzip", "none")
DEFAULT_COMPRESSION = "zstd"
DEFAULT_LEVELS = {"zstd": 19, "lz4": 9, "gzip": 3, "none": 0}
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_CHUNK = 8 << 20          # the kernel's unlz4 reads 8 MiB blocks
TRAILER = "TRAILER!!!"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Packed:
    path: Path
    compression: str
    level: int
    size: int                 # compressed bytes
    uncompressed_size: int    # cpio bytes
    sha256: str
    entries: int


def pack(tree: Tree, out: Path, compression: str = DEFAULT_COMPRESSION, level: int | None = None,
         epoch: int | None = None, progress: Callable[[int], None] | None = None) -> Packed:
    """Write `tree` to `out` (atomically) and return what was written."""
    if compression not in COMPRESSIONS:
        raise PackError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    lvl = DEFAULT_LEVELS[compression] if level is None else level
    try:
        with atomic_file(out) as f:
            hashing = HashingWriter(f)
            sink = _compressor(compression, lvl, hashing)
            writer = _CpioWriter(sink, epoch, progress)
            count = writer.write_tree(tree)
            sink.close()
    except OSError as e:
        raise PackError(f"cannot write {out}: {e}") from None
    return Packed(out, compression, lvl, hashing.count, writer.offset, hashing.hash.hexdigest(), count)


def write_cpio(out: BinaryIO, tree: Tree, epoch: int | None = None) -> int:
    """Write `tree` as one uncompressed newc archive (the rules above) to the open `out`; return its size
    (a multiple of 4: another archive can follow, as the kernel reads concatenated ones)."""
    writer = _CpioWriter(out, epoch, None)
    writer.write_tree(tree)
    return writer.offset


class _Lz4Legacy:
    """The lz4 'legacy' frame the kernel's initramfs unpacker reads (`lz4 -l`)."""

    def __init__(self, out: HashingWriter, level: int):
        self.out, self.level, self.buf = out, level, bytearray()
        out.write(LZ4_LEGACY_MAGIC)

    def write(self, b: bytes) -> int:
        self.buf += b
        while len(self.buf) >= LZ4_LEGACY_CHUNK:
            self._block(bytes(self.buf[:LZ4_LEGACY_CHUNK]))
            del self.buf[:LZ4_LEGACY_CHUNK]
        return len(b)

    def _block(self, data: bytes) -> None:
        mode = "high_compression" if self.level > 2 else "default"
        comp = lz4.block.compress(data, mode=mode, compression=self.level, store_size=False)
        self.out.write(len(comp).to_bytes(4, "little") + comp)

    def close(self) -> None:
        if self.buf:
            self._block(bytes(self.buf))
            self.buf.clear()


class _Gzip:
    def __init__(self, out: HashingWriter, level: int):
        self.out = out
        # wbits 31: gzip container with a zeroed mtime, so the output is reproducible
        self.z = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)

    def write(self, b: bytes) -> int:
        self.out.write(self.z.compress(b))
        return len(b)

    def close(self) -> None:
        self.out.write(self.z.flush())


class _Plain:
    def __init__(self, out: HashingWriter):
        self.out = out

    def write(self, b: bytes) -> int:
        return self.out.write(b)

    def close(self) -> None:
        pass


class _Zstd:
    def __init__(self, out: HashingWriter, level: int):
        # multi-threaded zstd output depends only on the parameters, never on the thread count (>= 1)
        params = zstandard.ZstdCompressionParameters.from_level(level, threads=max(1, os.cpu_count() or 1))
        self.w = zstandard.ZstdCompressor(compression_params=params).stream_writer(
            out, closefd=False)  # type: ignore[arg-type]

    def write(self, b: bytes) -> int:
        return self.w.write(b)

    def close(self) -> None:
        self.w.close()


def _compressor(name: str, level: int, out: HashingWriter):  # type: ignore[no-untyped-def]
    if name == "zstd":
        return _Zstd(out, level)
    if name == "lz4":
        return _Lz4Legacy(out, level)
    if name == "gzip":
        return _Gzip(out, level)
    return _Plain(out)


class _CpioWriter:
    def __init__(self, out, epoch: int | None, progress: Callable[[int], None] | None):  # type: ignore
        self.out, self.epoch, self.progress = out, epoch, progress
        self.offset = 0
        self.fds: dict[str, int] = {}

    def _emit(self, b: bytes) -> None:
        self.out.write(b)
        self.offset += len(b)

    def _pad(self) -> None:
        if self.offset % 4:
            self._emit(b"\0" * (4 - self.offset % 4))

    def header(self, name: str, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, size: int,
               rdev: tuple[int, int] = (0, 0)) -> None:
        raw = os.fsencode(name) + b"\0"
        fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(raw), 0)
        if max(fields) > 0xFFFFFFFF:  # newc has 32-bit fields: never truncate silently
            raise PackError(f"/{name}: too large for cpio newc's 32-bit fields (size {size}, uid {uid}, "
                            f"gid {gid})")
        self._emit(b"070701" + b"".join(b"%08X" % (v & 0xFFFFFFFF) for v in fields) + raw)
        self._pad()

    def write_tree(self, tree: Tree) -> int:
        entries = list(tree.walk())
        # group hardlinks: paths sharing an Inode object; the data goes with the last one
        links: dict[int, list[int]] = {}
        for i, (_, node) in enumerate(entries):
            if node.kind != DIR:
                links.setdefault(id(node), []).append(i)
        inos: dict[int, int] = {}
        try:
            for i, (path, node) in enumerate(entries):
                ino = inos.setdefault(id(node), len(inos) + 1)
                group = links.get(id(node), [i])
                data_here = group[-1] == i
                mtime = node.mtime if self.epoch is None else min(node.mtime, self.epoch)
                mtime = min(max(mtime, 0), 0xFFFFFFFF)
                if node.kind == FILE:
                    size = node.size if data_here else 0
                elif node.kind == "symlink":
                    size = len(os.fsencode(node.target))
                else:
                    size = 0
                self.header(path or ".", ino, node.st_mode, node.uid, node.gid,
                            len(group) if node.kind != DIR else 2, mtime, size, node.rdev)
                if size:
                    self._body(node)
            self.header(TRAILER, 0, 0, 0, 0, 1, 0, 0)
        finally:
            for fd in self.fds.values():
                os.close(fd)
        return len(entries)

    def _body(self, node: Inode) -> None:
        if node.kind == "symlink":
            self._emit(os.fsencode(node.target))
        elif isinstance(node.content, bytes):
            self._emit(node.content)
        elif isinstance(node.content, Content):
            c = node.content
            fd = self.fds.get(c.source)
            if fd is None:
                fd = self.fds[c.source] = os.open(c.source, os.O_RDONLY)
            pos, end = c.offset, c.offset + c.size
            while pos < end:
                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                if not chunk:
                    raise PackError(f"{c.source}: content ends early (cache corrupted?)")
                self._emit(chunk)
                pos += len(chunk)
            if self.progress:
                self.progress(c.size)
        self._pad()


def read_cpio(data: bytes) -> list[dict[str, object]]:
    """Parse an uncompressed newc archive into a list of entries (for tests and `explain`)."""
    out: list[dict[str, object]] = []
    pos = 0
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "size", "devmajor", "devminor",
             "rdevmajor", "rdevminor", "namesize", "check")
    while True:
        if data[pos:pos + 6] != b"070701":
            raise PackError(f"bad cpio magic at offset {pos}")
        vals = {n: int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        pos += 110
        name = data[pos:pos + vals["namesize"] - 1].decode("utf-8", "surrogateescape")
        pos = (pos + vals["namesize"] + 3) & ~3
        body = data[pos:pos + vals["size"]]
        pos = (pos + vals["size"] + 3) & ~3
        if name == TRAILER:
            return out
        entry: dict[str, object] = dict(vals, name=name, data=body)
        entry["type"] = stat.S_IFMT(vals["mode"])
        out.append(entry)
