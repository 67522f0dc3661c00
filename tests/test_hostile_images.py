"""Hostile image content through the real CLI: layer tars, the image's own files, layouts and archives.

Each case builds a small image (busybox plus one hostile layer or file) in the sandbox and runs
`xbuild IMAGE -o OUT --kernel none`. A refused case asserts exit 2, exactly one error line, nothing
written outside the cache; a case xbuild must take asserts exit 0 and what the initramfs holds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from builder.cpio import read_cpio
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.fixtures.images import (
    BUSYBOX_CONFIG,
    TAR_END,
    Member,
    busybox_members,
    dir,
    file,
    hardlink,
    layer_tar,
    pax_header,
    symlink,
    tar_data,
    tar_file,
    tar_header,
    write_oci_image,
)

# ---- helpers ----------------------------------------------------------------------------------------


def build(
    box: Sandbox, top: list[Member] | bytes, config: dict[str, Any] | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    """Build busybox + `top` (members or a raw tar) with `--kernel none` into box.out."""
    layout = box.root / "image"
    write_oci_image(layout, "t", [busybox_members(), top], dict(BUSYBOX_CONFIG, **(config or {})))
    return box.xbuild(f"oci:{layout}:t", "-o", str(box.out), "--kernel", "none", "-q", *args)


def refused(
    box: Sandbox,
    top: list[Member] | bytes,
    *needles: str,
    config: dict[str, Any] | None = None,
    code: int = 2,
) -> str:
    """The build of busybox + `top` is refused with one line; nothing is left outside the cache."""
    layout = box.root / "image"
    write_oci_image(layout, "t", [busybox_members(), top], dict(BUSYBOX_CONFIG, **(config or {})))
    before = box.snapshot()
    r = box.xbuild(f"oci:{layout}:t", "-o", str(box.out), "--kernel", "none", "-q")
    line = assert_refused(r, code, *needles)
    assert box.changes(before) == []
    assert box.stale_temps() == []
    return line


def initrd(box: Sandbox) -> dict[str, dict[str, Any]]:
    """name -> entry of the built initramfs, listed by the real `cpio` tool and read by ours."""
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO((box.out / "initrd.img").read_bytes())).read()
    listed = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True, check=True)
    names = listed.stdout.decode("utf-8", "surrogateescape").splitlines()
    entries = {str(e["name"]): e for e in read_cpio(raw)}
    assert sorted(names) == sorted(entries)
    return entries


def gnu_tar(box: Sandbox, *args: str, files: dict[str, bytes | int]) -> bytes:
    """A tar written by GNU tar from files made in a scratch dir (int: a sparse file of that size
    with 'data' at its start and end)."""
    src = box.root / "src"
    src.mkdir()
    for name, content in files.items():
        p = src / name
        if isinstance(content, int):
            with open(p, "wb") as f:
                f.write(b"data")
                f.seek(content - 4)
                f.write(b"data")
        else:
            p.write_bytes(content)
    out = subprocess.run(
        ["tar", "-C", str(src), "-cf", "-", "--owner=0", "--group=0", *args, *files],
        capture_output=True,
        check=True,
    ).stdout
    shutil.rmtree(src)
    return out


# ---- sparse and unmodelled member types -------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0"])
def test_pax_sparse_file_is_refused(sandbox: Sandbox, version: str) -> None:
    # main: 1.0 gave wrong content for `after` with exit 0; 0.0/0.1 read the sparse data as the file
    raw = gnu_tar(
        sandbox,
        "--sparse",
        "--format=pax",
        f"--sparse-version={version}",
        files={"holes": 64 * 1024, "after": b"after\n"},
    )
    refused(sandbox, raw, "sparse files are not supported", "holes")


def test_pax_sparse_of_10_gib_is_refused_as_sparse(sandbox: Sandbox) -> None:
    # main: "truncated tar" (the real size was taken for the data size)
    raw = gnu_tar(sandbox, "--sparse", "--format=pax", files={"big": 10 << 30})
    refused(sandbox, raw, "sparse files are not supported")


def test_gnu_sparse_file_is_refused(sandbox: Sandbox) -> None:
    raw = gnu_tar(sandbox, "--sparse", "--format=gnu", files={"holes": 64 * 1024})
    refused(sandbox, raw, "sparse files are not supported")


def test_malformed_sparse_map_is_refused(sandbox: Sandbox) -> None:
    # main: ValueError traceback from tarfile's sparse map parser
    raw = pax_header({"GNU.sparse.map": "1,x,3"}) + tar_file("f", b"data") + TAR_END
    refused(sandbox, raw, "sparse files are not supported")


@pytest.mark.parametrize(
    ("typeflag", "what"),
    [(b"7", "contiguous file"), (b"M", "multi-volume"), (b"V", "volume header"), (b"Z", "unknown type")],
)
def test_member_types_not_modelled_are_refused(sandbox: Sandbox, typeflag: bytes, what: str) -> None:
    # main: '7' became a regular file (moby refuses it: "unhandled tar header type")
    raw = tar_header("odd", typeflag, 4) + tar_data(b"data") + TAR_END
    refused(sandbox, raw, "'odd'", what)


# ---- malformed headers ------------------------------------------------------------------------------


def test_negative_base256_size_is_refused(sandbox: Sandbox) -> None:
    # main: tarfile stepped backwards over the same header forever (killed by the timeout)
    raw = tar_file("a", b"a") + tar_header("neg", raw={124: b"\xff" * 12}) + TAR_END
    refused(sandbox, raw, "negative size")


def test_bad_checksum_in_a_later_header_is_refused(sandbox: Sandbox) -> None:
    # main: tarfile ended the layer there silently (exit 0, `second` missing)
    second = bytearray(tar_file("second", b"2"))
    second[0] ^= 0x20
    raw = tar_file("first", b"1") + bytes(second) + TAR_END
    refused(sandbox, raw, "bad header checksum at offset 1024")


def test_zero_block_followed_by_members_is_refused(sandbox: Sandbox) -> None:
    # main: everything after the first zero block was dropped silently
    raw = tar_file("first", b"1") + bytes(512) + tar_file("hidden", b"2") + TAR_END
    refused(sandbox, raw, "zero block at offset 1024 is followed by data")


def test_pax_number_that_is_not_a_number_is_refused(sandbox: Sandbox) -> None:
    # main: uid=abc became uid 0
    raw = pax_header({"uid": "abc"}) + tar_file("f", b"x", uid=1000) + TAR_END
    refused(sandbox, raw, "uid=b'abc' is not a non-negative number")


def test_pax_mtime_infinite_is_refused(sandbox: Sandbox) -> None:
    # main: OverflowError traceback (int(inf))
    raw = pax_header({"mtime": "1e400"}) + tar_file("f", b"x") + TAR_END
    refused(sandbox, raw, "mtime='1e400' is not a time")


def test_uid_beyond_32_bits_is_bad_input(sandbox: Sandbox) -> None:
    # main: exit 1 from the cpio writer ("too large for cpio newc"), i.e. blamed on xbuild
    raw = tar_file("f", b"x", raw={108: b"\x80" + (1 << 40).to_bytes(7, "big")}) + TAR_END
    refused(sandbox, raw, "uid 1099511627776 is out of range")


def test_nul_in_pax_path_is_refused(sandbox: Sandbox) -> None:
    # main: the name went into the initramfs with a NUL (the kernel would cut it there)
    raw = pax_header({"path": b"etc/passwd\0.evil"}) + tar_file("f", b"x") + TAR_END
    refused(sandbox, raw, "path contains a NUL byte")


def test_libarchive_xattr_not_base64_is_refused(sandbox: Sandbox) -> None:
    # main: binascii.Error traceback
    raw = pax_header({"LIBARCHIVE.xattr.user.x": "a"}) + tar_file("f", b"x") + TAR_END
    refused(sandbox, raw, "LIBARCHIVE.xattr.user.x is not base64")


def test_extension_header_without_member_is_refused(sandbox: Sandbox) -> None:
    raw = tar_file("f", b"x") + pax_header({"path": "ghost"}) + TAR_END
    refused(sandbox, raw, "extension header before offset")


def test_missing_padding_after_last_member_is_refused(sandbox: Sandbox) -> None:
    raw = tar_file("f", b"x")[: 512 + 1]
    refused(sandbox, raw, "truncated tar")


# ---- names and links --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["./", "", "."])
def test_a_file_named_dot_or_nothing_is_refused(sandbox: Sandbox, name: str) -> None:
    # main: silently ignored (exit 0)
    refused(
        sandbox,
        tar_file(name, b"not a directory") + TAR_END,
        "names the root directory but is not a directory",
    )


def test_hardlink_to_itself_is_refused(sandbox: Sandbox) -> None:
    # main: exit 0 (a no-op); moby's extractor fails on it
    refused(sandbox, [hardlink("etc/hostname", "etc/hostname")], "hardlink to itself")


def test_hardlink_replacing_its_own_parent_is_refused(sandbox: Sandbox) -> None:
    # main: exit 0, /etc became the file /etc/hostname (moby's extractor removes /etc, then cannot link)
    refused(sandbox, [hardlink("etc", "etc/hostname")], "below the path it replaces")


def test_hardlink_to_a_later_member_is_refused(sandbox: Sandbox) -> None:
    refused(sandbox, [hardlink("early", "late"), file("late", b"x")], "hardlink to missing target 'late'")


@pytest.mark.parametrize("name", ["bin/.wh..", "bin/.wh...", "bin/.wh."])
def test_whiteout_of_dot_or_nothing_is_refused(sandbox: Sandbox, name: str) -> None:
    # main: "bin/.wh.." deleted /bin itself (exit 0)
    refused(sandbox, [file(name, b"")], "whiteout of no name, '.' or '..'")


@pytest.mark.parametrize("name", ["/etc/shadow", "../escape", "a/../../escape"])
def test_names_leaving_the_root_are_refused(sandbox: Sandbox, name: str) -> None:
    refused(sandbox, tar_file(name, b"x") + TAR_END, "would escape the root")


def test_member_below_a_symlink_loop_is_refused(sandbox: Sandbox) -> None:
    refused(sandbox, [symlink("loop", "loop"), file("loop/x", b"x")], "'loop/x'", "not a directory")


def test_path_longer_than_path_max_is_refused(sandbox: Sandbox) -> None:
    refused(sandbox, [file("d/" * 2100 + "f", b"x")], "longer than 4095 bytes")


def test_2000_deep_directories_build(sandbox: Sandbox) -> None:
    # main: RecursionError traceback (tree walks and minimize's copy were recursive)
    deep = "d/" * 2000
    r = build(sandbox, [dir(deep), file(deep + "leaf", b"leaf\n")], None, "--minimize", "none")
    assert r.returncode == 0, r.stderr
    assert initrd(sandbox)[deep + "leaf"]["data"] == b"leaf\n"


def test_many_gnu_long_names_in_a_row_take_the_last(sandbox: Sandbox) -> None:
    # main: RecursionError traceback (tarfile recursed once per extension header); Go takes the last
    longs = b"".join(tar_header("././@LongLink", b"L", 9) + tar_data(b"name%04d\0" % i) for i in range(1200))
    r = build(sandbox, longs + tar_file("short", b"x") + TAR_END, None, "--minimize", "none")
    assert r.returncode == 0, r.stderr
    assert "name1199" in initrd(sandbox)


def test_pax_global_header_is_ignored_like_containerd(sandbox: Sandbox) -> None:
    # main: tarfile applied the global path to every later member: one file "renamed" replaced the rest
    raw = (
        pax_header({"path": "renamed", "comment": "git archive"}, b"g")
        + tar_file("one", b"1")
        + tar_file("two", b"2")
        + TAR_END
    )
    r = build(sandbox, raw, None, "--minimize", "none")
    assert r.returncode == 0, r.stderr
    entries = initrd(sandbox)
    assert entries["one"]["data"] == b"1" and entries["two"]["data"] == b"2" and "renamed" not in entries


# ---- the image's own files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top",
    [
        [file(".xbuild", b"a file")],
        [symlink(".xbuild", ".xbuild")],
        [symlink(".xbuild", "/etc")],
        [
            dir(".xbuild/", mode=0o000, uid=1000),
            file(".xbuild/init", b"#!/bin/sh\necho not xbuild's\n", mode=0o777),
        ],
    ],
    ids=["file", "symlink-loop", "symlink-to-etc", "odd-dir"],
)
def test_image_xbuild_dir_is_replaced_by_xbuilds_own(sandbox: Sandbox, top: list[Member]) -> None:
    # main: ValueError traceback (file, loop); the init and config written into /etc (symlink)
    r = build(sandbox, top, None, "--minimize", "none")
    assert r.returncode == 0, r.stderr
    entries = initrd(sandbox)
    d = entries[".xbuild"]
    assert d["type"] == 0o040000 and d["mode"] & 0o7777 == 0o755 and d["uid"] == 0
    assert entries[".xbuild/init"]["data"][:4] == b"\x7fELF"
    assert entries[".xbuild/config"]["data"].startswith(b"xbuild-guest-config\0")
    assert "etc/init" not in entries and "etc/config" not in entries


def test_dev_symlink_loop_gets_no_console(sandbox: Sandbox) -> None:
    # main: ValueError traceback placing /dev/console
    r = build(sandbox, [file(".wh.dev", b""), symlink("dev", "dev")])
    assert r.returncode == 0, r.stderr
    assert initrd(sandbox)["dev"]["type"] == 0o120000


@pytest.mark.parametrize("kind", ["dir", "symlink-loop", "garbage"])
def test_dpkg_list_that_is_not_a_list(sandbox: Sandbox, kind: str) -> None:
    # main: FileNotFoundError traceback for the directory and the loop
    bad = {
        "dir": [dir("var/lib/dpkg/info/busybox.list/")],
        "symlink-loop": [symlink("var/lib/dpkg/info/busybox.list", "busybox.list")],
        "garbage": [file("var/lib/dpkg/info/busybox.list", os.urandom(4096) + b"\n/bin/busybox\n\0\n")],
    }[kind]
    r = build(
        sandbox,
        [
            dir("var/lib/dpkg/info/"),
            *bad,
            file("var/lib/dpkg/status", b"Package: busybox\nStatus: install ok installed\n"),
        ],
    )
    assert r.returncode == 0, r.stderr
    assert "bin/busybox" in initrd(sandbox)


def test_apk_db_garbage(sandbox: Sandbox) -> None:
    r = build(sandbox, [file("lib/apk/db/installed", os.urandom(8192) + b"\nP:\nR:\nF:/\nR:..\nD:\xff\n")])
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("user", ["²", "nobody", "1000:²"])
def test_passwd_garbage(sandbox: Sandbox, user: str) -> None:
    # main: ValueError traceback: "²".isdigit() but int("²") fails, in /etc/passwd and in User
    passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:²:²::/:\n\0\xff:::::\n".encode()
    line = refused(sandbox, [file("etc/passwd", passwd)], config={"User": user})
    assert "User" in line


@pytest.mark.parametrize("key", ["Env", "Cmd"])
def test_lone_surrogate_in_the_config_is_refused(sandbox: Sandbox, key: str) -> None:
    # main: UnicodeEncodeError traceback writing the init's config (found by `make fuzz`)
    value = ["sh", "A=\ud800"] if key == "Cmd" else ["A=\ud800"]
    line = refused(sandbox, [], "lone surrogate", config={key: value})
    assert "arg" in line or "env" in line


def test_ld_so_conf_include_chain_and_loop(sandbox: Sandbox) -> None:
    # main: RecursionError traceback (each include was a recursive call)
    confs = [file("etc/ld.so.conf", b"include /etc/ld.so.conf.d/0.conf\ninclude /etc/ld.so.conf\n")]
    confs += [
        file(f"etc/ld.so.conf.d/{i}.conf", f"include /etc/ld.so.conf.d/{i + 1}.conf\n/l{i}\n".encode())
        for i in range(1500)
    ]
    interp = Path("/lib64/ld-linux-x86-64.so.2").resolve()
    r = build(
        sandbox,
        [
            *confs,
            file("lib64/ld-linux-x86-64.so.2", interp.read_bytes(), mode=0o755),
            file("bin/dyn", Path("/bin/ls").read_bytes(), mode=0o755),
        ],
        {"Entrypoint": ["/bin/dyn"]},
    )
    # every directory of the chain was searched for ls's first library, which the image lacks
    line = assert_refused(r, 2, "needs the shared library", "(searched: /l1499, /l1498, ", "/l1, /l0, /lib/")
    assert line.count("/l") >= 1500


def test_shebang_of_one_megabyte(sandbox: Sandbox) -> None:
    script = b"#!/bin/sh " + b"x" * (1 << 20) + b"\necho hi\n"
    r = build(sandbox, [file("bin/big-shebang", script, mode=0o755)], {"Entrypoint": ["/bin/big-shebang"]})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("cut", [20, 64, 200, 4096])
def test_truncated_elf_entrypoint_is_one_line(sandbox: Sandbox, cut: int) -> None:
    # main: pyelftools exceptions other than ELFError escaped as tracebacks for some cuts
    busybox = Path("/bin/busybox").read_bytes()
    r = build(sandbox, [file("bin/cut", busybox[:cut], mode=0o755)], {"Entrypoint": ["/bin/cut"]})
    assert_refused(r, 2, "/bin/cut")


def test_elf_that_lies_about_its_tables(sandbox: Sandbox) -> None:
    elf = bytearray(Path("/bin/ls").read_bytes())
    elf[0x28:0x30] = (len(elf) + 4096).to_bytes(8, "little")  # e_shoff past the end
    elf[0x20:0x28] = (len(elf) - 8).to_bytes(8, "little")  # e_phoff near the end
    r = build(sandbox, [file("bin/liar", bytes(elf), mode=0o755)], {"Entrypoint": ["/bin/liar"]})
    assert_refused(r, 2, "/bin/liar", "malformed ELF")


def test_elf_library_that_lies_is_data(sandbox: Sandbox) -> None:
    """A broken ELF reached only by the package rule is not the entrypoint's business: the build goes on."""
    r = build(
        sandbox,
        [file("usr/lib/libbroken.so.1", b"\x7fELF" + b"\xff" * 60, mode=0o755)],
        None,
        "--recipe",
        str(_recipe(sandbox, "usr/lib/libbroken.so.1")),
    )
    assert r.returncode == 0, r.stderr
    assert "usr/lib/libbroken.so.1" in initrd(sandbox)


def _recipe(box: Sandbox, keep: str) -> Path:
    p = box.root / "recipe.toml"
    p.write_text(f'[keep]\npaths = ["/{keep}"]\n')
    return p


# ---- layouts and archives ---------------------------------------------------------------------------


def _layout(box: Sandbox) -> Path:
    layout = box.root / "image"
    write_oci_image(layout, "t", [busybox_members()], BUSYBOX_CONFIG)
    return layout


def _refused_ref(box: Sandbox, ref: str, *needles: str) -> None:
    before = box.snapshot()
    r = box.xbuild(ref, "-o", str(box.out), "--kernel", "none", "-q")
    assert_refused(r, 2, *needles)
    assert box.changes(before) == []


@pytest.mark.parametrize("entry", [17, "x", None, ["list"]])
def test_index_json_with_a_non_object_entry(sandbox: Sandbox, entry: Any) -> None:
    # main: AttributeError traceback ('int' object has no attribute 'get')
    layout = _layout(sandbox)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].insert(0, entry)
    (layout / "index.json").write_text(json.dumps(index))
    _refused_ref(sandbox, f"oci:{layout}:t", "index.json", "not an object")


@pytest.mark.parametrize("what", ["index", "config"])
def test_documents_over_their_cap_are_refused_unread(sandbox: Sandbox, what: str) -> None:
    """A 50 MB index.json or config in a layout is refused after reading 4 MiB (it was parsed whole)."""
    layout = sandbox.root / "image"
    big = {"Labels": {"big": "x" * (50 << 20)}}
    config = dict(BUSYBOX_CONFIG, **(big if what == "config" else {}))
    write_oci_image(layout, "t", [busybox_members()], config)
    if what == "index":
        index = json.loads((layout / "index.json").read_text())
        index["annotations"] = big["Labels"]
        (layout / "index.json").write_text(json.dumps(index))
    _refused_ref(sandbox, f"oci:{layout}:t", "larger than 4 MiB")


def test_index_json_annotations_not_an_object(sandbox: Sandbox) -> None:
    layout = _layout(sandbox)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"] = ["t"]
    (layout / "index.json").write_text(json.dumps(index))
    _refused_ref(sandbox, f"oci:{layout}:t", "index.json", "annotations")


def test_blob_symlink_out_of_the_layout_is_not_read(sandbox: Sandbox) -> None:
    # main: the blob was read through the symlink from outside the layout (exit 0)
    layout = _layout(sandbox)
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    blob = layout / "blobs" / "sha256" / digest
    outside = sandbox.root / "outside-manifest"
    blob.rename(outside)
    blob.symlink_to(outside)
    _refused_ref(sandbox, f"oci:{layout}:t", "outside the layout")


def test_blob_that_is_a_directory(sandbox: Sandbox) -> None:
    layout = _layout(sandbox)
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    blob = layout / "blobs" / "sha256" / digest
    blob.unlink()
    blob.mkdir()
    _refused_ref(sandbox, f"oci:{layout}:t", "missing blobs/sha256/")


@pytest.mark.parametrize(
    "manifest",
    [[1, 2], ["x"], [{"Config": 3, "Layers": "x"}], [{"Config": "c", "Layers": [1]}], {"not": "a list"}],
)
def test_docker_archive_manifest_of_non_objects(sandbox: Sandbox, manifest: Any) -> None:
    # main: AttributeError / TypeError tracebacks
    archive = sandbox.root / "image.tar"
    data = json.dumps(manifest).encode()
    ti = tarfile.TarInfo("manifest.json")
    ti.size = len(data)
    with tarfile.open(archive, "w") as tar:
        tar.addfile(ti, io.BytesIO(data))
    _refused_ref(sandbox, f"docker-archive:{archive}", "manifest.json")


def test_oci_archive_with_a_corrupt_header_midway(sandbox: Sandbox) -> None:
    # main: tarfile stopped at the corrupt header silently: "missing blobs/..." named the wrong cause
    layout = _layout(sandbox)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(layout, arcname=".")
    raw = bytearray(buf.getvalue())
    offset = next(i for i in range(512, len(raw), 512) if raw[i + 257 : i + 262] == b"ustar")
    raw[offset] ^= 0x01
    archive = sandbox.root / "image.tar"
    archive.write_bytes(bytes(raw))
    _refused_ref(sandbox, f"oci-archive:{archive}:t", "corrupt tar")


def test_archive_blob_member_that_is_a_symlink_is_missing(sandbox: Sandbox) -> None:
    layout = _layout(sandbox)
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    members = [
        file(str(p.relative_to(layout)), p.read_bytes())
        for p in sorted(layout.rglob("*"))
        if p.is_file() and p.name != digest
    ]
    link = tarfile.TarInfo(f"blobs/sha256/{digest}")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = sandbox.root / "image.tar"
    archive.write_bytes(layer_tar([*members, Member(link)]))
    _refused_ref(sandbox, f"oci-archive:{archive}:t", f"missing blobs/sha256/{digest}")


def test_broken_deflate_stream_is_a_corrupt_layer(sandbox: Sandbox) -> None:
    """A gzip layer whose digest matches but whose deflate stream is broken (isal's own error, not an
    OSError): one line, exit 2, nothing cached."""
    top = [file(f"data/f{i}", b"%d hello world " % i * 50) for i in range(50)]
    blob = bytearray(gzip.compress(layer_tar(top), compresslevel=6, mtime=0))
    blob[20] ^= 1  # inside the first deflate block header
    layout = sandbox.root / "image"
    write_oci_image(
        layout,
        "t",
        [busybox_members(), top],
        BUSYBOX_CONFIG,
        layer_blobs=[gzip.compress(layer_tar(busybox_members()), compresslevel=1, mtime=0), bytes(blob)],
    )
    _refused_ref(sandbox, f"oci:{layout}:t", "corrupt or truncated gzip data")
