"""Pack: write a `Tree` as a reproducible cpio `newc` initramfs, compressed for the kernel.

Entries come in depth-first order with names sorted bytewise (parents before children), inodes are
renumbered from 1 in that order, mtimes are clamped to the epoch (SOURCE_DATE_EPOCH), hardlinked
paths share an inode number and carry the data on their last occurrence (as GNU cpio does; the
kernel accepts it on any). The same tree gives the same bytes on any machine.

`last` names one path that is written after all the others instead of in its sorted place: the build puts
the init's config there, so a config present in the guest proves the kernel unpacked every entry before
it (the kernel stops unpacking at its first error; initramfs/init.c checks the rest).

The archive's length is known before a byte is written (`archive_size`): `pack` tells the compressor, and
zstd fits its window, which the guest's decompressor allocates for the whole unpack, to it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .blobs import HashingWriter
from .cache import atomic_file
from .compression import CODECS, COMPRESSIONS, DEFAULT_COMPRESSION, compressor
from .errors import PackError
from .tree import DIR, FILE, SYMLINK, Content, ContentReader, Entry, Tree, entries

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Packed:
    path: Path
    compression: str
    level: int
    size: int  # compressed bytes
    uncompressed_size: int  # cpio bytes
    sha256: str
    entries: int
    digests: dict[str, str]  # path -> hex sha256 of each regular file written (hashed as it was read)


def pack(
    tree: Tree,
    out: Path,
    compression: str = DEFAULT_COMPRESSION,
    level: int | None = None,
    epoch: int | None = None,
    progress: Callable[[int], None] | None = None,
    last: str | None = None,
) -> Packed:
    """Write `tree` to `out` (atomically), compressed (builder.compression), and return what was written."""
    if compression not in COMPRESSIONS:
        raise PackError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    try:
        lvl = CODECS[compression].level(level)
    except ValueError as e:
        raise PackError(str(e)) from None
    try:
        with atomic_file(out) as f:
            hashing = HashingWriter(f)
            walked = _ordered(tree, epoch, last)
            sink = compressor(compression, hashing, lvl, size=_length(walked))
            writer = _CpioWriter(sink, progress)
            count = writer.write_entries(walked)
            sink.close()
    except OSError as e:
        raise PackError(f"cannot write {out}: {e}") from None
    return Packed(
        out, compression, lvl, hashing.count, writer.offset, hashing.hash.hexdigest(), count, writer.digests
    )


def _pad4(n: int) -> int:
    return -(-n // 4) * 4


def _ordered(tree: Tree, epoch: int | None, last: str | None) -> list[Entry]:
    """The entries in archive order: sorted, `last` moved to the end."""
    walked = entries(tree, epoch)
    if last is None:
        return walked
    return [e for e in walked if e.path != last] + [e for e in walked if e.path == last]


def _body_size(e: Entry) -> int:
    """What follows `e`'s header: a file's data (at its last hardlinked path only), a symlink's target."""
    if e.node.kind == FILE:
        return e.node.size if e.last else 0
    if e.node.kind == SYMLINK:
        return len(os.fsencode(e.node.target))
    return 0


def _header_size(name: str) -> int:
    return _pad4(110 + len(os.fsencode(name)) + 1)


def archive_size(tree: Tree, epoch: int | None = None, last: str | None = None) -> int:
    """The length of the uncompressed archive `pack` writes for `tree`, computed without reading a file."""
    return _length(_ordered(tree, epoch, last))


def _length(walked: list[Entry]) -> int:
    """The archive's length for entries in archive order, their headers, bodies and the trailer."""
    size = sum(_header_size(e.path or ".") + _pad4(_body_size(e)) for e in walked)
    return size + _header_size(TRAILER)


def write_cpio(out: BinaryIO, tree: Tree, epoch: int | None = None) -> int:
    """Write `tree` as one uncompressed newc archive (the rules above) to the open `out`; return its size
    (a multiple of 4: another archive can follow, as the kernel reads concatenated ones)."""
    writer = _CpioWriter(out, None)
    writer.write_entries(_ordered(tree, epoch, None))
    return writer.offset


class _CpioWriter:
    def __init__(self, out, progress: Callable[[int], None] | None):  # type: ignore
        self.out, self.progress = out, progress
        self.offset = 0
        self.digests: dict[str, str] = {}  # path -> sha256 of each regular file, after write_entries

    def _emit(self, b: bytes) -> None:
        self.out.write(b)
        self.offset += len(b)

    def _pad(self) -> None:
        if self.offset % 4:
            self._emit(b"\0" * (4 - self.offset % 4))

    def header(
        self,
        name: str,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        mtime: int,
        size: int,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        raw = os.fsencode(name) + b"\0"
        fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(raw), 0)
        if max(fields) > 0xFFFFFFFF:  # newc has 32-bit fields: never truncate silently
            raise PackError(
                f"/{name}: too large for cpio newc's 32-bit fields (size {size}, uid {uid}, gid {gid})"
            )
        self._emit(b"070701" + b"".join(b"%08X" % (v & 0xFFFFFFFF) for v in fields) + raw)
        self._pad()

    def write_entries(self, walked: list[Entry]) -> int:
        """Write `walked` (archive order, `_ordered`) and the trailer; return the number of entries."""
        node_digest: dict[int, str] = {}  # id(file node) -> sha256 (a hardlink group is written once)
        with ContentReader() as contents:
            for e in walked:
                node, size = e.node, _body_size(e)
                mtime = min(max(e.mtime, 0), 0xFFFFFFFF)
                self.header(
                    e.path or ".",
                    e.ino,
                    node.st_mode,
                    node.uid,
                    node.gid,
                    e.links if node.kind != DIR else 2,
                    mtime,
                    size,
                    node.rdev,
                )
                if node.kind == SYMLINK:
                    self._emit(os.fsencode(node.target))
                elif node.kind == FILE and e.last:
                    h = hashlib.sha256()
                    for chunk in contents.chunks(node):
                        h.update(chunk)
                        self._emit(chunk)
                    node_digest[id(node)] = h.hexdigest()
                    if self.progress and isinstance(node.content, Content):
                        self.progress(node.size)
                self._pad()
            self.header(TRAILER, 0, 0, 0, 0, 1, 0, 0)
        self.digests = {e.path: node_digest[id(e.node)] for e in walked if e.node.kind == FILE}
        return len(walked)


def read_cpio(data: bytes) -> list[dict[str, object]]:
    """Parse an uncompressed newc archive into a list of entries (for tests and `explain`)."""
    out: list[dict[str, object]] = []
    pos = 0
    names = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "mtime",
        "size",
        "devmajor",
        "devminor",
        "rdevmajor",
        "rdevminor",
        "namesize",
        "check",
    )
    while True:
        if data[pos : pos + 6] != b"070701":
            raise PackError(f"bad cpio magic at offset {pos}")
        vals = {n: int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        pos += 110
        name = data[pos : pos + vals["namesize"] - 1].decode("utf-8", "surrogateescape")
        pos = (pos + vals["namesize"] + 3) & ~3
        body = data[pos : pos + vals["size"]]
        pos = (pos + vals["size"] + 3) & ~3
        if name == TRAILER:
            return out
        entry: dict[str, object] = dict(vals, name=name, data=body)
        entry["type"] = stat.S_IFMT(vals["mode"])
        out.append(entry)
