"""The flattened root file system, held as an index: metadata in memory, content by reference.

A `Tree` is a root directory `Inode`; directories map names to inodes. Hardlinked paths share one
`Inode` object, so a hardlink keeps its content even when the original name is later replaced.
File content is a `Content` (a byte range in a cached layer tar) or, for small generated files, bytes.
Paths are POSIX strings relative to the root without a leading slash; the root is "".

Every writer of a tree (the initramfs, the disk's tar, the probe's copy) walks it through `entries`, the one
walk with the reproducibility rules: depth first, names in byte order; inode numbers from 1 in that order;
a hardlink group (paths sharing a non-directory Inode) known by its first path (the leader) and its last;
mtimes clamped to the epoch (SOURCE_DATE_EPOCH). Content is read through one `ContentReader` per writer:
each layer tar opened once, and one that ends before a file's content does is a CacheError.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import CacheError

FILE, DIR, SYMLINK, CHAR, BLOCK, FIFO = "file", "dir", "symlink", "char", "block", "fifo"
KIND_BITS = {
    FILE: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHAR: stat.S_IFCHR,
    BLOCK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
}
MAX_SYMLINKS = 40
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Content:
    """`size` bytes at `offset` in the file `source` (an uncompressed layer tar in the cache)."""

    source: str
    offset: int
    size: int


@dataclass(slots=True, eq=False)
class Inode:
    kind: str
    mode: int = 0o755  # permission bits incl. setuid/setgid/sticky (0o7777)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    content: Content | bytes | None = None
    target: str = ""  # symlink target
    rdev: tuple[int, int] = (0, 0)  # device major/minor
    xattrs: dict[str, bytes] | None = None
    children: dict[str, Inode] | None = None

    @property
    def st_mode(self) -> int:
        return KIND_BITS[self.kind] | (self.mode & 0o7777)


def directory(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0) -> Inode:
    return Inode(DIR, mode, uid, gid, mtime, children={})


def regular(data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 0) -> Inode:
    return Inode(FILE, mode, uid, gid, mtime, size=len(data), content=data)


def split(path: str) -> list[str]:
    """Components of a tree path ('' and '.' dropped); '..' is kept for the resolver to clamp."""
    return [c for c in path.split("/") if c and c != "."]


@dataclass
class Tree:
    root: Inode = field(default_factory=directory)

    def parent_of(self, path: str, create: bool = False) -> tuple[Inode, str] | None:
        """(parent directory inode, last name), symlinks in the parent path resolved inside the tree;
        missing parents are created (0755 root) when `create`. None if a parent is not a directory."""
        parts = split(path)
        if not parts:
            return None
        try:
            real = split(self.real_path("/".join(parts[:-1])))
        except LookupError:
            return None
        node = self.root
        for name in real:
            assert node.children is not None
            child = node.children.get(name)
            if child is None:
                if not create:
                    return None
                child = node.children[name] = directory()
            if child.kind != DIR:
                return None
            node = child
        return node, parts[-1]

    def real_path(self, path: str, follow: bool = True, links: list[str] | None = None) -> str:
        """The path with every symlink resolved inside the tree (like a chroot): '..' stops at '/'.
        Each symlink met on the way is appended to `links` when given."""
        todo = split(path)[::-1]  # a stack: the next component last
        done: list[str] = []
        hops = 0
        node = self.root
        while todo:
            name = todo.pop()
            if name == "..":
                if done:
                    done.pop()
                node = self._walk(done) or self.root
                continue
            child = node.children.get(name) if node.children is not None else None
            if child is not None and child.kind == SYMLINK and (todo or follow):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise LookupError(f"/{path}: too many levels of symbolic links")
                if links is not None:
                    links.append("/".join(done + [name]))
                if child.target.startswith("/"):
                    done, node = [], self.root
                todo += split(child.target)[::-1]
                continue
            done.append(name)
            node = Inode(FILE) if child is None else child  # missing: the rest resolves lexically
        return "/".join(done)

    def _walk(self, parts: list[str]) -> Inode | None:
        node = self.root
        for name in parts:
            if node.children is None or name not in node.children:
                return None
            node = node.children[name]
        return node

    def lookup(self, path: str, follow: bool = False) -> Inode | None:
        """The inode at `path` (intermediate symlinks resolved; the last one only with follow)."""
        try:
            return self._walk(split(self.real_path(path, follow=follow)))
        except LookupError:
            return None

    def read(self, path: str) -> bytes:
        """The content of a regular file (symlinks followed); FileNotFoundError if there is none."""
        node = self.lookup(path, follow=True)
        if node is None or node.kind != FILE:
            raise FileNotFoundError(f"/{path}")
        return read_content(node)

    def add(self, path: str, inode: Inode) -> None:
        """Place `inode` at `path`, creating missing parent directories (0755 root)."""
        loc = self.parent_of(path, create=True)
        if loc is None:
            raise ValueError(f"/{path}: parent is not a directory")
        parent, name = loc
        assert parent.children is not None
        parent.children[name] = inode

    def remove(self, path: str) -> Inode | None:
        loc = self.parent_of(path)
        if loc is None or loc[0].children is None:
            return None
        return loc[0].children.pop(loc[1], None)

    def walk(self) -> Iterator[tuple[str, Inode]]:
        """Every (path, inode), depth first, children in byte order of their names; root first as ''."""
        stack: list[tuple[str, Inode]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                prefix = path + "/" if path else ""
                for name in sorted(node.children, key=os.fsencode, reverse=True):
                    stack.append((prefix + name, node.children[name]))


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of a tree as every writer writes it (`entries`)."""

    path: str  # "" for the root
    node: Inode
    ino: int  # 1, 2, ... in walk order; the paths of a hardlink group share one
    links: int  # how many paths share `node` (1 for a directory)
    leader: str  # the first path of its hardlink group (later ones link to it); `path` when alone
    last: bool  # the last path of its group (where cpio puts the data)
    mtime: int  # node.mtime, clamped to the epoch when one is given

    @property
    def is_leader(self) -> bool:
        return self.path == self.leader


def entries(tree: Tree, epoch: int | None = None) -> list[Entry]:
    """Every path of `tree` in `Tree.walk` order, with its inode number, hardlink group and clamped mtime
    (module doc). Directories are never grouped."""
    walked = list(tree.walk())
    groups: dict[int, list[str]] = {}
    for path, node in walked:
        if node.kind != DIR:
            groups.setdefault(id(node), []).append(path)
    inos: dict[int, int] = {}
    out = []
    for path, node in walked:
        group = groups.get(id(node), [path])
        mtime = node.mtime if epoch is None else min(node.mtime, epoch)
        out.append(
            Entry(
                path,
                node,
                inos.setdefault(id(node), len(inos) + 1),
                len(group),
                group[0],
                group[-1] == path,
                mtime,
            )
        )
    return out


class ContentReader:
    """Regular files' content for a writer, read with pread: each source (a cached layer tar) is opened once
    and closed on exit; a source that ends before a file's content does is a CacheError naming it."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def chunks(self, node: Inode) -> Iterator[bytes]:
        """The content of the regular file `node`, in pieces of at most CHUNK bytes."""
        c = node.content
        if not isinstance(c, Content):
            if c:
                yield c
            return
        fd = self.fds.get(c.source)
        if fd is None:
            fd = self.fds[c.source] = os.open(c.source, os.O_RDONLY)
        pos, end = c.offset, c.offset + c.size
        while pos < end:
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)
            if not chunk:
                raise CacheError(f"{c.source}: content ends early (cache corrupted?)")
            yield chunk
            pos += len(chunk)

    def open(self, node: Inode) -> IO[bytes]:
        """The content of `node` as a file object read front to back (for tarfile)."""
        return io.BufferedReader(_Chunks(self.chunks(node)), CHUNK)


class _Chunks(io.RawIOBase):
    """A read-once stream over an iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.rest = chunks, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self.rest:
            self.rest = memoryview(next(self.chunks, b""))
        n = min(len(b), len(self.rest))
        b[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


def read_content(node: Inode) -> bytes:
    """All bytes of a regular file's content."""
    c = node.content
    if c is None:
        return b""
    if isinstance(c, bytes):
        return c
    with open(c.source, "rb") as f:
        return os.pread(f.fileno(), c.size, c.offset)


class ByteRange(io.RawIOBase):
    """A read-only, seekable view of `size` bytes at `offset` of the file `path`."""

    def __init__(self, path: str, offset: int, size: int):
        self.f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.start, self.size, self.pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        data = os.pread(self.f.fileno(), n, self.start + self.pos)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.f.close()
        super().close()


def open_content(node: Inode) -> IO[bytes]:
    """A regular file's content as a seekable stream, read from its layer tar on demand."""
    c = node.content
    if isinstance(c, Content):
        return io.BufferedReader(ByteRange(c.source, c.offset, c.size), 1 << 16)
    return io.BytesIO(c or b"")
