"""Disk: the tree written into ext4 through libguestfs, read back through libguestfs and compared with the
tree and with the initramfs pack makes of it; a `--format disk` build compared with the initramfs build of
the same image; disk guests booted under QEMU and nested Xen. One appliance reads every disk at once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from builder import disk
from builder.artifact import Artifact
from builder.build import BuildOptions, build
from builder.cache import file_sha256
from builder.cpio import pack, read_cpio
from builder.errors import DiskInputError
from builder.flatten import flatten
from builder.guest import ROOT_DEVICES, GuestConfig
from builder.reference import parse
from builder.run.qemu import run
from builder.source import load
from builder.tree import FILE, Tree, read_content, regular
from builder.verify import verify_artifact
from tests.fixtures.images import (
    MTIME,
    OciImage,
    check_disk_probe,
    make_busybox_image,
    make_disk_probe_image,
    make_whiteout_image,
)

EPOCH = MTIME + 60
Sig = tuple[Any, ...]
TAR_KINDS = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def flat(image: OciImage) -> Tree:
    return flatten(load(parse(image.ref))).tree


def guestfs_available() -> bool:
    try:
        disk._guestfs()
    except DiskInputError:
        return False
    return True


needs_guestfs = pytest.mark.skipif(not guestfs_available(), reason="libguestfs (python3-guestfs) missing")


def tree_sig(tree: Tree, epoch: int | None) -> dict[str, Sig]:
    """path -> (st_mode, uid, gid, mtime, size, target, rdev, xattrs, sha256) as the disk must hold it."""
    sig = {}
    for path, node in tree.walk():
        data = read_content(node) if node.kind == FILE else b""
        mtime = node.mtime if epoch is None else min(node.mtime, epoch)
        sig[path or "."] = (
            node.st_mode,
            node.uid,
            node.gid,
            mtime,
            len(data),
            node.target,
            node.rdev if node.kind in ("char", "block") else (0, 0),
            tuple(sorted((node.xattrs or {}).items())),
            hashlib.sha256(data).hexdigest(),
        )
    return sig


def tree_links(tree: Tree) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for path, node in tree.walk():
        if node.kind == FILE:
            groups.setdefault(id(node), set()).add(path)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def tar_sig(path: Path) -> tuple[dict[str, Sig], set[frozenset[str]]]:
    """The same signature from a tar the appliance made of the disk (`tar_out`), and its hardlink groups."""
    sig: dict[str, Sig] = {}
    links: dict[str, set[str]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            name = m.name.removeprefix("./").rstrip("/") or "."
            if name == "lost+found" or name.startswith("lost+found/"):
                continue
            xattrs = tuple(
                sorted(
                    (k.removeprefix("SCHILY.xattr."), v.encode("utf-8", "surrogateescape"))
                    for k, v in m.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            if m.islnk():
                target = m.linkname.removeprefix("./")
                links.setdefault(target, {target}).add(name)
                sig[name] = sig[target]
                continue
            f = tar.extractfile(m) if m.isfile() else None
            data = f.read() if f else b""
            rdev = (m.devmajor, m.devminor) if m.ischr() or m.isblk() else (0, 0)
            sig[name] = (
                TAR_KINDS[m.type] | m.mode,
                m.uid,
                m.gid,
                int(m.mtime),
                len(data),
                m.linkname if m.issym() else "",
                rdev,
                xattrs,
                hashlib.sha256(data).hexdigest(),
            )
    return sig, {frozenset(g) for g in links.values()}


# ------------------------------------------------------------------------------------------- fast ones


def test_auto_size_has_the_documented_margin(whiteout_image: OciImage) -> None:
    tree = flat(whiteout_image)
    use = disk.usage(tree)
    assert use.content_bytes == sum(
        len(read_content(n)) for n in {id(n): n for _, n in tree.walk() if n.kind == FILE}.values()
    )
    assert use.inodes == len({id(n) for _, n in tree.walk()})
    size = disk.auto_size(tree)
    assert size % disk.MIB == 0
    assert size >= use.minimum * (1 + disk.MARGIN_RATIO) + disk.MARGIN_FIXED


def test_too_small_a_size_is_refused_and_leaves_nothing(whiteout_image: OciImage, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DiskInputError, match=r"--disk-size 1 MiB is too small .* at least \d+ MiB") as e:
        disk.write_disk(flat(whiteout_image), out / "disk.img", size=1 << 20)
    assert e.value.exit_code == 2
    assert not out.exists() or not list(out.iterdir())


@needs_guestfs
def test_unwritable_output_is_refused(whiteout_image: OciImage, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DiskInputError, match="cannot write .*a-file/disk.img") as e:
        disk.write_disk(flat(whiteout_image), tmp_path / "a-file" / "disk.img")
    assert e.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "whiteout-oci"]


def test_missing_libguestfs_names_the_debian_package(
    whiteout_image: OciImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "guestfs", None)  # makes `import guestfs` fail
    with pytest.raises(DiskInputError, match="apt-get install python3-guestfs") as e:
        disk.write_disk(flat(whiteout_image), tmp_path / "out" / "disk.img")
    assert e.value.exit_code == 2
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unknown_format(whiteout_image: OciImage, tmp_path: Path) -> None:
    with pytest.raises(DiskInputError, match="unknown disk format 'vmdk'"):
        disk.write_disk(flat(whiteout_image), tmp_path / "disk.img", fmt="vmdk")


def test_tar_stream_carries_the_tree(whiteout_image: OciImage, tmp_path: Path) -> None:
    tree = flat(whiteout_image)
    digest = disk._write_tar(tree, tmp_path / "t.tar", EPOCH, None)
    assert digest == disk._write_tar(tree, tmp_path / "u.tar", EPOCH, None)
    sig, links = tar_sig(tmp_path / "t.tar")
    assert sig == tree_sig(tree, EPOCH)
    assert links == tree_links(tree)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mkfs.ext4"), reason="mkfs.ext4 -d needs root")
def test_mkfs_fast_is_byte_reproducible(whiteout_image: OciImage, tmp_path: Path) -> None:
    tree = flat(whiteout_image)
    a = disk.mkfs_fast(tree, tmp_path / "a.img", epoch=EPOCH)
    b = disk.mkfs_fast(tree, tmp_path / "b.img", epoch=EPOCH)
    assert a.uuid == b.uuid
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()


# ------------------------------------------------------------------------------ through the appliance


@pytest.mark.slow
@needs_guestfs
def test_a_tree_that_does_not_fit_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the size check (made to under-estimate here), the appliance runs out of space: same error."""
    tree = Tree()
    tree.add("big", regular(os.urandom(14 << 20)))
    monkeypatch.setattr(disk.Usage, "minimum", property(lambda self: 16 * disk.MIB))
    with pytest.raises(DiskInputError, match="does not fit in 16 MiB .* larger --disk-size") as e:
        disk.write_disk(tree, tmp_path / "out" / "disk.img", size=16 * disk.MIB)
    assert e.value.exit_code == 2
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    """The busybox image built both ways, initrds uncompressed, no kernel."""
    if not guestfs_available():
        pytest.skip("libguestfs (python3-guestfs) missing")
    d = tmp_path_factory.mktemp("artifacts")
    ref = make_busybox_image(d / "oci").ref
    return {
        fmt: build(
            ref, BuildOptions(output=d / fmt, format=fmt, kernel=None, compression="none", epoch=EPOCH)
        )
        for fmt in ("initramfs", "disk")
    }


@pytest.fixture(scope="module")
def disks(
    artifacts: dict[str, Artifact], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Tree, disk.DiskImage]]:
    """Disks to read back: written from trees, and the disk artifact's (its tree is not at hand: empty)."""
    d = tmp_path_factory.mktemp("disks")
    whiteout = flat(make_whiteout_image(d / "whiteout-oci"))
    busybox = flat(make_busybox_image(d / "busybox-oci"))
    out = {
        "whiteout": (whiteout, disk.write_disk(whiteout, d / "whiteout.img", epoch=EPOCH)),
        "busybox": (busybox, disk.write_disk(busybox, d / "busybox.qcow2", fmt="qcow2", epoch=EPOCH)),
    }
    if os.geteuid() == 0:
        out["whiteout-mkfs"] = (whiteout, disk.mkfs_fast(whiteout, d / "whiteout-mkfs.img", epoch=EPOCH))
    art = artifacts["disk"]
    assert art.disk is not None
    m = art.manifest.to_json()["disk"]
    image = disk.DiskImage(art.disk, m["format"], m["size"], m["content_bytes"], m["uuid"])
    out["artifact"] = (Tree(), image)
    return out


@pytest.fixture(scope="module")
def read_back(
    disks: dict[str, tuple[Tree, disk.DiskImage]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """One appliance reads every disk: a numeric-owner tar with xattrs, inode numbers and ctimes."""
    import guestfs  # type: ignore[import-not-found]

    d = tmp_path_factory.mktemp("read-back")
    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    g.set_backend("direct")
    if disk.force_tcg():
        g.set_backend_settings(["force_tcg"])
    names = list(disks)
    for name in names:
        g.add_drive_opts(str(disks[name][1].path), format=disks[name][1].format, readonly=True)
    g.launch()
    result: dict[str, dict[str, Any]] = {}
    try:
        for i, name in enumerate(names):
            dev = f"/dev/sd{chr(ord('a') + i)}"
            g.mount_ro(dev, "/")
            g.tar_out("/", str(d / f"{name}.tar"), numericowner=True, xattrs=True)
            tree = disks[name][0]
            files = [p for p, n in tree.walk() if n.kind == FILE and p.isascii()]
            result[name] = {
                "tar": d / f"{name}.tar",
                "vfs_type": g.vfs_type(dev),
                "uuid": g.vfs_uuid(dev),
                "stat": {p: g.lstatns("/" + p) for p in files},
            }
            g.umount_all()
    finally:
        g.shutdown()
        g.close()
    return result


@pytest.mark.slow
@needs_guestfs
@pytest.mark.parametrize("name", ["whiteout", "busybox", "whiteout-mkfs"])
def test_disk_holds_the_tree(
    name: str, disks: dict[str, tuple[Tree, disk.DiskImage]], read_back: dict[str, dict[str, Any]]
) -> None:
    if name not in disks:
        pytest.skip("mkfs.ext4 -d needs root")
    tree, image = disks[name]
    got = read_back[name]
    assert got["vfs_type"] == "ext4" and got["uuid"] == image.uuid
    assert image.size_bytes == disk.auto_size(tree) and image.content_bytes == disk.usage(tree).content_bytes
    sig, links = tar_sig(got["tar"])
    want = tree_sig(tree, EPOCH)
    assert sorted(sig) == sorted(want)
    assert {p: s for p, s in sig.items() if s != want[p]} == {}
    assert links == tree_links(tree)
    # hardlinks share one inode; every inode's ctime is pinned to its mtime
    inos = {p: st["st_ino"] for p, st in got["stat"].items()}
    for group in tree_links(tree):
        assert len({inos[p] for p in group}) == 1
    for p, st in got["stat"].items():
        assert st["st_ctime_sec"] == st["st_mtime_sec"] == want[p][3], p
        assert st["st_ctime_nsec"] == 0


def cpio_sig(initrd: Path) -> dict[str, Sig]:
    """name -> (mode, uid, gid, mtime, rdev, sha256) of an uncompressed initramfs."""
    entries = read_cpio(initrd.read_bytes())
    by_ino: dict[object, bytes] = {}
    for e in entries:
        if e["size"]:
            by_ino[e["ino"]] = e["data"]  # type: ignore[assignment]
    return {
        e["name"]: (
            e["mode"],
            e["uid"],
            e["gid"],
            e["mtime"],
            (e["rdevmajor"], e["rdevminor"]),  # type: ignore
            hashlib.sha256(by_ino.get(e["ino"], b"") if stat.S_ISREG(e["mode"]) else b"").hexdigest(),
        )  # type: ignore
        for e in entries
    }


def disk_sig(read_back: dict[str, Any]) -> dict[str, Sig]:
    sig, _ = tar_sig(read_back["tar"])
    return {p: (s[0], s[1], s[2], s[3], s[6], s[8]) for p, s in sig.items()}


@pytest.mark.slow
@needs_guestfs
def test_disk_equals_the_initramfs(
    disks: dict[str, tuple[Tree, disk.DiskImage]], read_back: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """What the guest sees on /dev/xvda is what it would see in the initramfs of the same tree."""
    tree, _ = disks["whiteout"]
    pack(tree, tmp_path / "initrd", "none", epoch=EPOCH)
    assert disk_sig(read_back["whiteout"]) == cpio_sig(tmp_path / "initrd")


@pytest.mark.slow
@needs_guestfs
def test_disk_build_equals_the_initramfs_build(
    artifacts: dict[str, Artifact], read_back: dict[str, dict[str, Any]]
) -> None:
    """`xbuild IMAGE --format disk` puts on disk.img exactly what `xbuild IMAGE` packs into its initramfs,
    but for the init's config, which gains the root-disk records; its own initramfs is that config and the
    init."""
    initramfs = cpio_sig(artifacts["initramfs"].initrd)
    ondisk = disk_sig(read_back["artifact"])
    cfg = ".xbuild/config"
    assert {p: s for p, s in ondisk.items() if p != cfg} == {p: s for p, s in initramfs.items() if p != cfg}
    boot = {e["name"]: e for e in read_cpio(artifacts["disk"].initrd.read_bytes())}
    assert sorted(boot) == [".", ".xbuild", cfg, ".xbuild/init", "dev", "dev/console", "init"]
    assert cpio_sig(artifacts["disk"].initrd)[cfg] == ondisk[cfg]
    plain = {e["name"]: e for e in read_cpio(artifacts["initramfs"].initrd.read_bytes())}
    want = dataclasses.replace(GuestConfig.decode(plain[cfg]["data"]), root_devices=ROOT_DEVICES)  # type: ignore
    assert GuestConfig.decode(boot[cfg]["data"]) == want  # type: ignore[arg-type]


# ------------------------------------------------------------------------- `--format disk` guests booted


def disk_artifact(ref: str, out: Path, **opts: Any) -> Artifact:
    return build(ref, BuildOptions(output=out, format="disk", **opts))


@pytest.fixture(scope="module")
def probe_image(tmp_path_factory: pytest.TempPathFactory) -> OciImage:
    return make_disk_probe_image(tmp_path_factory.mktemp("probe") / "oci")


@pytest.mark.slow
@needs_guestfs
@pytest.mark.parametrize(("fmt", "mode"), [("qcow2", "rw"), ("raw", "ro")])
def test_disk_guest_boots_from_its_disk(
    fmt: str, mode: str, probe_image: OciImage, tmp_path: Path, default_kernel_path: Path
) -> None:
    """The initramfs holds only the init; the program runs on /dev/vda, mounted rw or ro. `xbuild run`
    never changes the artifact's disk: every run starts from the image (an rw guest's writes are thrown
    away, as `docker run` does), and disk.img is the same byte for byte afterwards."""
    art = disk_artifact(probe_image.ref, tmp_path / "art", disk_mode=mode, disk_format=fmt)
    m = art.manifest.to_json()
    assert m["disk"]["mode"] == mode and m["disk"]["format"] == fmt and m["guest"]["memory_mb"] <= 128
    assert m["initrd"]["entries"] == 7 and m["initrd"]["size"] < 64 << 10  # init, config, links, console
    assert f"format={fmt}, vdev=xvda, access={mode}, target=disk.img" in (art.path / "xen.cfg").read_text()
    assert file_sha256(art.path / "disk.img") == m["disk"]["sha256"]
    for _ in range(2 if mode == "rw" else 1):
        r = run(art, timeout=120, accel="tcg", console=None, memory_mb=m["guest"]["memory_mb"])
        assert r.exit_status == 0, r.console
        check_disk_probe(r.console, "/dev/vda", mode)
    assert file_sha256(art.path / "disk.img") == m["disk"]["sha256"]
    if mode == "rw":
        # the same artifact without its disk: the init says which devices it waited for
        bare = tmp_path / "bare"
        shutil.copytree(art.path, bare, ignore=shutil.ignore_patterns("disk.img"))
        manifest = json.loads((bare / "manifest.json").read_text())
        del manifest["disk"]
        (bare / "manifest.json").write_text(json.dumps(manifest))
        r = run(bare, timeout=120, accel="tcg", console=None)
        out = r.console.decode(errors="replace")
        assert "xbuild: error: root disk: no /dev/vda or /dev/xvda appeared within 10s" in out, out
        assert r.exit_status == 125


@pytest.mark.slow
@needs_guestfs
def test_nginx_lookalike_disk_guest_passes_its_smoke_test(
    nginx_layout: str, tmp_path: Path, default_kernel_path: Path
) -> None:
    art = disk_artifact(nginx_layout, tmp_path / "nginx", recipe="nginx", xen_type="pv")
    assert art.manifest.guest.memory_mb <= 128
    for hypervisor in ("qemu", "xen-nested"):
        assert verify_artifact(art, hypervisor=hypervisor).startswith("verify: passed"), hypervisor


@pytest.mark.slow
@needs_guestfs
def test_large_python_image_on_disk_runs_in_128_mb(
    python_layout: str, tmp_path: Path, default_kernel_path: Path
) -> None:
    """A > 100 MB image (Debian + python3 + a web app, not minimized) as a disk guest with 128 MB of RAM:
    more files than the RAM could hold as an initramfs next to the program."""
    art = disk_artifact(python_layout, tmp_path / "py", recipe="python-web", minimize="none", xen_type="pv")
    assert art.manifest.to_json()["disk"]["content_bytes"] > 100e6
    assert art.manifest.guest.memory_mb == 128
    for hypervisor in ("qemu", "xen-nested"):
        assert verify_artifact(art, hypervisor=hypervisor).startswith("verify: passed"), hypervisor
