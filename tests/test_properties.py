"""Property-based tests (hypothesis) of the parsers and writers that read untrusted input.

- the tar reader agrees with Python's tarfile on every archive tarfile writes (ustar, GNU, PAX), and on
  arbitrary or mutated bytes it yields members or raises TarFormatError, nothing else, and ends;
- flatten of generated layers equals a model of the OCI layer rules (whiteouts, opaque directories,
  hardlinks, type changes, metadata updates of directories);
- the cpio writer's output, extracted by the real `cpio` tool, is the tree that was written;
- the manifest, config and index parsers give the parsed value or a BadInput, nothing else;
- the reference parser round-trips what it prints and never crashes;
- the guest config encoder and decoder round-trip, and the decoder takes any bytes;
- the xl config writer writes only its keys, and every value reads back as given (no injection).

`make test` runs a bounded number of examples (profile "test"); `make fuzz` runs the same properties
for a time budget (profile "fuzz", FUZZ_SECONDS).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import subprocess
import tarfile
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from builder import tarread
from builder.artifact import XlDisk, xen_config
from builder.cpio import pack
from builder.errors import ArtifactError, BadInput, ConfigError, ReferenceError_
from builder.flatten import flatten_tars
from builder.guest import GuestConfig
from builder.image import Platform
from builder.oci.manifest import descriptor, load_json, manifest_parts, parse_config, select_platform
from builder.reference import ImageRef, parse
from builder.tarread import TarFormatError, read_members
from builder.tree import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, Inode, Tree, read_content
from tests.fixtures.images import Member, dir, file, hardlink, layer_tar, opaque, symlink, whiteout

settings.register_profile(
    "test",
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "test"))

NAMES = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=40
).filter(lambda n: n not in (".", "..") and not n.startswith(".wh."))


# ---- the tar reader ---------------------------------------------------------------------------------


@st.composite
def tar_members(draw: st.DrawFn) -> list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]:
    out: list[Any] = []
    for _ in range(draw(st.integers(1, 6))):
        name = "/".join(draw(st.lists(NAMES, min_size=1, max_size=4)))
        ti = tarfile.TarInfo(name)
        ti.type = draw(
            st.sampled_from(
                [
                    tarfile.REGTYPE,
                    tarfile.DIRTYPE,
                    tarfile.SYMTYPE,
                    tarfile.LNKTYPE,
                    tarfile.CHRTYPE,
                    tarfile.BLKTYPE,
                    tarfile.FIFOTYPE,
                ]
            )
        )
        ti.mode = draw(st.integers(0, 0o7777))
        ti.uid, ti.gid = draw(st.integers(0, 2**21 - 1)), draw(st.integers(0, 2**21 - 1))
        ti.mtime = draw(st.integers(0, 2**33 - 1))
        if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            ti.linkname = "/".join(draw(st.lists(NAMES, min_size=1, max_size=4)))
        if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            ti.devmajor, ti.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))
        data = draw(st.binary(max_size=1500)) if ti.type == tarfile.REGTYPE else b""
        ti.size = len(data)
        out.append((ti, data))
    return out


def _write(members: list[Any], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _read(raw: bytes) -> list[tarread.Member]:
    return list(read_members(io.BytesIO(raw), len(raw)))


@given(tar_members(), st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
def test_tar_reader_agrees_with_tarfile_on_what_tarfile_writes(members: list[Any], fmt: int) -> None:
    try:
        raw = _write(members, fmt)
    except ValueError:  # ustar cannot hold a long name; that archive does not exist
        assume(False)
    ours = _read(raw)
    with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8", errors="surrogateescape") as tar:
        theirs = list(tar)
    assert len(ours) == len(theirs)
    for m, t in zip(ours, theirs, strict=True):
        assert m.name.rstrip("/") == t.name
        assert (m.type, m.mode, m.uid, m.gid, m.mtime) == (t.type, t.mode, t.uid, t.gid, int(t.mtime))
        assert m.linkname == t.linkname
        if t.isreg():
            assert (m.offset, m.size) == (t.offset_data, t.size)
            assert raw[m.offset : m.offset + m.size] == members[theirs.index(t)][1]
        if t.ischr() or t.isblk():
            assert (m.devmajor, m.devminor) == (t.devmajor, t.devminor)


@given(
    st.one_of(
        st.binary(max_size=3000),
        st.tuples(tar_members(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)),
    )
)
def test_tar_reader_on_any_bytes_yields_members_or_refuses(data: Any) -> None:
    if isinstance(data, tuple):
        raw = bytearray(_write(data[0], tarfile.PAX_FORMAT))
        for pos, byte in data[1]:
            raw[pos % len(raw)] = byte
        data = bytes(raw)
    try:
        members = _read(data)
    except TarFormatError:
        return
    for m in members:
        assert m.type in tarread.MEMBER_TYPES and m.size >= 0 and m.offset + m.size <= len(data)
        assert min(m.uid, m.gid, m.mode, m.devmajor, m.devminor) >= 0


# ---- flatten against a model of the OCI layer rules ------------------------------------------------

DIRS = ["a", "b", "c"]  # names that may be directories (and parents)
LEAVES = DIRS + ["s", "t"]  # s and t are never parents: symlinks live there only


class _Node:
    def __init__(self, kind: str, mode: int, uid: int, data: bytes = b"", target: str = ""):
        self.kind, self.mode, self.uid, self.data, self.target = kind, mode, uid, data, target


def _below(path: str, state: dict[str, _Node]) -> list[str]:
    return [p for p in state if p.startswith(path + "/")]


def _model(layers: list[list[tuple[Any, ...]]]) -> dict[str, _Node]:
    """Each layer: whiteouts and opaque markers hide what the lower layers have, then the layer's own
    entries apply in order (a directory over a directory updates its metadata and keeps its children,
    anything else replaces the path with everything below it; a hardlink shares its target's inode)."""
    state: dict[str, _Node] = {}
    for ops in layers:
        for op in ops:
            if op[0] == "whiteout":
                for p in [op[1], *_below(op[1], state)]:
                    state.pop(p, None)
            elif op[0] == "opaque":
                for p in _below(op[1], state):
                    del state[p]
        for op in ops:
            kind, path = op[0], op[1]
            if kind in ("whiteout", "opaque"):
                continue
            old = state.get(path)
            if kind == "dir" and old is not None and old.kind == DIR:
                old.mode, old.uid = op[2], op[3]
                continue
            for p in _below(path, state):
                del state[p]
            if kind == "dir":
                state[path] = _Node(DIR, op[2], op[3])
            elif kind == "file":
                state[path] = _Node(FILE, op[2], op[3], op[4])
            elif kind == "symlink":
                state[path] = _Node(SYMLINK, 0o777, 0, target=op[2])
            else:
                state[path] = state[op[2]]
    return state


@st.composite
def layer_ops(draw: st.DrawFn) -> list[list[tuple[Any, ...]]]:
    """Layers as a tar writer makes them: parents before children, a hardlink to a file of the same layer
    that is still there."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        ops: list[tuple[Any, ...]] = []
        current: dict[str, str] = {}  # what this layer has put at each path so far

        def put(path: str, kind: str, current: dict[str, str] = current) -> None:
            if not (kind == "dir" and current.get(path) == "dir"):
                for p in [p for p in current if p.startswith(path + "/")]:
                    del current[p]
            current[path] = kind

        for _ in range(draw(st.integers(0, 8))):
            parent = "/".join(draw(st.lists(st.sampled_from(DIRS), max_size=2)))
            kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "whiteout", "opaque"]))
            leaf = draw(
                st.sampled_from(
                    ["s", "t"] if kind == "symlink" else DIRS if kind in ("dir", "opaque") else LEAVES
                )
            )
            path = f"{parent}/{leaf}" if parent else leaf
            parts = path.split("/")
            for i in range(1, len(parts)):  # real tars carry the parents before the children
                d = "/".join(parts[:i])
                if current.get(d) != "dir":
                    ops.append(("dir", d, 0o755, 0))
                    put(d, "dir")
            if kind == "file":
                ops.append(
                    (
                        "file",
                        path,
                        draw(st.integers(0, 0o777)),
                        draw(st.integers(0, 9)),
                        draw(st.binary(max_size=8)),
                    )
                )
            elif kind == "dir":
                ops.append(("dir", path, draw(st.integers(0, 0o777)), draw(st.integers(0, 9))))
            elif kind == "symlink":
                ops.append(("symlink", path, draw(st.sampled_from(["a", "/b/c", "../t", "nowhere"]))))
            elif kind == "hardlink":
                live = sorted(
                    p
                    for p, k in current.items()
                    if k == "file" and p != path and not p.startswith(path + "/")
                )
                if not live:
                    continue
                ops.append(("hardlink", path, draw(st.sampled_from(live))))
                kind = "file"
            elif kind == "whiteout":
                ops.append(("whiteout", path))
                continue
            elif current.get(path) == "dir":
                ops.append(("opaque", path))
                continue
            else:
                continue
            put(path, kind)
        layers.append(ops)
    return layers


def _tar_of(ops: list[tuple[Any, ...]]) -> list[Member]:
    out = []
    for op in ops:
        if op[0] == "dir":
            out.append(dir(op[1] + "/", mode=op[2], uid=op[3]))
        elif op[0] == "file":
            out.append(file(op[1], op[4], mode=op[2], uid=op[3]))
        elif op[0] == "symlink":
            out.append(symlink(op[1], op[2]))
        elif op[0] == "hardlink":
            out.append(hardlink(op[1], op[2]))
        elif op[0] == "whiteout":
            out.append(whiteout(op[1]))
        else:
            out.append(opaque(op[1]))
    return out


@given(layer_ops())
def test_flatten_follows_the_oci_layer_rules(
    tmp_path_factory: pytest.TempPathFactory, layers: list[list[tuple[Any, ...]]]
) -> None:
    tmp = tmp_path_factory.mktemp("layers")
    paths = []
    for i, ops in enumerate(layers):
        p = tmp / f"{i}.tar"
        p.write_bytes(layer_tar(_tar_of(ops)))
        paths.append((f"layer{i}", p))
    tree = flatten_tars(paths).tree
    got = {path: node for path, node in tree.walk() if path}
    want = _model(layers)
    assert sorted(got) == sorted(want)
    for path, node in got.items():
        w = want[path]
        assert node.kind == w.kind, path
        if w.kind == SYMLINK:
            assert node.target == w.target
            continue
        assert (node.mode, node.uid) == (w.mode, w.uid), path
        if w.kind == FILE:
            assert read_content(node) == w.data, path
    groups_got = {frozenset(p for p in got if got[p] is n) for n in got.values() if n.kind == FILE}
    groups_want = {frozenset(p for p in want if want[p] is n) for n in want.values() if n.kind == FILE}
    assert groups_got == groups_want


# ---- the cpio writer against the cpio tool ---------------------------------------------------------


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    tree = Tree()
    files: list[Inode] = []
    for _ in range(draw(st.integers(1, 12))):
        parent = "/".join(draw(st.lists(st.sampled_from(["d", "e", "f"]), max_size=3)))
        name = draw(NAMES)
        path = f"{parent}/{name}" if parent else name
        if tree.parent_of(path, create=True) is None or tree.lookup(path) is not None:
            continue
        kind = draw(st.sampled_from([FILE, FILE, DIR, SYMLINK, CHAR, BLOCK, FIFO, "hardlink"]))
        mode, uid, gid = draw(st.integers(0, 0o7777)), draw(st.integers(0, 70000)), draw(st.integers(0, 9))
        mtime = draw(st.integers(0, 2**31 - 1))
        if kind == "hardlink":
            if not files:
                continue
            tree.add(path, draw(st.sampled_from(files)))
            continue
        node = Inode(kind, mode, uid, gid, mtime, children={} if kind == DIR else None)
        if kind == FILE:
            node.content = draw(st.binary(max_size=3000))
            node.size = len(node.content)
            node.mode |= 0o600  # cpio must be able to write it back
            files.append(node)
        elif kind == SYMLINK:
            node.target = draw(NAMES)
        elif kind in (CHAR, BLOCK):
            node.rdev = (draw(st.integers(0, 255)), draw(st.integers(0, 255)))
        elif kind == DIR:
            node.mode |= 0o700
        tree.add(path, node)
    return tree


@pytest.mark.skipif(os.geteuid() != 0, reason="extracting owners and device nodes needs root")
@given(trees())
def test_cpio_writer_is_read_back_by_cpio(tmp_path_factory: pytest.TempPathFactory, tree: Tree) -> None:
    tmp = tmp_path_factory.mktemp("cpio")
    pack(tree, tmp / "initrd", compression="none")
    out = tmp / "x"
    out.mkdir()
    with open(tmp / "initrd", "rb") as f:
        subprocess.run(
            ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
            stdin=f,
            cwd=out,
            check=True,
            capture_output=True,
        )
    inodes: dict[int, int] = {}
    for path, node in tree.walk():
        if not path:
            continue
        p = out / path
        st_ = p.lstat()
        assert stat.S_IFMT(st_.st_mode) == stat.S_IFMT(node.st_mode), path
        assert (st_.st_uid, st_.st_gid) == (node.uid, node.gid), path
        if node.kind == SYMLINK:
            assert os.readlink(p) == node.target
            continue
        assert stat.S_IMODE(st_.st_mode) == node.mode & 0o7777, path
        if node.kind != DIR:
            assert int(st_.st_mtime) == node.mtime, path
        if node.kind == FILE:
            assert p.read_bytes() == read_content(node), path
            assert inodes.setdefault(id(node), st_.st_ino) == st_.st_ino, f"{path}: hardlink lost"
        if node.kind in (CHAR, BLOCK):
            assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == node.rdev
    assert {p.relative_to(out).as_posix() for p in out.rglob("*")} == {p for p, _ in tree.walk() if p}


# ---- manifest, config and index parsers ------------------------------------------------------------

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
    max_leaves=25,
)
KEYS = [
    "config",
    "rootfs",
    "diff_ids",
    "Entrypoint",
    "Cmd",
    "Env",
    "WorkingDir",
    "User",
    "StopSignal",
    "Labels",
    "ExposedPorts",
    "os",
    "architecture",
    "variant",
    "created",
    "schemaVersion",
    "layers",
    "manifests",
    "digest",
    "size",
    "mediaType",
    "platform",
    "annotations",
]
SHAPED = st.recursive(
    st.none() | st.integers() | st.text(max_size=8) | st.just("sha256:" + "0" * 64),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(KEYS), kids, max_size=6),
    max_leaves=30,
)


@given(
    st.one_of(
        st.binary(max_size=200),
        JSON.map(lambda d: json.dumps(d).encode()),
        SHAPED.map(lambda d: json.dumps(d).encode()),
        st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    )
)
def test_document_parsers_give_a_value_or_bad_input(raw: bytes) -> None:
    for parse_one in (
        lambda: parse_config(raw, "config"),
        lambda: manifest_parts(load_json(raw, "m"), "manifest"),
        lambda: select_platform(load_json(raw, "index"), Platform(), "index"),
        lambda: descriptor(load_json(raw, "d"), "descriptor"),
    ):
        with contextlib.suppress(BadInput):
            parse_one()


STRINGS = st.lists(st.text(max_size=10), max_size=4)


@given(
    STRINGS,
    STRINGS,
    STRINGS,
    st.text(max_size=10),
    st.text(max_size=10),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.lists(st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True), max_size=3),
)
def test_config_parser_returns_what_the_config_says(
    entrypoint: list[str],
    cmd: list[str],
    env: list[str],
    workdir: str,
    user: str,
    labels: dict[str, str],
    diff_ids: list[str],
) -> None:
    doc = {
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "Env": env,
            "WorkingDir": workdir,
            "User": user,
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "os": "linux",
        "architecture": "arm64",
    }
    cfg, ids, _, plat = parse_config(json.dumps(doc).encode(), "config")
    assert (list(cfg.entrypoint), list(cfg.cmd), list(cfg.env)) == (entrypoint, cmd, env)
    assert (cfg.working_dir, cfg.user, dict(cfg.labels), ids) == (workdir, user, labels, diff_ids)
    assert (plat.os, plat.architecture) == ("linux", "arm64")


# ---- the reference parser ---------------------------------------------------------------------------

COMPONENT = st.from_regex(r"[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)?", fullmatch=True)  # no '.': no registry


@given(st.text(max_size=80))
def test_reference_parser_never_crashes(text: str) -> None:
    try:
        ref = parse(text)
    except ReferenceError_:
        return
    assert isinstance(ref, ImageRef)
    if ref.transport == "docker":
        assert parse(str(ref)) == ref


@given(
    st.sampled_from([None, "localhost:5000", "registry.example.com", "docker.io", "[::1]:5000"]),
    st.lists(COMPONENT, min_size=1, max_size=3),
    st.one_of(st.none(), st.from_regex(r"\w[\w.-]{0,20}", fullmatch=True)),
    st.one_of(st.none(), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)),
)
def test_reference_round_trip(
    registry: str | None, repo: list[str], tag: str | None, digest: str | None
) -> None:
    text = (
        "/".join(([registry] if registry else []) + repo)
        + (f":{tag}" if tag else "")
        + (f"@{digest}" if digest else "")
    )
    ref = parse(text)
    assert ref.registry == (registry or "docker.io")
    want_repo = "/".join(repo)
    if ref.registry == "docker.io" and len(repo) == 1:
        want_repo = "library/" + want_repo
    assert ref.repository == want_repo
    assert ref.tag == (tag or (None if digest else "latest")) and ref.digest == digest
    assert parse(str(ref)) == ref


# ---- the init's config ------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30)


@given(
    st.lists(TEXT, min_size=1, max_size=4),
    st.lists(TEXT, max_size=4),
    TEXT,
    st.integers(0, 2**32 - 2),
    st.integers(0, 2**32 - 2),
    st.lists(st.integers(0, 2**32 - 2), max_size=4),
    st.integers(1, 64),
    TEXT,
    st.integers(0, 4),
    st.integers(0, 3600),
    st.lists(TEXT, max_size=2),
    st.sampled_from(["ro", "rw"]),
    st.integers(0, 600),
)
def test_guest_config_round_trip(
    argv: list[str],
    env: list[str],
    cwd: str,
    uid: int,
    gid: int,
    groups: list[int],
    sig: int,
    hostname: str,
    cmd_index: int,
    grace: int,
    roots: list[str],
    root_mode: str,
    root_wait: int,
) -> None:
    gc = GuestConfig(
        tuple(argv),
        tuple(env),
        cwd,
        uid,
        gid,
        tuple(groups),
        sig,
        hostname,
        min(cmd_index, len(argv)),
        grace,
        tuple(roots),
        root_mode if roots else "rw",
        root_wait if roots else 10,
    )
    assert GuestConfig.decode(gc.encode()) == gc


@given(st.lists(TEXT, min_size=1, max_size=3), TEXT, st.sampled_from(["\0", "\ud800", "\udbff"]))
def test_guest_config_refuses_what_the_init_cannot_take(argv: list[str], text: str, bad: str) -> None:
    """A NUL cuts a record, a lone surrogate (JSON "\\ud800") has no UTF-8 form: ConfigError, not a crash."""
    gc = GuestConfig((*argv, text + bad + text), (), "/", 0, 0, (0,), 15, "h")
    with pytest.raises(ConfigError, match="NUL" if bad == "\0" else "lone surrogate"):
        gc.encode()


@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.tuples(
                st.sampled_from(["arg", "uid", "gid", "group", "cmd", "env", "x"]), st.binary(max_size=12)
            ),
            max_size=6,
        ).map(
            lambda recs: (
                b"xbuild-guest-config\x001\x00"
                + b"".join(k.encode() + b"\0" + v.replace(b"\0", b"") + b"\0" for k, v in recs)
            )
        ),
    )
)
def test_guest_config_decoder_takes_any_bytes(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        GuestConfig.decode(data)


# ---- the xl config writer ----------------------------------------------------------------------------

XL_LINE = r'([a-z_]+) = ("(?:[^"\\\n]|\\.)*"|\d+|\[ (?:\'[^\'\\\n]*\'(?:, )?)+ \])'


def _xl_dequote(value: str) -> str:
    """libxlu's reading of a double-quoted xl string (backslash escapes), or a number, as text."""
    if not value.startswith('"'):
        return value
    out, chars = [], iter(value[1:-1])
    for c in chars:
        out.append(next(chars) if c == "\\" else c)
    return "".join(out)


@given(
    name=st.text(max_size=30),
    extra=st.text(max_size=200),
    memory=st.integers(16, 65536),
    vcpus=st.integers(1, 64),
    xen_type=st.sampled_from(["pv", "pvh", "hvm"]),
    target=st.text(max_size=40),
    vif=st.none() | st.text(max_size=40),
)
def test_xl_config_writer_writes_only_its_keys_and_every_value_reads_back(
    name: str, extra: str, memory: int, vcpus: int, xen_type: str, target: str, vif: str | None
) -> None:
    """Whatever strings reach it, the writer refuses them (ArtifactError) or writes one line per key, only
    its fixed keys, each value quoted so that xl reads back exactly the string given: no line, key or
    list element can be injected."""
    try:
        text = xen_config(name, extra, memory, vcpus, xen_type, disks=(XlDisk(target),), vif=vif)
    except ArtifactError:
        return
    assert xen_type in ("pv", "pvh")
    lines = text.splitlines()
    parsed = {}
    for line in lines:
        m = re.fullmatch(XL_LINE, line)
        assert m, line
        parsed[m.group(1)] = m.group(2)
    assert len(parsed) == len(lines)
    assert set(parsed) <= {
        "name",
        "type",
        "kernel",
        "ramdisk",
        "extra",
        "memory",
        "maxmem",
        "vcpus",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "tsc_mode",
        "disk",
        "vif",
    }
    assert _xl_dequote(parsed["name"]) == name and _xl_dequote(parsed["extra"]) == extra
    assert parsed["memory"] == str(memory) and parsed["vcpus"] == str(vcpus)
    assert parsed["disk"] == f"[ 'format=raw, vdev=xvda, access=rw, target={target}' ]"
    assert ("vif" in parsed) == (vif is not None)
