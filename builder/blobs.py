"""Content-addressed storage: verified blobs and uncompressed layer tars ("diffs") in the cache.

    $XBUILD_CACHE/blobs/sha256/<hex>   blobs as fetched (manifests, configs, compressed layers)
    $XBUILD_CACHE/diffs/sha256/<hex>   uncompressed layer tars, named by diff_id

Flatten indexes a diff once and pack reads file contents from it by offset, so a warm build does no
decompression and holds no file content in memory. Everything is verified before it is renamed in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Self

import zstandard
from isal import igzip

from .cache import atomic_file, cache_dir
from .errors import SourceError
from .image import Layer

CHUNK = 1 << 20
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


def check_digest(digest: str, what: str) -> str:
    """Return the hex part of a sha256 digest or raise SourceError."""
    if not _DIGEST.match(digest):
        raise SourceError(f"{what}: unsupported or malformed digest {digest!r} (sha256 only)")
    return digest[7:]


def blob_path(digest: str) -> Path:
    return cache_dir("blobs", "sha256") / check_digest(digest, "blob")


def diff_path(diff_id: str) -> Path:
    return cache_dir("diffs", "sha256") / check_digest(diff_id, "layer diff_id")


def verify_bytes(data: bytes, digest: str, what: str) -> bytes:
    """Return `data` if it hashes to `digest`, else raise SourceError."""
    if hashlib.sha256(data).hexdigest() != check_digest(digest, what):
        raise SourceError(f"{what}: digest mismatch (expected {digest})")
    return data


class HashingWriter:
    """A write-only file wrapper counting and hashing what goes through; close() leaves the file open."""

    def __init__(self, f: IO[bytes]):
        self.f, self.hash, self.count = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.f.write(b)
        self.hash.update(b)
        self.count += len(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        pass


class HashingReader:
    """Wrap a stream, hashing what is read; `check()` after EOF raises on a digest or size mismatch."""

    def __init__(self, raw: IO[bytes], digest: str, what: str, size: int | None = None,
                 progress: Callable[[int], None] | None = None):
        self.raw, self.digest, self.what, self.size = raw, digest, what, size
        self.progress = progress
        self.hash = hashlib.sha256()
        self.count = 0
        check_digest(digest, what)

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.count += len(data)
        if self.progress and data:
            self.progress(len(data))
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaves `raw` open: its opener closes it (an uncompressed layer is read through this directly)."""

    def check(self) -> None:
        if self.size is not None and self.count != self.size:
            raise SourceError(f"{self.what}: size mismatch (expected {self.size} bytes, got {self.count})")
        if "sha256:" + self.hash.hexdigest() != self.digest:
            raise SourceError(f"{self.what}: digest mismatch (expected {self.digest}, "
                              f"got sha256:{self.hash.hexdigest()})")


def store_blob(stream: IO[bytes], digest: str, what: str, size: int | None = None,
               progress: Callable[[int], None] | None = None) -> Path:
    """Copy `stream` into the blob store, verifying digest and size; return its path."""
    final = blob_path(digest)
    if final.exists():
        return final
    reader = HashingReader(stream, digest, what, size, progress)
    with atomic_file(final) as out:
        while chunk := reader.read(CHUNK):
            out.write(chunk)
        reader.check()
    return final


def _decompressor(stream: IO[bytes], compression: str, what: str) -> IO[bytes]:
    if compression == "gzip":
        return igzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[arg-type, return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)  # type: ignore
    if compression == "none":
        return stream
    raise SourceError(f"{what}: unsupported compression {compression!r}")


def ensure_diff(layer: Layer, progress: Callable[[int], None] | None = None) -> Path:
    """The uncompressed tar of `layer` in the cache, decompressed and verified on first use.

    Both digests are checked: the blob's (compressed bytes) and the diff_id (uncompressed tar).
    """
    final = diff_path(layer.diff_id)
    if final.exists():
        return final
    what = f"layer {layer.digest[:19]}"
    with layer.open() as raw:
        blob = HashingReader(raw, layer.digest, what, layer.size, progress)
        diff_hash = hashlib.sha256()
        try:
            with _decompressor(blob, layer.compression, what) as plain, atomic_file(final) as out:  # type: ignore
                while chunk := plain.read(CHUNK):
                    diff_hash.update(chunk)
                    out.write(chunk)
                while blob.read(CHUNK):  # trailing bytes after the compressed stream count for the digest
                    pass
                blob.check()
                if "sha256:" + diff_hash.hexdigest() != layer.diff_id:
                    raise SourceError(f"{what}: uncompressed content does not match diff_id {layer.diff_id}")
        except (OSError, EOFError, zstandard.ZstdError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise SourceError(f"{what}: corrupt or truncated {layer.compression} data ({e})") from None
    return final

