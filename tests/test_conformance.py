"""Conformance: the initrd of flatten + pack holds exactly what `umoci unpack` extracts from the same image.

Compared per path: type and permission bits, owner, mtime, symlink target, device numbers, content
(sha256) and hardlink groups; xattrs are compared on the flattened tree, since cpio cannot carry them.
The one accepted difference: directory mtimes that umoci leaves at the time of extraction (implicit
parents, which flatten dates 0 for reproducibility, and directories whose entries a later whiteout or
opaque marker of the same layer deleted, where flatten keeps the mtime the layer gives).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from builder.cpio import pack, read_cpio
from builder.flatten import flatten
from builder.reference import parse
from builder.source import load
from tests.fixtures.images import OciImage

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("umoci"), reason="needs root (owners, devices) and umoci"
)

Entry = tuple[Any, ...]


def from_initrd(path: Path) -> tuple[dict[str, Entry], set[frozenset[str]]]:
    """path -> (st_mode, uid, gid, mtime, target, rdev, sha256) and the hardlink groups, from the initrd."""
    with zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True) as r:
        entries = read_cpio(r.read())
    by_ino: dict[object, list[dict[str, Any]]] = {}
    for e in entries:
        by_ino.setdefault(e["ino"], []).append(e)
    out = {}
    for e in entries:
        mode = int(e["mode"])  # type: ignore[call-overload]
        data = max((x["data"] for x in by_ino[e["ino"]]), key=len)  # a hardlink group's data is on one name
        target = data.decode("utf-8", "surrogateescape") if stat.S_ISLNK(mode) else ""
        digest = hashlib.sha256(data).hexdigest() if stat.S_ISREG(mode) else ""
        rdev = (e["rdevmajor"], e["rdevminor"]) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else (0, 0)
        out[str(e["name"])] = (mode, e["uid"], e["gid"], e["mtime"], target, rdev, digest)
    groups = {frozenset(str(x["name"]) for x in group) for group in by_ino.values() if len(group) > 1}
    return out, groups


def from_disk(root: Path) -> tuple[dict[str, Entry], set[frozenset[str]], dict[str, dict[str, bytes]]]:
    """The same description of an extracted root file system, plus each path's xattrs."""
    out: dict[str, Entry] = {}
    by_ino: dict[int, set[str]] = {}
    xattrs = {}
    paths = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames]
    for rel in paths:
        full = root / rel
        st = os.lstat(full)
        target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
        digest = hashlib.sha256(full.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        rdev = (
            (os.major(st.st_rdev), os.minor(st.st_rdev))
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else (0, 0)
        )
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime), target, rdev, digest)
        if not stat.S_ISDIR(st.st_mode):
            by_ino.setdefault(st.st_ino, set()).add(rel)
        names = [n for n in os.listxattr(full, follow_symlinks=False) if n != "security.selinux"]
        if names:
            xattrs[rel] = {n: os.getxattr(full, n, follow_symlinks=False) for n in names}
    return out, {frozenset(g) for g in by_ino.values() if len(g) > 1}, xattrs


@pytest.mark.parametrize("fixture", ["whiteout_image", pytest.param("nginx_image", marks=pytest.mark.slow)])
def test_initrd_matches_umoci_unpack(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    image: OciImage = request.getfixturevalue(fixture)
    tree = flatten(load(parse(image.ref))).tree
    pack(tree, tmp_path / "initrd.zst", "zstd", level=3)
    ours, our_links = from_initrd(tmp_path / "initrd.zst")
    bundle = tmp_path / "bundle"
    started = int(time.time())
    subprocess.run(
        ["umoci", "unpack", "--image", f"{image.layout}:{image.name}", str(bundle)],
        check=True,
        capture_output=True,
    )
    theirs, their_links, their_xattrs = from_disk(bundle / "rootfs")

    assert sorted(ours) == sorted(theirs)
    stamped = {path for path, e in theirs.items() if stat.S_ISDIR(e[0]) and e[3] >= started}
    fields = ("mode", "uid", "gid", "mtime", "target", "rdev", "sha256")
    differences = []
    for path, mine in ours.items():
        for name, a, b in zip(fields, mine, theirs[path], strict=True):
            if a != b and not (name == "mtime" and path in stamped):
                differences.append(f"{path}: {name} {a!r} (xbuild) != {b!r} (umoci)")
    assert differences == []
    assert our_links == their_links
    tree_xattrs = {path or ".": dict(node.xattrs) for path, node in tree.walk() if node.xattrs}
    assert tree_xattrs == their_xattrs
