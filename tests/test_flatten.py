"""Flatten: OCI layer semantics on the in-memory tree, and bad layers rejected with a message naming them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from builder.errors import BadInput, FlattenError, SourceError
from builder.flatten import flatten, flatten_tars
from builder.reference import parse
from builder.source import load
from builder.tree import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, Content, Tree
from tests.fixtures.images import (
    CAP_NET_RAW,
    MTIME,
    WHITEOUT_LAYERS,
    Member,
    OciImage,
    compress,
    dir,
    file,
    hardlink,
    layer_tar,
    make_whiteout_image,
    symlink,
    tree_signature,
    write_oci_image,
)

pytestmark = pytest.mark.usefixtures("xbuild_cache")


def flat(image: OciImage) -> Tree:
    return flatten(load(parse(image.ref))).tree


@pytest.fixture
def tree(whiteout_image: OciImage) -> Tree:
    return flat(whiteout_image)


def names(tree: Tree, path: str) -> set[str]:
    node = tree.lookup(path)
    assert node is not None and node.children is not None, path
    return set(node.children)


def test_whiteouts(tree: Tree) -> None:
    assert tree.lookup("data/a.txt") is None
    assert tree.read("data/b.txt") == b"b2\n"  # whited out, then re-added by the same layer
    assert tree.read("etc/hostname") == b"new\n"  # a whiteout only hides lower layers
    assert tree.lookup("gone") is None  # a whole directory
    assert tree.lookup("nonexistent") is None  # whiteout of nothing is harmless
    assert not any(".wh." in path for path, _ in tree.walk())


def test_opaque_directory(tree: Tree) -> None:
    # the marker sits after some of the layer's own entries: those stay, wherever they are in the tar
    assert names(tree, "opq") == {"before.txt", "new.txt", "sub", "lower", "implicit"}
    opq = tree.lookup("opq")
    assert opq is not None and (opq.mode, opq.uid, opq.gid) == (0o755, 0, 0)
    assert names(tree, "opq/sub") == set()  # re-declared below the marker: lower content goes
    assert tree.lookup("opq/sub").mode == 0o700  # type: ignore[union-attr]
    assert names(tree, "opq/lower") == {"y.txt"}  # an implicit parent keeps only this layer's files
    assert tree.read("opq/implicit/f.txt") == b"f\n"


def test_type_changes_across_layers(tree: Tree) -> None:
    f2d, d2s, s2f = (tree.lookup(f"change/{n}") for n in ("f2d", "d2s", "s2f"))
    assert f2d is not None and f2d.kind == DIR and names(tree, "change/f2d") == {"child.txt"}
    assert d2s is not None and d2s.kind == SYMLINK and d2s.target == "../data"
    assert s2f is not None and s2f.kind == FILE and s2f.mode == 0o600
    assert tree.read("change/s2f") == b"symlink, now a file\n"
    # a member below a symlinked directory lands where the symlink points, inside the tree
    assert tree.read("data/via-symlink.txt") == b"through the symlink\n"
    assert "inner.txt" not in names(tree, "data")


def test_hardlinks(tree: Tree) -> None:
    hard = tree.lookup("links/hard")
    assert tree.lookup("links/orig") is None
    assert hard is not None and (hard.mode, hard.uid, hard.gid) == (0o640, 7, 8)
    assert tree.read("links/hard") == b"original\n"  # survives the whiteout of its first name
    assert tree.read("links/hard-to-replaced") == b"v1\n"  # keeps the content the name had when linked
    assert tree.read("links/replaced") == b"v2\n"
    assert tree.lookup("links/hard-to-replaced") is not tree.lookup("links/replaced")
    assert tree.lookup("links/hard-to-keep") is tree.lookup("data/keep.txt")  # across layers: one inode


def test_symlinks(tree: Tree) -> None:
    targets = {n: tree.lookup(f"links/{n}").target for n in ("abs", "rel", "dangling")}  # type: ignore[union-attr]
    assert targets == {"abs": "/etc/passwd", "rel": "../data/keep.txt", "dangling": "/nowhere"}
    assert tree.read("links/abs").startswith(b"root:")
    assert tree.read("links/rel") == b"keep\n"
    assert tree.lookup("links/dangling", follow=True) is None


def test_devices_and_fifos(tree: Tree) -> None:
    got = {
        n: (
            tree.lookup(f"dev/{n}").kind,
            tree.lookup(f"dev/{n}").rdev,  # type: ignore[union-attr]
            tree.lookup(f"dev/{n}").mode,
            tree.lookup(f"dev/{n}").gid,
        )  # type: ignore[union-attr]
        for n in ("null", "sda", "initctl")
    }
    assert got == {
        "null": (CHAR, (1, 3), 0o666, 0),
        "sda": (BLOCK, (8, 0), 0o660, 6),
        "initctl": (FIFO, (0, 0), 0o600, 0),
    }


def test_special_modes_and_owners(tree: Tree) -> None:
    def meta(path: str) -> tuple[int, int, int]:
        node = tree.lookup(path)
        assert node is not None, path
        return node.mode, node.uid, node.gid

    assert meta("bin/su") == (0o4755, 0, 0)
    assert meta("bin/sgid") == (0o2755, 0, 50)
    assert meta("tmp") == (0o1777, 0, 0)
    assert meta("home/user") == (0o700, 1000, 1000)
    assert meta("home/user/.profile") == (0o600, 1000, 1000)
    assert meta("implicit/parents") == (0o755, 0, 0)  # parents missing from the tar: 0755 root


def test_xattrs(tree: Tree) -> None:
    assert tree.lookup("bin/ping").xattrs == {"security.capability": CAP_NET_RAW}  # type: ignore[union-attr]
    assert tree.lookup("data").xattrs == {"user.comment": b"data dir"}  # type: ignore[union-attr]
    assert tree.lookup("bin/su").xattrs is None  # type: ignore[union-attr]


def test_mtimes_and_directory_metadata(tree: Tree) -> None:
    assert tree.root.mtime == MTIME + 100  # "./" of the last layer sets the root's metadata
    etc = tree.lookup("etc")
    assert etc is not None and (etc.mode, etc.mtime) == (0o751, MTIME + 50)
    assert names(tree, "etc") == {"passwd", "hostname"}  # re-declaring a directory keeps its children
    assert tree.lookup("data/keep.txt").mtime == 1234  # type: ignore[union-attr]
    assert tree.lookup("home/user/.profile").mtime == MTIME + 5  # type: ignore[union-attr]


def test_content_stays_in_the_layer_tars(tree: Tree) -> None:
    node = tree.lookup("etc/passwd")
    assert node is not None and isinstance(node.content, Content) and node.size == node.content.size
    assert tree.lookup("empty").size == 0 and tree.read("empty") == b""  # type: ignore[union-attr]


def test_dot_slash_and_plain_names_meet(tree: Tree) -> None:
    assert set(tree.root.children or {}) == {
        "bin",
        "change",
        "data",
        "dev",
        "empty",
        "etc",
        "home",
        "implicit",
        "links",
        "names",
        "opq",
        "tmp",
    }


def test_long_and_odd_names_and_ids(tree: Tree) -> None:
    assert tree.read("names/" + "long-" * 40 + "name") == b"pax path\n"
    assert tree.lookup("names/long-target").target == "/" + "deep/" * 30 + "target"  # type: ignore[union-attr]
    assert tree.read("names/caf\udce9").startswith(b"a latin-1")
    big = tree.lookup("names/big-ids")
    assert big is not None and (big.uid, big.gid) == (3_000_000, 3_000_001)


def test_counts(whiteout_image: OciImage) -> None:
    result = flatten(load(parse(whiteout_image.ref)))
    assert result.entries == sum(len(layer) for layer in WHITEOUT_LAYERS)
    assert result.whiteouts == 7


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_layer_compressions_give_the_same_tree(
    tmp_path: Path, tree: Tree, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XBUILD_CACHE", str(tmp_path / "other-cache"))  # same diff_ids: decompress again
    other = make_whiteout_image(tmp_path / compression, compression=compression)
    assert tree_signature(flat(other)) == tree_signature(tree)


# ---- bad input ----------------------------------------------------------------------------------------


def bad_image(tmp_path: Path, layers: list[list[Member]], **kwargs: object) -> OciImage:
    write_oci_image(tmp_path / "bad", "bad", layers, {"Cmd": ["sh"]}, **kwargs)  # type: ignore[arg-type]
    return OciImage(tmp_path / "bad", "bad")


def rejects(image: OciImage, error: type[BadInput], *words: str) -> None:
    with pytest.raises(error) as info:
        flatten(load(parse(image.ref)))
    assert info.value.exit_code == 2
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./x/../../evil"])
def test_dotdot_member(tmp_path: Path, name: str) -> None:
    rejects(bad_image(tmp_path, [[file(name, b"x")]]), FlattenError, repr(name), "..")


def test_absolute_member(tmp_path: Path) -> None:
    rejects(bad_image(tmp_path, [[file("/etc/evil", b"x")]]), FlattenError, "'/etc/evil'", "absolute")


def test_hardlink_to_missing_target(tmp_path: Path) -> None:
    layers = [[dir("a/"), hardlink("a/link", "a/missing")]]
    rejects(bad_image(tmp_path, layers), FlattenError, "'a/link'", "'a/missing'")


def test_hardlink_outside_the_root(tmp_path: Path) -> None:
    layers = [[file("a", b"x"), hardlink("b", "../../etc/shadow")]]
    rejects(bad_image(tmp_path, layers), FlattenError, "'b'", "'../../etc/shadow'")


def test_truncated_gzip_layer(tmp_path: Path) -> None:
    layers = [[file("big", bytes(range(256)) * 4000)]]
    gz = compress(layer_tar(layers[0]), "gzip")
    rejects(bad_image(tmp_path, layers, layer_blobs=[gz[: len(gz) // 2]]), SourceError, "truncated gzip")


def test_corrupt_gzip_layer(tmp_path: Path) -> None:
    layers = [[file("big", b"hello world\n" * 10000)]]
    gz = bytearray(compress(layer_tar(layers[0]), "gzip"))
    gz[-8:-4] = b"\0\0\0\0"  # CRC32
    rejects(bad_image(tmp_path, layers, layer_blobs=[bytes(gz)]), SourceError, "corrupt", "gzip")


def test_not_gzip_at_all(tmp_path: Path) -> None:
    layers = [[file("a", b"a")]]
    rejects(bad_image(tmp_path, layers, layer_blobs=[b"this is no gzip stream"]), SourceError, "gzip")


def test_layer_blob_changed_on_disk(tmp_path: Path) -> None:
    layers = [[file("a", b"a" * 1000)]]
    image = bad_image(tmp_path, layers)
    digest = hashlib.sha256(compress(layer_tar(layers[0]), "gzip")).hexdigest()
    blob = image.layout / "blobs" / "sha256" / digest
    blob.write_bytes(compress(layer_tar([file("a", b"b" * 1000)]), "gzip"))
    rejects(image, SourceError, blob.name[:12], "mismatch")


def test_diff_id_mismatch(tmp_path: Path) -> None:
    wrong = "sha256:" + "0" * 64
    image = bad_image(
        tmp_path, [[file("a", b"a")]], image_config={"rootfs": {"type": "layers", "diff_ids": [wrong]}}
    )
    rejects(image, SourceError, "diff_id", wrong)


def test_empty_image(tmp_path: Path) -> None:
    rejects(bad_image(tmp_path, []), SourceError, "empty image")


@pytest.mark.parametrize(
    "config, words",
    [
        (b"{not json", ("config", "not valid JSON")),
        (b"[]", ("config", "JSON object")),
        (b'{"config": {}, "rootfs": "layers"}', ("config", "rootfs.diff_ids")),
        (b'{"config": {"Cmd": "sh"}, "rootfs": {"diff_ids": []}}', ("config.Cmd", "list of strings")),
    ],
)
def test_malformed_config(tmp_path: Path, config: bytes, words: tuple[str, ...]) -> None:
    rejects(bad_image(tmp_path, [[file("a", b"a")]], image_config=config), SourceError, *words)


def test_corrupt_and_truncated_tars(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x01" * 2048)
    with pytest.raises(FlattenError, match="garbage-layer: corrupt tar"):
        flatten_tars([("garbage-layer", garbage)])
    raw = layer_tar([file("big", b"x" * 100_000)])
    short = tmp_path / "short.tar"
    short.write_bytes(raw[:50_000])
    with pytest.raises(FlattenError, match="short-layer: member 'big'"):
        flatten_tars([("short-layer", short)])


def test_hardlink_to_directory(tmp_path: Path) -> None:
    raw = layer_tar([dir("d/"), hardlink("link", "d")])
    path = tmp_path / "l.tar"
    path.write_bytes(raw)
    with pytest.raises(FlattenError, match="'link': hardlink to directory 'd'"):
        flatten_tars([("l", path)])


def test_parent_is_not_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "l.tar"
    path.write_bytes(layer_tar([file("f", b"x"), symlink("s", "f"), file("s/child", b"y")]))
    with pytest.raises(FlattenError, match="'s/child'"):
        flatten_tars([("l", path)])


def test_symlinks_cannot_lead_out_of_the_root(tmp_path: Path) -> None:
    path = tmp_path / "l.tar"
    path.write_bytes(
        layer_tar(
            [
                dir("tmp/"),
                symlink("up", "../../../../tmp"),
                symlink("abs", "/tmp"),
                file("up/a", b"a"),
                file("abs/b", b"b"),
            ]
        )
    )
    tree = flatten_tars([("l", path)]).tree
    assert names(tree, "tmp") == {"a", "b"}
