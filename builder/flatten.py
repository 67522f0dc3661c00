"""Flatten: apply an image's layers in order onto a `Tree`, with full OCI layer semantics.

Each layer's uncompressed tar (from the diff cache) is read once, member by member; regular file
content is recorded as a byte range in that tar, never extracted. Whiteouts (`.wh.NAME`) delete from
the layers below, opaque markers (`.wh..wh..opq`) hide a directory's lower contents, a path may
change type across layers, and hardlinks share the inode they point to at the time they appear.
The tar is read by `tarread` (Go archive/tar's reading, strict); what the index does not model is
refused with one FlattenError: sparse files, contiguous files and other member types, names that leave
the root or are longer than Linux can create, the root named by a non-directory, self and directory
hardlinks and hardlinks to below themselves, whiteouts of '.'/'..', owners and device numbers beyond 32 bits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import tarread
from .blobs import Diff, DiffChanged, forget_verified, open_diff
from .errors import FlattenError
from .image import Image, Layer
from .tarread import Member, TarFormatError, read_members
from .tree import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, Content, Inode, Tree, split

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
PATH_MAX, NAME_MAX = 4095, 255  # what Linux (and so the kernel's initramfs unpacker) can create
MAX_ID = 0xFFFFFFFF  # uid, gid and device numbers travel in cpio newc's 32-bit fields
_KINDS = {
    tarread.DIR: DIR,
    tarread.SYMLINK: SYMLINK,
    tarread.CHAR: CHAR,
    tarread.BLK: BLOCK,
    tarread.FIFO: FIFO,
    tarread.REG: FILE,
}


@dataclass(frozen=True)
class Flattened:
    tree: Tree
    entries: int  # tar members applied, over all layers
    whiteouts: int


def flatten(
    image: Image, progress: Callable[[int], None] | None = None, max_layer_size: int | None = None
) -> Flattened:
    """Fetch (if needed), verify and apply every layer of `image`; return the resulting tree.

    Each cached diff is hashed as it is read and checked against its diff_id; when one is bad (it is removed),
    flatten runs once more, on that diff decompressed again from its blob.
    """
    forget_verified()
    try:
        return flatten_tars([(layer, open_diff(layer, progress, max_layer_size)) for layer in image.layers])
    except DiffChanged:
        return flatten_tars([(layer, open_diff(layer, progress, max_layer_size)) for layer in image.layers])


def flatten_tars(diffs: Sequence[tuple[Layer | str, Path | Diff]]) -> Flattened:
    """Apply uncompressed layer tars in order. Each item is (layer or label, its tar: a path, or a cached
    `Diff`, checked against its diff_id once read: a mismatch raises DiffChanged, not the tar's errors)."""
    tree = Tree()
    entries = whiteouts = 0
    for layer, path in diffs:
        label = f"layer {layer.digest[:19]}" if isinstance(layer, Layer) else str(layer)
        diff = path if isinstance(path, Diff) else None
        applier = _Applier(tree, diff.source if diff else str(path), label)
        try:
            with contextlib.nullcontext(diff) if diff else open(str(path), "rb") as f:
                for member in read_members(f, applier.size):  # type: ignore[arg-type]
                    applier.apply(member)
        except (TarFormatError, FlattenError) as e:
            if diff:
                diff.check()  # a corrupt cache entry rather than a bad layer?
            if isinstance(e, FlattenError):
                raise
            raise FlattenError(f"{label}: {e}") from None
        if diff:
            diff.check()
        entries += applier.count
        whiteouts += applier.whiteouts
    return Flattened(tree, entries, whiteouts)


class _Applier:
    """Applies the members of one layer; knows which paths this layer itself added (`added`) and the
    directories above them (`parents`), so whiteouts and opaque markers, wherever they sit in the tar,
    only hide what the lower layers put there."""

    def __init__(self, tree: Tree, source: str, label: str):
        self.tree, self.source, self.label = tree, source, label
        self.added: set[str] = set()
        self.parents: set[str] = set()
        self.count = self.whiteouts = 0
        self.size = Path(source).stat().st_size

    def fail(self, name: str, why: str) -> FlattenError:
        return FlattenError(f"{self.label}: member {name!r}: {why}")

    def clean(self, name: str, member: str | None = None) -> str:
        """`name` without './' parts; absolute or '..' names (of a member or its hardlink target) fail."""
        what = "" if member is None else f"hardlink target {name!r}: "
        if name.startswith("/"):
            raise self.fail(member or name, what + "absolute path would escape the root")
        parts = split(name)
        if ".." in parts:
            raise self.fail(member or name, what + "'..' would escape the root")
        path = "/".join(parts)
        raw = os.fsencode(path)
        if len(raw) > PATH_MAX:
            raise self.fail(member or name, what + f"path longer than {PATH_MAX} bytes (PATH_MAX)")
        if raw and max(map(len, raw.split(b"/"))) > NAME_MAX:
            raise self.fail(member or name, what + f"a name longer than {NAME_MAX} bytes (NAME_MAX)")
        return path

    def apply(self, m: Member) -> None:
        self.count += 1
        path = self.clean(m.name)
        base = path.rsplit("/", 1)[-1]
        if base.startswith(WHITEOUT):
            self.whiteouts += 1
            self.whiteout(path, base, m.name)
            return
        for what, value in (
            ("uid", m.uid),
            ("gid", m.gid),
            ("device major", m.devmajor),
            ("device minor", m.devminor),
        ):
            if value > MAX_ID:
                raise self.fail(m.name, f"{what} {value} is out of range (at most {MAX_ID})")
        if not path:  # "./": the root directory itself
            if m.type != tarread.DIR:
                raise self.fail(m.name, "names the root directory but is not a directory")
            self._meta(self.tree.root, m)
            return
        if m.type == tarread.LINK:
            target_path = self.clean(m.linkname, m.name)
            if target_path == path:
                raise self.fail(m.name, "hardlink to itself")
            if not target_path:
                raise self.fail(m.name, "hardlink to the root directory")
            if target_path.startswith(path + "/"):  # replacing `path` removes the target (moby fails too)
                raise self.fail(m.name, f"hardlink to {m.linkname!r}, below the path it replaces")
            target = self.tree.lookup(target_path)
            if target is None:
                raise self.fail(m.name, f"hardlink to missing target {m.linkname!r}")
            if target.kind == DIR:
                raise self.fail(m.name, f"hardlink to directory {m.linkname!r}")
            self.place(path, target, m.name)
            return
        kind = _KINDS[m.type]
        if kind == DIR:
            existing = self.tree.lookup(path)
            if existing is not None and existing.kind == DIR:
                self._meta(existing, m)
                self.mark(path)
                return
        node = Inode(kind, children={} if kind == DIR else None)
        self._meta(node, m)
        if kind == FILE:
            node.size = m.size
            node.content = Content(self.source, m.offset, m.size) if m.size else b""
        elif kind == SYMLINK:
            if len(os.fsencode(m.linkname)) > PATH_MAX:
                raise self.fail(m.name, f"symlink target longer than {PATH_MAX} bytes (PATH_MAX)")
            node.target = m.linkname
        elif kind in (CHAR, BLOCK):
            node.rdev = (m.devmajor, m.devminor)
        self.place(path, node, m.name)

    def place(self, path: str, node: Inode, name: str) -> None:
        loc = self.tree.parent_of(path, create=True)
        if loc is None:
            raise self.fail(name, "a parent directory is not a directory")
        parent, last = loc
        assert parent.children is not None
        parent.children[last] = node
        self.mark(path)

    def mark(self, path: str) -> None:
        self.added.add(path)
        parent = path.rpartition("/")[0]
        while parent and parent not in self.parents:
            self.parents.add(parent)
            parent = parent.rpartition("/")[0]

    def whiteout(self, path: str, base: str, name: str) -> None:
        parent_path = path.rsplit("/", 1)[0] if "/" in path else ""
        if base == OPAQUE:
            self.prune(parent_path, self.tree.lookup(parent_path, follow=True))
            return
        if base.startswith(WHITEOUT + WHITEOUT):  # other aufs metadata (.wh..wh.plnk, ...)
            return
        if base[len(WHITEOUT) :] in ("", ".", ".."):
            raise self.fail(name, "whiteout of no name, '.' or '..'")
        victim = (parent_path + "/" if parent_path else "") + base[len(WHITEOUT) :]
        if victim in self.added or victim in self.parents:
            self.prune(victim, self.tree.lookup(victim))
        else:
            self.tree.remove(victim)

    def prune(self, path: str, node: Inode | None) -> None:
        """Below directory `node` at `path`, delete everything this layer did not add, at any depth."""
        stack = [(path, node)]
        while stack:
            path, node = stack.pop()
            if node is None or not node.children:
                continue
            prefix = path + "/" if path else ""
            for name, child in list(node.children.items()):
                if prefix + name in self.added or prefix + name in self.parents:
                    stack.append((prefix + name, child))
                else:
                    del node.children[name]

    @staticmethod
    def _meta(node: Inode, m: Member) -> None:
        node.mode = m.mode & 0o7777
        node.uid, node.gid, node.mtime = m.uid, m.gid, m.mtime
        node.xattrs = dict(m.xattrs) or None
