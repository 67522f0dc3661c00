"""Pack: the cpio newc initramfs, checked with our reader and with GNU cpio, for every compression."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import zstandard

from builder.build import source_date_epoch
from builder.compression import COMPRESSIONS, LZ4_LEGACY_MAGIC
from builder.cpio import pack, read_cpio
from builder.errors import BadInput, PackError
from builder.flatten import flatten
from builder.reference import parse
from builder.source import load
from builder.tree import FILE, SYMLINK, Content, Inode, Tree, read_content
from tests.fixtures.images import MTIME, OciImage

pytestmark = pytest.mark.usefixtures("xbuild_cache")


def decompress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as r:
            return r.read()
    if compression == "lz4":
        assert data[:4] == LZ4_LEGACY_MAGIC
        return subprocess.run(["lz4", "-dc"], input=data, capture_output=True, check=True).stdout
    if compression == "gzip":
        return gzip.decompress(data)
    return data


def flat(image: OciImage) -> Tree:
    return flatten(load(parse(image.ref))).tree


@pytest.fixture
def tree(whiteout_image: OciImage) -> Tree:
    return flat(whiteout_image)


def packed(tree: Tree, path: Path, compression: str = "none", **kwargs: object) -> list[dict[str, object]]:
    result = pack(tree, path, compression, **kwargs)  # type: ignore[arg-type]
    data = path.read_bytes()
    assert result.size == len(data) and result.sha256 == hashlib.sha256(data).hexdigest()
    cpio = decompress(data, compression)
    assert result.uncompressed_size == len(cpio)
    return read_cpio(cpio)


def expected(tree: Tree) -> dict[str, tuple[int, int, int, int, int, tuple[int, int]]]:
    """path -> (st_mode, uid, gid, mtime, data size, rdev) per entry; of a hardlink group, the last name
    carries the data."""
    walked = list(tree.walk())
    last = {id(node): path for path, node in walked}
    out = {}
    for path, node in walked:
        size = len(node.target) if node.kind == SYMLINK else node.size if last[id(node)] == path else 0
        out[path or "."] = (node.st_mode, node.uid, node.gid, node.mtime, size, node.rdev)
    return out


def by_name(entries: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(e["name"]): e for e in entries}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip(tmp_path: Path, tree: Tree, compression: str) -> None:
    entries = packed(tree, tmp_path / f"initrd.{compression}", compression)
    ents = by_name(entries)
    assert len(ents) == len(entries)
    got = {
        name: (e["mode"], e["uid"], e["gid"], e["mtime"], e["size"], (e["rdevmajor"], e["rdevminor"]))
        for name, e in ents.items()
    }
    assert got == expected(tree)
    for path, node in tree.walk():
        e = ents[path or "."]
        if node.kind == FILE and e["size"]:
            assert e["data"] == read_content(node), path
        elif node.kind == SYMLINK:
            assert e["data"] == node.target.encode()


def test_order_is_sorted_parents_first(tmp_path: Path, tree: Tree) -> None:
    names = [str(e["name"]) for e in packed(tree, tmp_path / "initrd")]
    assert names[0] == "."
    rest = names[1:]
    assert rest == sorted(rest, key=lambda p: [os.fsencode(c) for c in p.split("/")])
    seen = {"."}
    for name in rest:
        assert (name.rpartition("/")[0] or ".") in seen, name
        seen.add(name)
    inos = {e["ino"] for e in packed(tree, tmp_path / "initrd")}
    assert inos == set(range(1, len(inos) + 1))  # renumbered from 1


def test_hardlinks_share_inode_and_data(tmp_path: Path, tree: Tree) -> None:
    ents = by_name(packed(tree, tmp_path / "initrd"))
    keep, link = ents["data/keep.txt"], ents["links/hard-to-keep"]
    assert keep["ino"] == link["ino"] and keep["nlink"] == link["nlink"] == 2
    assert [keep["size"], link["size"]] == [0, 5]  # data on the last name, as GNU cpio writes
    assert link["data"] == b"keep\n"
    assert ents["links/hard-to-replaced"]["ino"] != ents["links/replaced"]["ino"]
    assert ents["links/hard"]["nlink"] == 1  # its first name was whited out


def test_digests_are_the_sha256_of_every_regular_file_written(tmp_path: Path, tree: Tree) -> None:
    """pack hashes each file as it reads it (the SBOM takes these instead of reading the tree again): every
    regular file's path, both names of a hardlink group, the data the archive holds for it."""
    result = pack(tree, tmp_path / "initrd", "none")
    ents = by_name(read_cpio((tmp_path / "initrd").read_bytes()))
    files = {n for n, e in ents.items() if stat.S_ISREG(int(e["mode"]))}
    assert set(result.digests) == files and {"data/keep.txt", "links/hard-to-keep"} <= files
    data = {n: e["data"] for n, e in ents.items() if e["size"]}
    for name in files:
        group = [n for n in files if ents[n]["ino"] == ents[name]["ino"]]
        body = next(data[n] for n in group if n in data) if any(n in data for n in group) else b""
        assert result.digests[name] == hashlib.sha256(body).hexdigest(), name


def test_devices_and_special_modes(tmp_path: Path, tree: Tree) -> None:
    ents = by_name(packed(tree, tmp_path / "initrd"))
    assert (ents["dev/null"]["mode"], ents["dev/null"]["rdevmajor"], ents["dev/null"]["rdevminor"]) == (
        stat.S_IFCHR | 0o666,
        1,
        3,
    )
    assert ents["dev/sda"]["mode"] == stat.S_IFBLK | 0o660 and ents["dev/sda"]["rdevmajor"] == 8
    assert ents["dev/initctl"]["mode"] == stat.S_IFIFO | 0o600
    assert ents["bin/su"]["mode"] == stat.S_IFREG | 0o4755
    assert ents["tmp"]["mode"] == stat.S_IFDIR | 0o1777


def test_reproducible_across_separate_flattens(
    tmp_path: Path, whiteout_image: OciImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = set()
    for i in range(2):
        monkeypatch.setenv("XBUILD_CACHE", str(tmp_path / f"cache{i}"))  # content in different files
        for compression in COMPRESSIONS:
            digests.add(
                (compression, pack(flat(whiteout_image), tmp_path / f"{i}.{compression}", compression).sha256)
            )
    assert len(digests) == len(COMPRESSIONS)


def test_files_over_4_gib_are_refused(tmp_path: Path) -> None:
    tree = Tree()
    tree.add("huge", Inode(FILE, size=5 << 30, content=Content("/dev/zero", 0, 5 << 30)))
    with pytest.raises(PackError, match="/huge: too large for cpio newc"):
        pack(tree, tmp_path / "initrd", "none")
    assert not (tmp_path / "initrd").exists()


def test_zstd_output_does_not_depend_on_the_cpu_count(
    tmp_path: Path, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = set()
    for cpus in (1, 2, 8):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        digests.add(pack(tree, tmp_path / f"initrd{cpus}", "zstd", level=3).sha256)
    assert len(digests) == 1


def test_busybox_image(tmp_path: Path, busybox_image: OciImage) -> None:
    ents = by_name(packed(flat(busybox_image), tmp_path / "initrd"))
    assert ents["bin/busybox"]["data"] == Path("/bin/busybox").read_bytes()
    assert ents["bin/sh"]["mode"] == stat.S_IFLNK | 0o777 and ents["bin/sh"]["data"] == b"busybox"
    assert ents["tmp"]["mode"] == stat.S_IFDIR | 0o1777
    assert b"root:x:0:0:" in ents["etc/passwd"]["data"]  # type: ignore[operator]


def test_source_date_epoch_clamps_mtimes(tmp_path: Path, tree: Tree) -> None:
    epoch = MTIME - 1
    ents = by_name(packed(tree, tmp_path / "initrd", epoch=epoch))
    assert max(int(e["mtime"]) for e in ents.values()) == epoch  # type: ignore[call-overload]
    assert ents["data/keep.txt"]["mtime"] == 1234  # older than the epoch: kept
    assert ents["implicit"]["mtime"] == 0
    late = by_name(packed(tree, tmp_path / "late", epoch=MTIME + 1000))
    assert {n: e["mtime"] for n, e in late.items()} == {n: e[3] for n, e in expected(tree).items()}


def test_source_date_epoch_from_the_environment(
    whiteout_image: OciImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = load(parse(whiteout_image.ref))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert source_date_epoch(image, None) == MTIME  # the image's created time
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000")
    assert source_date_epoch(image, None) == 1000
    assert source_date_epoch(image, 5) == 5
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(BadInput, match="SOURCE_DATE_EPOCH"):
        source_date_epoch(image, None)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("cpio"), reason="needs root and GNU cpio")
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_gnu_cpio_extracts_it(tmp_path: Path, tree: Tree, compression: str) -> None:
    initrd = tmp_path / "initrd"
    pack(tree, initrd, compression)
    dest = tmp_path / "root"
    dest.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--no-absolute-filenames", "--quiet"],
        cwd=dest,
        check=True,
        input=decompress(initrd.read_bytes(), compression),
    )
    on_disk = {}
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            on_disk[os.path.relpath(full, dest)] = os.lstat(full)
    want = expected(tree)
    want.pop(".")
    assert set(on_disk) == set(want)
    inodes: dict[int, set[str]] = {}
    for path, st in on_disk.items():
        mode, uid, gid, mtime, _, rdev = want[path]
        assert (st.st_mode, st.st_uid, st.st_gid) == (mode, uid, gid), path
        if not stat.S_ISDIR(mode):  # a directory's mtime moves when GNU cpio creates its children
            assert int(st.st_mtime) == mtime or stat.S_ISLNK(mode), path
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == rdev, path
        node = tree.lookup(path)
        assert node is not None
        if node.kind == FILE:
            assert Path(dest, path).read_bytes() == read_content(node), path
            inodes.setdefault(st.st_ino, set()).add(path)
        elif node.kind == SYMLINK:
            assert os.readlink(dest / path) == node.target
    assert {"data/keep.txt", "links/hard-to-keep"} in inodes.values()
