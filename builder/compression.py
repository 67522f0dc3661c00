"""Compression: the one table of the codecs xbuild reads and writes (CODECS), found by their magic bytes.

Detection (`sniff`) tries the table in order; lzma's one-byte magic (a properties byte) comes last. A caller
that knows the data can be only some codecs says which: a layer is a tar, gzip or zstd (LAYER_CODECS), and
a tar's first bytes are a file name, which may spell another codec's magic.

Writing (`compressor`) is streamed, bounded in memory and reproducible: the same bytes and level give the
same output on any machine. gzip is one member with a zeroed mtime and no name (ISA-L); lz4 is the legacy
frame the kernel's initramfs unpacker reads (`lz4 -l`: 8 MiB blocks, high compression above level 2); zstd
is zstd's multi-threaded mode with the parameters of `zstd_parameters(level, size)`: the level's own for an
input of `size` bytes when the writer is told it in advance (zstd's own table: a smaller input gets a window
no larger than the smallest power of two that holds it, and the frame records the size), with the window
capped at ZSTD_WINDOW_LOG_MAX, and for a known size at levels up to the default at 1/ZSTD_WINDOW_SHARE of
it (at least 256 KiB: the guest's decompressor allocates the window for the whole unpack), and the
match tables cut down where one worker would not fit ZSTD_MEMORY, and a job size fixed by the window. These
depend on the level and the size only, and zstd's multi-threaded output does not depend on the number of
workers, so the thread count (as many as fit ZSTD_MEMORY, at most the CPUs and ZSTD_THREADS) changes the
time, never the bytes.
The initrd is any of COMPRESSIONS, at a level of the codec's `levels` (`default_level` when none is asked
for); zstd's default level was chosen by measurement (kernels/README.md, bench/compression.py).

Reading: `reader` streams every member or frame of a gzip or zstd stream (layer blobs, pushed disks), and
its `read(n)` returns n bytes unless the data ends first; `decompress` gives the first stream of any codec,
trailing bytes ignored (a bzImage's payload). Corrupt data is a `CorruptData` from both, with the codec's
own message.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol, Self

import lz4.block
import zstandard
from isal import igzip, isal_zlib

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_CHUNK = 8 << 20  # the kernel's unlz4 reads 8 MiB blocks
ZSTD_THREADS = 8  # at most; fewer where ZSTD_MEMORY does not hold more
ZSTD_MEMORY = 96 << 20  # the zstd compressor's bound: its workers' tables and job buffers (estimated)
ZSTD_WINDOW_LOG_MAX = 23  # 8 MiB, level 19's window: what the guest's unzstd allocates for the initrd
# An input of known size gets a window of at most 1/ZSTD_WINDOW_SHARE of it, but no less than
# 1 << ZSTD_WINDOW_LOG_SMALL (nor more than the level's): the guest's unzstd holds the window for the whole
# unpack, beside the initrd and the tree, and in a small tree it is memory the window size hardly pays
# for. The nginx look-alike's 11.7 MiB archive at zstd:9 (window: initrd): 4 MiB (the level's own):
# 4.68 MiB, 1 MiB: 4.74, 256 KiB: 4.82, 64 KiB: 4.98; window + initrd is least at 128-256 KiB. A
# 300 MB tree keeps the level's window (its 4 MiB is 1/75 of it). Levels above the default are the
# size-first ones (`--compression zstd:19`): they keep their own window whatever the size, and the artifact's
# minimum memory (builder/memory.py) counts it.
ZSTD_WINDOW_SHARE = 64
ZSTD_WINDOW_LOG_SMALL = 18  # 256 KiB
ZSTD_DEFAULT_LEVEL = 9  # the measured choice (kernels/README.md); zstd:19 is the size-first mode


class CorruptData(ValueError):
    """Data a decoder refuses (the codec's message); each stage reports it as its own error."""


class Writable(Protocol):
    def write(self, b: bytes) -> int: ...


class Sink(Protocol):
    """A compressing writer: `write` everything, then `close` once to flush the end of the stream (the
    underlying file stays open)."""

    def write(self, b: bytes) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Codec:
    name: str  # as in --compression, Layer.compression, media types
    magic: bytes  # what its data starts with (b"": none)
    first: Callable[[bytes], bytes]  # the first stream of the data, decompressed
    errors: tuple[type[Exception], ...] = ()  # what its decoders raise on corrupt data
    stream: Callable[[IO[bytes]], IO[bytes]] | None = None  # every member/frame, streamed
    writer: Callable[[Writable, int, bool, int | None], Sink] | None = None  # (out, level, checksum, size)
    levels: range = range(0)  # the levels it can be written at
    default_level: int = 0

    def level(self, level: int | None) -> int:
        """`level`, or the default when None; ValueError naming the range when the codec has no such level."""
        if level is None:
            return self.default_level
        if level not in self.levels:
            raise ValueError(
                f"{self.name} levels are {self.levels.start} to {self.levels.stop - 1}, not {level}"
            )
        return level


# ------------------------------------------------------------------------------------------- writers


class _Plain:
    def __init__(self, out: Writable, level: int, checksum: bool, size: int | None):
        self.out = out

    def write(self, b: bytes) -> int:
        return self.out.write(b)

    def close(self) -> None:
        pass


class _Gzip:
    def __init__(self, out: Writable, level: int, checksum: bool, size: int | None):
        self.out = out
        # wbits 31: a gzip container with a zeroed mtime, so the output is reproducible
        self.z = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)

    def write(self, b: bytes) -> int:
        self.out.write(self.z.compress(b))
        return len(b)

    def close(self) -> None:
        self.out.write(self.z.flush())


@dataclass(frozen=True)
class ZstdPlan:
    """How a zstd level is written: `params` (threads included) and the compressor's estimated peak."""

    params: zstandard.ZstdCompressionParameters
    memory: int  # estimated bytes: `threads` workers' match state plus the job buffers

    @property
    def window(self) -> int:
        """Bytes of window the decompressor needs at most (the guest's unzstd allocates it, plus ~0.4 MiB; a
        frame whose whole input fits in it records the input's size, and that is what is allocated)."""
        return 1 << self.params.window_log


def _zstd_memory(worker: int, job: int, threads: int) -> int:
    """The multi-threaded compressor's peak, estimated: each worker's match state, and job buffers (an
    input and an output buffer per worker, three more in zstd's round buffer)."""
    return threads * (worker + 2 * job) + 3 * job


def zstd_parameters(
    level: int, checksum: bool = False, cpus: int | None = None, size: int | None = None
) -> ZstdPlan:
    """The parameters `level` is written with for an input of `size` bytes (None: unknown, as large as
    any), within ZSTD_MEMORY and ZSTD_WINDOW_LOG_MAX.

    Everything that shapes the bytes (window, tables, strategy, job size) is a function of `level` and
    `size` alone: zstd's parameters for that level and input size (an input smaller than the level's window
    gets the smallest window that holds it, at least 1 KiB, and tables to match), the window capped at
    ZSTD_WINDOW_LOG_MAX (levels 20-22 ask for 32-128 MiB) and, for a known `size` at a level up to the
    default, at the power of two nearest above size / ZSTD_WINDOW_SHARE but at least
    1 << ZSTD_WINDOW_LOG_SMALL (higher levels are the size-first ones and keep their window), the job one
    window (at least 1 MiB), and the hash/chain tables shrunk, the larger first, until one worker fits the
    budget.
    The thread count is then as many workers as fit (at least one, at most `cpus` (default: this
    machine's) and ZSTD_THREADS); it changes the time only.
    """
    base = zstandard.ZstdCompressionParameters.from_level(level, source_size=size or 0)
    window_log = min(base.window_log, ZSTD_WINDOW_LOG_MAX)
    if size is not None and level <= ZSTD_DEFAULT_LEVEL:
        share = max(0, size // ZSTD_WINDOW_SHARE - 1).bit_length()
        window_log = min(window_log, max(share, ZSTD_WINDOW_LOG_SMALL))
    chain_log, hash_log = min(base.chain_log, window_log + 1), min(base.hash_log, window_log + 1)
    job = 1 << max(20, window_log)

    def worker(chain: int, hashes: int) -> int:
        single = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=size or 0, window_log=window_log, chain_log=chain, hash_log=hashes
        )
        return int(single.estimated_compression_context_size())

    while _zstd_memory(worker(chain_log, hash_log), job, 1) > ZSTD_MEMORY:
        if chain_log >= hash_log:
            chain_log -= 1
        else:
            hash_log -= 1
    one = worker(chain_log, hash_log)
    fit = (ZSTD_MEMORY - 3 * job) // (one + 2 * job)
    threads = max(1, min(cpus or os.cpu_count() or 1, ZSTD_THREADS, fit))
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=size or 0,
        window_log=window_log,
        chain_log=chain_log,
        hash_log=hash_log,
        job_size=job,
        threads=threads,
        write_checksum=checksum,
    )
    return ZstdPlan(params, _zstd_memory(one, job, threads))


class _Zstd:
    """zstd's multi-threaded writer; told the input's `size`, it pledges it (the frame header records it, and
    a `size` other than what is written is a zstandard.ZstdError at `close`)."""

    def __init__(self, out: Writable, level: int, checksum: bool, size: int | None):
        params = zstd_parameters(level, checksum, size=size).params
        self.w = zstandard.ZstdCompressor(compression_params=params).stream_writer(
            out,  # type: ignore[arg-type]
            size=-1 if size is None else size,
            closefd=False,
        )

    def write(self, b: bytes) -> int:
        return self.w.write(b)

    def close(self) -> None:
        self.w.close()  # type: ignore[no-untyped-call]


class _Lz4Legacy:
    """The lz4 'legacy' frame: magic, then (u32 size, block) of LZ4_LEGACY_CHUNK bytes each."""

    def __init__(self, out: Writable, level: int, checksum: bool, size: int | None):
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


# ------------------------------------------------------------------------------------------- readers


def _lz4_legacy(data: bytes) -> bytes:
    """The legacy frame's blocks decompressed, up to the end or the 4-byte size the kernel appends."""
    out, pos = [], 4
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == 0x184C2102:  # a concatenated stream
            pos += 4
            continue
        if pos + 4 + size > len(data):
            break
        out.append(lz4.block.decompress(data[pos + 4 : pos + 4 + size], uncompressed_size=LZ4_LEGACY_CHUNK))
        pos += 4 + size
    return b"".join(out)


def _gzip_stream(stream: IO[bytes]) -> IO[bytes]:
    return igzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[no-untyped-call, return-value]


def _zstd_stream(stream: IO[bytes]) -> IO[bytes]:
    return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True, closefd=False)


def _zstd_first(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]
NONE = Codec("none", b"", bytes, stream=lambda s: s, writer=_Plain, levels=range(1))
GZIP = Codec(
    "gzip",
    b"\x1f\x8b",
    lambda d: isal_zlib.decompressobj(wbits=31).decompress(d),
    (gzip.BadGzipFile, EOFError, _ISAL_ERROR),
    _gzip_stream,
    _Gzip,
    range(4),
    3,
)
XZ = Codec(
    "xz",
    b"\xfd7zXZ\x00",
    lambda d: lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(d),
    (lzma.LZMAError, EOFError),
)
ZSTD = Codec(
    "zstd",
    b"\x28\xb5\x2f\xfd",
    _zstd_first,
    (zstandard.ZstdError,),
    _zstd_stream,
    _Zstd,
    range(-(1 << 17), zstandard.MAX_COMPRESSION_LEVEL + 1),
    ZSTD_DEFAULT_LEVEL,
)
LZ4 = Codec(
    "lz4",
    LZ4_LEGACY_MAGIC,
    _lz4_legacy,
    (lz4.block.LZ4BlockError,),
    writer=_Lz4Legacy,
    levels=range(13),
    default_level=9,
)
BZIP2 = Codec("bzip2", b"BZh", lambda d: bz2.BZ2Decompressor().decompress(d), (OSError, EOFError))
LZMA = Codec(
    "lzma",
    b"\x5d",
    lambda d: lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(d),
    (lzma.LZMAError, EOFError),
)

CODECS = {c.name: c for c in (GZIP, XZ, ZSTD, LZ4, BZIP2, LZMA, NONE)}  # sniff's order: lzma's magic late
COMPRESSIONS = ("zstd", "lz4", "gzip", "none")  # what an initrd can be, the default first
DEFAULT_COMPRESSION = COMPRESSIONS[0]
LAYER_CODECS = ("gzip", "zstd")  # what a layer can be, besides an uncompressed tar


def sniff(head: bytes, among: tuple[str, ...] | None = None) -> str:
    """The name of the codec (of `among`, default all) whose magic `head` starts with, else "none"."""
    for c in CODECS.values():
        if c.magic and (among is None or c.name in among) and head.startswith(c.magic):
            return c.name
    return "none"


def compressor(
    name: str, out: Writable, level: int | None = None, checksum: bool = False, size: int | None = None
) -> Sink:
    """A `Sink` writing `name`-compressed data to `out` at `level` (the codec's default when None), with a
    content checksum where the format makes it optional (zstd). `size`, when given, is exactly how many bytes
    will be written: zstd fits its window to it (zstd_parameters). ValueError for a level the codec lacks."""
    codec = CODECS[name]
    assert codec.writer is not None, f"xbuild does not write {name}"
    return codec.writer(out, codec.level(level), checksum, size)


def decompress(name: str, data: bytes) -> bytes:
    """The first `name` stream of `data`, decompressed (trailing bytes ignored); CorruptData if refused."""
    codec = CODECS[name]
    try:
        return codec.first(data)
    except codec.errors as e:
        raise CorruptData(str(e)) from None


class Decoded:
    """`stream` decompressed by `codec`, every member or frame of it (`reader`)."""

    def __init__(self, stream: IO[bytes], codec: Codec):
        assert codec.stream is not None, f"xbuild does not stream {codec.name}"
        self.stream, self.errors = stream, codec.errors
        self.inner = codec.stream(stream)

    def read(self, n: int) -> bytes:
        """`n` bytes (fewer only at the end), so blocks stay aligned whatever the decoder returns."""
        try:
            first = self.inner.read(n)
            if len(first) in (0, n):
                return first
            parts, got = [first], len(first)
            while got < n and (b := self.inner.read(n - got)):
                parts.append(b)
                got += len(b)
            return b"".join(parts)
        except self.errors as e:
            raise CorruptData(str(e)) from None

    def close(self) -> None:
        """Close the decoder; the stream it reads stays open."""
        if self.inner is not self.stream:
            self.inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reader(name: str, stream: IO[bytes]) -> Decoded:
    """`stream` decompressed as `name` (LAYER_CODECS or none); closing the reader leaves `stream` open."""
    return Decoded(stream, CODECS[name])
