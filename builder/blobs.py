"""Content-addressed storage: verified blobs and uncompressed layer tars ("diffs") in the cache.

    $XBUILD_CACHE/blobs/sha256/<hex>   blobs as fetched (manifests, configs, compressed layers)
    $XBUILD_CACHE/diffs/sha256/<hex>   uncompressed layer tars, named by diff_id

Flatten indexes a diff once and pack reads file contents from it by offset, so a warm build does no
decompression and holds no file content in memory. Everything is verified before it is renamed in, and
verified again whenever it is used, because the cache on disk is untrusted (bit rot, truncation, a hand or a
tool that wrote into it): manifests and configs are hashed when read (`blob_bytes`), a layer blob while it is
decompressed (`ensure_diff`), a diff while flatten indexes it (`open_diff`). A bad entry is removed and
fetched or decompressed again from its source; with no source left, CacheError names the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Self

from .cache import atomic_file, cache_dir, format_size, is_temp, lock_shared, parse_size, remove_entry, touch
from .compression import CorruptData, reader
from .errors import CacheError, SourceError, XbuildError
from .image import Layer

CHUNK = 1 << 20
MAX_LAYER_SIZE = 16 << 30  # decompressed bytes per layer, unless raised
MAX_LAYER_SIZE_ENV = "XBUILD_MAX_LAYER_SIZE"
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

    def __init__(
        self,
        raw: IO[bytes],
        digest: str,
        what: str,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ):
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
            raise SourceError(
                f"{self.what}: digest mismatch (expected {self.digest}, got sha256:{self.hash.hexdigest()})"
            )


def max_layer_size() -> int:
    """The decompressed-layer cap: $XBUILD_MAX_LAYER_SIZE (e.g. 64G) or MAX_LAYER_SIZE."""
    text = os.environ.get(MAX_LAYER_SIZE_ENV)
    return parse_size(text, MAX_LAYER_SIZE_ENV) if text else MAX_LAYER_SIZE


def _entry_fd(path: Path) -> int | None:
    """An fd of the regular file `path`, never through a symlink; None if absent. Anything else there (a
    directory, a symlink, a device) is no cache entry of ours: it is removed (a symlink, not its target)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES):
            raise
        remove_entry(path)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        remove_entry(path)
        return None
    return fd


def _cached(path: Path, digest: str, limit: int) -> tuple[bytes | None, bool]:
    """(the entry's bytes if they hash to `digest` and are at most `limit`, whether a bad entry was
    removed); never reads more than `limit` + 1 bytes."""
    fd = _entry_fd(path)
    if fd is None:
        return None, os.path.lexists(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        remove_entry(path)
        return None, True
    touch(path)
    return data, False


def blob_bytes(digest: str, what: str, fetch: Callable[[], object], limit: int) -> bytes:
    """The blob `digest` (a manifest or config of at most `limit` bytes) from the cache, verified; when it
    is missing or corrupt (then removed), `fetch()` stores it again first. A corrupt entry whose source
    fails is a CacheError."""
    path = blob_path(digest)
    raw, bad = _cached(path, digest, limit)
    if raw is not None:
        return raw
    try:
        fetch()
    except XbuildError as e:
        if bad:
            raise _refetch_failed(path, e) from None
        raise
    raw, _ = _cached(path, digest, limit)
    if raw is None:
        raise CacheError(f"{path}: {what} changed in the cache right after it was stored")
    return raw


def _refetch_failed(path: Path, why: object) -> CacheError:
    return CacheError(f"{path}: corrupt cache entry (removed); fetching it again failed: {why}")


def present(path: Path) -> bool:
    """Whether a cache entry is a regular file; anything else at `path` is removed."""
    fd = _entry_fd(path)
    if fd is None:
        return False
    os.close(fd)
    return True


def store_blob(
    stream: IO[bytes],
    digest: str,
    what: str,
    size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Copy `stream` into the blob store, verifying digest and size; return its path."""
    final = blob_path(digest)
    if present(final):
        return final
    reader = HashingReader(stream, digest, what, size, progress)
    with atomic_file(final) as out:
        while chunk := reader.read(CHUNK):
            out.write(chunk)
        reader.check()
    return final


class _BadCachedBlob(Exception):
    """The cached layer blob read by `_decompress` does not match its digest."""

    def __init__(self, path: Path):
        self.path = path


def ensure_diff(
    layer: Layer, progress: Callable[[int], None] | None = None, max_size: int | None = None
) -> Path:
    """The uncompressed tar of `layer` in the cache, decompressed and verified on first use.

    Both digests are checked: the blob's (compressed bytes) and the diff_id (uncompressed tar); nothing is
    stored unless both match, and decompression stops as soon as the tar passes `max_size` bytes (default
    `max_layer_size()`), before that chunk is written. A cached blob found corrupt is removed and the layer
    opened again (the registry source downloads it again); if that fails, CacheError names the file. A
    diff already in the cache is returned as it is: `open_diff` verifies it as flatten reads it.
    """
    final = diff_path(layer.diff_id)
    if present(final):
        return final
    cap = max_layer_size() if max_size is None else max_size
    try:
        return _decompress(layer, final, progress, cap)
    except _BadCachedBlob as bad:
        remove_entry(bad.path)
        try:
            return _decompress(layer, final, progress, cap, bad.path)
        except _BadCachedBlob:
            raise CacheError(f"{bad.path}: corrupt again right after it was fetched") from None


def _decompress(
    layer: Layer, final: Path, progress: Callable[[int], None] | None, cap: int, healing: Path | None = None
) -> Path:
    what = f"layer {layer.digest[:19]}"
    try:
        raw = layer.open()
    except (XbuildError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        if healing is None:
            if isinstance(e, OSError):
                raise SourceError(f"{what}: cannot open the layer ({why})") from None
            raise
        raise _refetch_failed(healing, why) from None
    with raw:
        name = getattr(raw, "name", None)
        cached = (
            Path(name)
            if isinstance(name, str) and Path(name).parent == blob_path(layer.digest).parent
            else None
        )
        if cached is not None:
            lock_shared(raw.fileno())  # `xbuild cache prune` leaves it alone while it is read
        blob = HashingReader(raw, layer.digest, what, layer.size, progress)
        diff_hash, count = hashlib.sha256(), 0
        try:
            with reader(layer.compression, blob) as plain, atomic_file(final) as out:  # type: ignore[arg-type]
                while chunk := plain.read(CHUNK):
                    count += len(chunk)
                    if count > cap:
                        raise SourceError(
                            f"{what}: expands past the {format_size(cap)} layer size cap "
                            f"(--max-layer-size or ${MAX_LAYER_SIZE_ENV} raise it)"
                        )
                    diff_hash.update(chunk)
                    out.write(chunk)
                while blob.read(CHUNK):  # trailing bytes after the compressed stream count for the digest
                    pass
                blob.check()
                if "sha256:" + diff_hash.hexdigest() != layer.diff_id:
                    raise SourceError(f"{what}: uncompressed content does not match diff_id {layer.diff_id}")
        except (SourceError, OSError, CorruptData) as e:
            if cached is not None and not _intact(blob):
                raise _BadCachedBlob(cached) from None
            if isinstance(e, SourceError):
                raise
            raise SourceError(f"{what}: corrupt or truncated {layer.compression} data ({e})") from None
    return final


def _intact(blob: HashingReader) -> bool:
    """Whether the rest of `blob`, read to its end, makes it match its digest and size."""
    try:
        while blob.read(CHUNK):
            pass
        blob.check()
    except (SourceError, OSError):
        return False
    return True


class DiffChanged(CacheError):
    """A cached diff that does not hash to its diff_id (it was removed); flatten decompresses it again."""


_held: dict[Path, int] = {}  # diff path -> the fd kept open for the life of the process
_verified: dict[int, tuple[Path, tuple[int, int]]] = {}  # fd -> (path, its stamp when verified)


def _stamp(st: os.stat_result) -> tuple[int, int]:
    """Size and mtime: a write moves them; an unlink or rename of the entry (ctime) does not."""
    return st.st_size, st.st_mtime_ns


def forget_verified() -> None:
    """Start a new build: `check_unchanged` looks only at the diffs verified from now on."""
    _verified.clear()


def check_unchanged() -> None:
    """Raise CacheError if a diff verified by flatten was written to in place since (its size or mtime
    moved): what pack read from it may not be what was verified. Replacing or removing the entry is
    harmless (the verified inode stays open); raw bit rot within the build is not caught."""
    for fd, (path, stamp) in _verified.items():
        if _stamp(os.fstat(fd)) != stamp:
            raise CacheError(f"{path}: cached layer diff was modified in place during the build; build again")


def open_diff(
    layer: Layer, progress: Callable[[int], None] | None = None, max_size: int | None = None
) -> Diff:
    """The diff of `layer` (made by `ensure_diff` if needed), open for flatten to read and verify."""
    path = ensure_diff(layer, progress, max_size)
    fd = _held.get(path)
    if fd is not None:
        st, held = os.lstat(path), os.fstat(fd)
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):  # replaced since: open the new one
            fd = None
    if fd is None:
        fd = _entry_fd(path)
        if fd is None:
            raise DiffChanged(f"{path}: cached layer diff vanished or is not a file (removed)")
        lock_shared(fd)
        _held[path] = fd
    touch(path)
    return Diff(path, layer.diff_id, fd)


class Diff:
    """A cached diff as flatten reads it: a read-only seekable file that hashes every byte of the diff once,
    in order, whatever flatten reads or seeks over; `check()` at the end compares the diff_id.

    `source` names the open descriptor (/proc/self/fd/N), kept open for the life of the process under a
    shared flock, so minimize and pack read the very inode that was verified even when the cache entry is
    replaced, removed or pruned meanwhile.
    """

    def __init__(self, path: Path, diff_id: str, fd: int):
        self.path, self.diff_id, self.fd = path, diff_id, fd
        self.source = f"/proc/self/fd/{fd}"
        self.size = os.fstat(fd).st_size
        self._hash = hashlib.sha256()
        self._mark = self._pos = 0  # bytes [0, _mark) are hashed; _pos is where read() reads

    def read(self, n: int = -1) -> bytes:
        data = os.pread(self.fd, n if n >= 0 else max(self.size - self._pos, 0), self._pos)
        if self._pos > self._mark:
            self._hash_to(self._pos)
        end = self._pos + len(data)
        if end > self._mark >= self._pos:
            self._hash.update(memoryview(data)[self._mark - self._pos :])
            self._mark = end
        self._pos = end
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _hash_to(self, end: int | None) -> None:
        while end is None or self._mark < end:
            chunk = os.pread(self.fd, CHUNK if end is None else min(CHUNK, end - self._mark), self._mark)
            if not chunk:
                return
            self._hash.update(chunk)
            self._mark += len(chunk)

    def check(self) -> None:
        """Hash the rest of the diff; on a mismatch remove the cache entry and raise DiffChanged."""
        self._hash_to(None)
        if "sha256:" + self._hash.hexdigest() == self.diff_id:
            _verified[self.fd] = (self.path, _stamp(os.fstat(self.fd)))
            return
        try:
            st, held = os.lstat(self.path), os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                remove_entry(self.path)
        except FileNotFoundError:
            pass
        raise DiffChanged(
            f"{self.path}: cached layer diff does not match its diff_id {self.diff_id} "
            "(corrupt cache entry, removed)"
        )


def verify_store() -> Iterator[tuple[Path, str | None]]:
    """Re-hash every blob and diff: (path, None) for a good one, (path, why) for a bad one, removed."""
    for kind in ("blobs", "diffs"):
        for path in sorted(cache_dir(kind, "sha256").iterdir()):
            if is_temp(path.name):
                continue
            why = _bad_entry(path)
            if why:
                remove_entry(path)
            yield path, why


def _bad_entry(path: Path) -> str | None:
    """Why the entry at `path` is not the content its name says, or None."""
    if not re.fullmatch(r"[a-f0-9]{64}", path.name):
        return "not named by a sha256"
    fd = _entry_fd(path)  # removes a non-file
    if fd is None:
        return "not a regular file"
    with os.fdopen(fd, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    return None if actual == path.name else f"content hashes to sha256:{actual[:12]}… (corrupt)"
