"""Flatten: apply an image's layers in order onto a `Tree`, with full OCI layer semantics.

Each layer's uncompressed tar (from the diff cache) is read once, member by member; regular file
content is recorded as a byte range in that tar, never extracted. Whiteouts (`.wh.NAME`) delete from
the layers below, opaque markers (`.wh..wh..opq`) hide a directory's lower contents, a path may
change type across layers, and hardlinks share the inode they point to at the time they appear.
"""

from __future__ import annotations

import base64
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .blobs import ensure_diff
from .errors import FlattenError
from .image import Image, Layer
from .tree import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, Content, Inode, Tree, split

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_KINDS = {tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.CHRTYPE: CHAR, tarfile.BLKTYPE: BLOCK,
          tarfile.FIFOTYPE: FIFO, tarfile.REGTYPE: FILE, tarfile.AREGTYPE: FILE, tarfile.CONTTYPE: FILE}


@dataclass(frozen=True)
class Flattened:
    tree: Tree
    entries: int          # tar members applied, over all layers
    whiteouts: int


def flatten(image: Image, progress: Callable[[int], None] | None = None) -> Flattened:
    """Fetch (if needed), verify and apply every layer of `image`; return the resulting tree."""
    diffs = [(layer, ensure_diff(layer, progress)) for layer in image.layers]
    return flatten_tars(diffs)


def flatten_tars(diffs: Sequence[tuple[Layer | str, Path]]) -> Flattened:
    """Apply uncompressed layer tars in order. Each item is (layer or label, path of its tar)."""
    tree = Tree()
    entries = whiteouts = 0
    for layer, path in diffs:
        label = f"layer {layer.digest[:19]}" if isinstance(layer, Layer) else str(layer)
        applier = _Applier(tree, str(path), label)
        try:
            with tarfile.open(path, "r:", ignore_zeros=False) as tar:
                for member in tar:
                    applier.apply(member, tar)
        except tarfile.TarError as e:
            raise FlattenError(f"{label}: corrupt tar ({e})") from None
        entries += applier.count
        whiteouts += applier.whiteouts
    return Flattened(tree, entries, whiteouts)


class _Applier:
    """Applies the members of one layer; knows which paths this layer itself added."""

    def __init__(self, tree: Tree, source: str, label: str):
        self.tree, self.source, self.label = tree, source, label
        self.added: set[str] = set()
        self.count = self.whiteouts = 0
        self.size = Path(source).stat().st_size

    def fail(self, name: str, why: str) -> FlattenError:
        return FlattenError(f"{self.label}: member {name!r}: {why}")

    def clean(self, name: str) -> str:
        if name.startswith("/"):
            raise self.fail(name, "absolute path would escape the root")
        parts = split(name)
        if ".." in parts:
            raise self.fail(name, "'..' would escape the root")
        return "/".join(parts)

    def apply(self, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self.count += 1
        path = self.clean(m.name)
        base = path.rsplit("/", 1)[-1]
        if base.startswith(WHITEOUT):
            self.whiteouts += 1
            self.whiteout(path, base)
            return
        if not path:  # "./": the root directory itself
            if m.isdir():
                self._meta(self.tree.root, m)
            return
        if m.islnk():
            target_path = self.clean(m.linkname)
            target = self.tree.lookup(target_path)
            if target is None:
                raise self.fail(m.name, f"hardlink to missing target {m.linkname!r}")
            if target.kind == DIR:
                raise self.fail(m.name, f"hardlink to directory {m.linkname!r}")
            self.place(path, target, m.name)
            return
        kind = _KINDS.get(m.type)
        if kind is None:
            if m.issparse():
                raise self.fail(m.name, "sparse files are not supported")
            raise self.fail(m.name, f"unsupported tar member type {m.type!r}")
        if kind == DIR:
            existing = self.tree.lookup(path)
            if existing is not None and existing.kind == DIR:
                self._meta(existing, m)
                self.added.add(path)
                return
        node = Inode(kind, children={} if kind == DIR else None)
        self._meta(node, m)
        if kind == FILE:
            if m.offset_data + m.size > self.size:
                raise self.fail(m.name, "truncated tar (content runs past the end)")
            node.size = m.size
            node.content = Content(self.source, m.offset_data, m.size) if m.size else b""
        elif kind == SYMLINK:
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
        self.added.add(path)

    def whiteout(self, path: str, base: str) -> None:
        parent_path = path.rsplit("/", 1)[0] if "/" in path else ""
        if base == OPAQUE:
            parent = self.tree.lookup(parent_path, follow=True)
            if parent is not None and parent.children:
                prefix = parent_path + "/" if parent_path else ""
                for child in [c for c in parent.children if prefix + c not in self.added]:
                    del parent.children[child]
            return
        if base.startswith(WHITEOUT + WHITEOUT):  # other aufs metadata (.wh..wh.plnk, ...)
            return
        victim = (parent_path + "/" if parent_path else "") + base[len(WHITEOUT):]
        if victim not in self.added:
            self.tree.remove(victim)

    @staticmethod
    def _meta(node: Inode, m: tarfile.TarInfo) -> None:
        node.mode = m.mode & 0o7777
        node.uid, node.gid, node.mtime = m.uid, m.gid, int(m.mtime)
        xattrs: dict[str, bytes] = {}
        for key, value in m.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                xattrs[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
            elif key.startswith("LIBARCHIVE.xattr."):
                xattrs[key[len("LIBARCHIVE.xattr."):]] = base64.b64decode(value + "==")
        node.xattrs = xattrs or None
