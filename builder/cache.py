"""The cache root ($XBUILD_CACHE, default ~/.cache/xbuild), atomic writes, and the hygiene of cache entries.

Writes: `atomic_file` and `atomic_dir` write a hidden temp beside the final path (`.NAME.XXXXXXXX`, held under
an exclusive flock while it is written) and rename it into place. On any failure the temp is removed; running
out of space or quota (ENOSPC, EDQUOT) anywhere in the write is one `NoSpaceError` naming the file system.

Entries: a reader that keeps an entry open holds a shared flock on it (`lock_shared`) and records the use in
its atime (`touch`), the order of `xbuild cache prune --max-size`; a remover takes an exclusive non-blocking
flock first and leaves alone what it cannot get (`remove_unlocked`). A temp older than TEMP_AGE whose flock is
free was left by a killed process: `collect_temps` removes it, on a process's first use of the cache and on
`xbuild cache prune`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import BadInput, NoSpaceError

TEMP_AGE = 3600.0  # seconds; a temp this old with a free flock was left by a killed process
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")  # tempfile.mkstemp/mkdtemp(prefix=".NAME.") names
_TEMP_DEPTH = 3  # temps sit at most this deep: blobs/sha256/.X, init/KEY/.X, pulled/.X
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_collected: set[Path] = set()


def cache_root(collect: bool = True) -> Path:
    """Return the cache directory, creating it if needed; stale temps are collected on first use (unless
    `collect` is False: `xbuild cache` reports them itself)."""
    root = Path(os.environ.get("XBUILD_CACHE") or Path.home() / ".cache" / "xbuild")
    with no_space(root):
        root.mkdir(parents=True, exist_ok=True)
    if collect and root not in _collected:
        _collected.add(root)
        collect_temps(root)
    return root


def cache_dir(*parts: str) -> Path:
    """A subdirectory of the cache, created if needed."""
    d = cache_root().joinpath(*parts)
    with no_space(d):
        d.mkdir(parents=True, exist_ok=True)
    return d


def mount_point(path: Path) -> Path:
    """The mount point of the file system `path` (or its nearest existing parent) is on."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


@contextmanager
def no_space(path: Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside into one NoSpaceError naming `path`'s file system."""
    try:
        yield
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        what = "no space left" if e.errno == errno.ENOSPC else "disk quota exceeded"
        raise NoSpaceError(f"{what} on {mount_point(path)} (writing {path})") from None


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success rename it to `final` (replacing it)."""
    with no_space(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            if os.path.lexists(final):
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
                final.rename(old / "x")
                tmp.rename(final)
                _rmtree(old)
            else:
                tmp.rename(final)
        except NoSpaceError as e:  # of a file written inside: named by where it was going
            _rmtree(tmp)
            raise NoSpaceError(str(e).replace(str(tmp), str(final))) from None
        except BaseException:
            _rmtree(tmp)
            raise
        finally:
            os.close(fd)


@contextmanager
def atomic_file(final: Path, mode: str = "wb", place: Callable[[], Path] | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside `final`; on success fsync-less rename it into place (over a directory
    standing there too: in the cache that is a damaged entry). `place`, for a file
    named by its content (a digest known once written), is called after the body for the path to rename
    to instead (on the same file system); `final` then only names the write (in a NoSpaceError)."""
    with no_space(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed, after the rename
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                target = place() if place else final
                with suppress(FileNotFoundError):
                    if stat.S_ISDIR(target.lstat().st_mode):  # a directory where a file belongs: damage
                        remove_entry(target)
                os.replace(name, target)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(name)
            raise


def remove_entry(path: Path) -> None:
    """Remove a cache entry whatever it is: a file, a symlink (never its target) or a directory tree."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _rmtree(path)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def remove_unlocked(path: Path) -> bool:
    """Remove `path` unless a running xbuild holds a flock on it; True if it is gone."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        return True
    except OSError:  # a symlink (ELOOP) or a special file: nobody holds it
        remove_entry(path)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        remove_entry(path)
    except OSError:  # not ours to remove (permissions): left as it is
        return False
    finally:
        os.close(fd)
    return True


@contextmanager
def one_builder(final: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive flock on a lock file beside the entry `final` (`.NAME.building`) for the block: one
    process at a time builds a given entry, a second one blocks here (`waiting` is called once, before it
    blocks) and then finds the entry the first one made. The holder removes the file as it leaves (a waiter
    that then holds a removed file's lock opens it again), and a lock dies with its process, whatever kills
    it: a file a killed holder left has a temp's name (is_temp), so it is never an entry and `prune` collects
    it once stale and free."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.building"
    said = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as e:  # a symlink (or another non-file) planted there: never followed, removed
            if e.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            remove_entry(path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                waiting()
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            mine = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            mine = False
        if mine:
            break
        os.close(fd)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def lock_shared(fd: int) -> None:
    """Mark an open entry as in use: `remove_unlocked` (prune) leaves it alone while `fd` is open."""
    fcntl.flock(fd, fcntl.LOCK_SH)


def touch(path: Path) -> None:
    """Record a use of an entry in its atime (explicitly: relatime would mostly not)."""
    with suppress(OSError):
        st = path.lstat()
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns), follow_symlinks=False)


def is_temp(name: str) -> bool:
    """A name atomic_file/atomic_dir (or another mkstemp with a `.NAME.` prefix) gave a temp."""
    return bool(_TEMP.match(name))


def stale_temps(root: Path, age: float = TEMP_AGE) -> Iterator[Path]:
    """Temps under `root` (at most _TEMP_DEPTH deep) not modified for `age` seconds."""
    limit = time.time() - age
    level = [root]
    for _ in range(_TEMP_DEPTH):
        below = []
        for d in level:
            try:
                children = list(os.scandir(d))
            except OSError:
                continue
            for c in children:
                if d == root and c.name == RUNTIME:
                    continue
                if is_temp(c.name):
                    with suppress(OSError):
                        if c.stat(follow_symlinks=False).st_mtime < limit:
                            yield Path(c.path)
                elif c.is_dir(follow_symlinks=False):
                    below.append(Path(c.path))
        level = below


def collect_temps(root: Path, age: float = TEMP_AGE) -> list[Path]:
    """Remove the stale temps under `root` no running process holds; return what was removed."""
    return [p for p in list(stale_temps(root, age)) if remove_unlocked(p)]


def parse_size(text: str, what: str) -> int:
    """Bytes from `512M`, `16G`, `100k`, `2048`: an optional K, M, G or T suffix (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    m = re.fullmatch(r"(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise BadInput(f"{what} {text!r}: expected a size like 512M or 16G")
    return int(m.group(1)) * units[m.group(2).upper()]


def format_size(n: int) -> str:
    """`n` bytes as parse_size reads it back, for messages: `16 GiB`, `4 MiB`, `512 KiB`, else `n bytes`."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- the cache as a whole: what `xbuild cache du|prune` see ------------------------------------------

NAMESPACES = ("blobs/sha256", "diffs/sha256")  # kinds whose entries sit one level further down
# a running process's state kept under the cache root (the warm rig's, builder/run/warm.py), not cache
# entries: never listed, pruned or collected as temps
RUNTIME = "rig-run"


@dataclass(frozen=True)
class Entry:
    """One removable unit of the cache: a blob, a diff, an init or kernel directory, a pulled artifact..."""

    path: Path
    kind: str  # the top-level directory: blobs, diffs, init, kernels, pulled, xenrig...
    size: int  # bytes on disk (allocated blocks), the whole tree for a directory
    used: float  # last use: the later of atime and mtime (see `touch`)


def disk_usage(path: Path) -> int:
    """Bytes allocated to `path` and, for a directory, everything under it (symlinks not followed)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    total = st.st_blocks * 512
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def entries(root: Path) -> list[Entry]:
    """Every entry of the cache (temps excluded), least recently used first."""
    found = []
    for kind_dir in sorted(p for p in root.iterdir() if not is_temp(p.name) and p.name != RUNTIME):
        if not kind_dir.is_dir() or kind_dir.is_symlink():
            found.append(_entry(kind_dir, kind_dir.name))
            continue
        spaces = [root / ns for ns in NAMESPACES if ns.startswith(kind_dir.name + "/")]
        for parent in spaces or [kind_dir]:
            if parent.is_dir():
                found += [_entry(p, kind_dir.name) for p in parent.iterdir() if not is_temp(p.name)]
        found += [
            _entry(p, kind_dir.name)
            for p in kind_dir.iterdir()
            if spaces and p not in spaces and not is_temp(p.name)
        ]
    return sorted(found, key=lambda e: (e.used, str(e.path)))


def _entry(path: Path, kind: str) -> Entry:
    st = path.lstat()
    return Entry(path, kind, disk_usage(path), max(st.st_atime, st.st_mtime))


@dataclass(frozen=True)
class Pruned:
    temps: tuple[Path, ...]  # stale temps removed
    removed: tuple[Entry, ...]  # least recently used entries removed for --max-size
    in_use: tuple[Entry, ...]  # entries a running xbuild holds, left in place
    size: int  # bytes on disk after pruning


def prune(root: Path, max_size: int | None, age: float = TEMP_AGE) -> Pruned:
    """Remove stale temps, then, with `max_size`, the least recently used entries until the cache takes at
    most `max_size` bytes; an entry a running xbuild holds (flock) is never removed."""
    temps = collect_temps(root, age)
    size = disk_usage(root)
    removed, in_use = [], []
    if max_size is not None:
        for e in entries(root):
            if size <= max_size:
                break
            if remove_unlocked(e.path):
                removed.append(e)
                size -= e.size
            else:
                in_use.append(e)
    return Pruned(tuple(temps), tuple(removed), tuple(in_use), disk_usage(root))
