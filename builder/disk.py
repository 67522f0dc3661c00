"""Disk: write a `Tree` into an ext4 disk image (raw or qcow2) without root or loop devices.

The tree goes in as one tar stream, made from the index exactly as pack walks it (byte-ordered names,
mtimes clamped to the epoch, hardlinks sharing an inode, owners numeric, devices, xattrs), and is
unpacked by libguestfs's `tar_in` inside its appliance: one upload, never a call per file.

Reproducibility: the empty filesystem is made on the host by `mkfs.ext4` (a plain file: no root) with our
own mke2fs.conf, a UUID and htree hash seed derived from the tar's sha256, faked clocks and no lazy
initialisation. After the appliance wrote it, the used journal is swapped for a fresh zeroed one (no commit
times), and debugfs sets every inode's atime/ctime/crtime to its clamped mtime, zeroes nanoseconds and the
random i_generation, and pins the superblock's mount bookkeeping to the epoch. Left to chance: the block
and inode allocation of the appliance's kernel (deterministic in our runs, not guaranteed).

libguestfs cannot use a KVM that hangs guests (nested virtualisation without the needed support): the one
KVM probe (builder.run.qemu.kvm_works: a boot of the host kernel, the one supermin gives the appliance, with
a cached verdict shared with `xbuild run`) decides; a broken or missing KVM means `force_tcg`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DiskError, DiskInputError
from .host import install_hint, require
from .options import DiskFormat, Progress, choices
from .proc import run_tool
from .tree import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, ContentReader, Entry, Tree, entries

BLOCK_SIZE = 4096
INODE_SIZE = 256
MIB = 1 << 20
MARGIN_RATIO = 0.25  # auto size: 25 % of the need on top ...
MARGIN_FIXED = 32 * MIB  # ... plus 32 MiB (journal, ext4 metadata, free room for the guest)
LAUNCH_ESTIMATE = 30  # seconds the appliance takes to start under TCG here
FEATURES = "extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize"
MKE2FS_CONF = f"""[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = user_xattr,acl
\tenable_periodic_fsck = 0
\tblocksize = {BLOCK_SIZE}
\tinode_size = {INODE_SIZE}
\tinode_ratio = 16384
[fs_types]
\text4 = {{
\t\tfeatures = {FEATURES}
\t}}
\tsmall = {{
\t}}
\tfloppy = {{
\t}}
"""


@dataclass(frozen=True)
class DiskImage:
    path: Path
    format: str
    size_bytes: int  # the disk's virtual size (= the filesystem's)
    content_bytes: int  # bytes of regular file content, each hardlinked file once
    uuid: str  # the ext4 filesystem UUID


@dataclass(frozen=True)
class Usage:
    """What the tree needs in ext4: data blocks (files, directories, long symlinks, xattr blocks) and
    inodes (one per distinct Inode)."""

    data_bytes: int
    inodes: int
    content_bytes: int

    @property
    def journal_bytes(self) -> int:
        """The journal: 4 MiB below 128 MiB of need, 16 MiB below 1 GiB, else 64 MiB."""
        need = self.data_bytes + self.inodes * INODE_SIZE
        return (4 if need < 128 * MIB else 16 if need < 1024 * MIB else 64) * MIB

    @property
    def minimum(self) -> int:
        """The smallest filesystem that can hold the tree: data, inode tables, journal, ~3 % + 4 MiB for
        bitmaps, group descriptors and their backups."""
        raw = self.data_bytes + self.inodes * INODE_SIZE
        return _round_mib(raw + raw // 32 + self.journal_bytes + 4 * MIB)


def usage(tree: Tree) -> Usage:
    data = content = inodes = 0
    for e in entries(tree):
        if not e.is_leader:
            continue
        node, inodes = e.node, inodes + 1
        if node.kind == FILE:
            data += _blocks(node.size)
            content += node.size
        elif node.kind == DIR:
            names = sum(8 + ((len(os.fsencode(n)) + 3) & ~3) for n in node.children or ())
            data += _blocks(max(names, 1))
        elif node.kind == SYMLINK and len(os.fsencode(node.target)) >= 60:
            data += BLOCK_SIZE
        if node.xattrs and sum(len(k) + len(v) + 20 for k, v in node.xattrs.items()) > 96:
            data += BLOCK_SIZE  # does not fit in the inode's spare 96 bytes
    return Usage(data, inodes, content)


def auto_size(tree: Tree) -> int:
    """The `--disk-size auto` size: the tree's need (data blocks + inode tables, see `Usage.minimum`)
    plus MARGIN_RATIO of it and MARGIN_FIXED, rounded up to a MiB."""
    need = usage(tree).minimum
    return _round_mib(need + int(need * MARGIN_RATIO) + MARGIN_FIXED)


def write_disk(
    tree: Tree,
    out: Path,
    fmt: str = DiskFormat.RAW,
    size: int | None = None,
    epoch: int | None = None,
    progress: Progress | None = None,
) -> DiskImage:
    """Write `tree` into a new ext4 disk image at `out` (atomically: temp + rename) through libguestfs."""
    check_available()
    return _build(tree, out, fmt, size, epoch, progress, _fill_guestfs)


def mkfs_fast(
    tree: Tree,
    out: Path,
    fmt: str = DiskFormat.RAW,
    size: int | None = None,
    epoch: int | None = None,
    progress: Progress | None = None,
) -> DiskImage:
    """The same image through `mkfs.ext4 -d`: root only (the tree is unpacked to a temp dir first)."""
    if os.geteuid() != 0:
        raise DiskInputError("mkfs_fast needs root (the tree is unpacked with its owners and devices)")
    return _build(tree, out, fmt, size, epoch, progress, _fill_mkfs_d)


# ---------------------------------------------------------------------------------------------- build

Filler = Callable[[Path, Path, "_Mkfs", Usage, "Progress | None"], None]


@dataclass(frozen=True)
class _Mkfs:
    """How to make the empty filesystem (the fast path adds `-d DIR`)."""

    size: int
    uuid: str
    inodes: int
    journal_bytes: int
    fs_time: int
    conf: Path

    def run(self, image: Path, *extra: str) -> None:
        ext = f"hash_seed={self.uuid},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"
        _tool(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-m",
                "0",
                "-N",
                str(self.inodes),
                "-U",
                self.uuid,
                "-O",
                "has_journal",
                "-J",
                f"size={self.journal_bytes // MIB}",
                "-E",
                ext,
                *extra,
                str(image),
                f"{self.size // 1024}k",
            ],
            self.fs_time,
            self.conf,
        )


def _build(
    tree: Tree,
    out: Path,
    fmt: str,
    size: int | None,
    epoch: int | None,
    progress: Progress | None,
    fill: Filler,
) -> DiskImage:
    if fmt not in choices(DiskFormat):
        raise DiskInputError(f"unknown disk format {fmt!r} (choose from {', '.join(choices(DiskFormat))})")
    need = usage(tree)
    size = auto_size(tree) if size is None else size
    if size < need.minimum:
        raise DiskInputError(
            f"--disk-size {size // MIB} MiB is too small for this image: it needs at least "
            f"{need.minimum // MIB} MiB (use auto, or at least that)"
        )
    size = -(-size // BLOCK_SIZE) * BLOCK_SIZE
    out = Path(out)
    fs_time = epoch if epoch is not None else max((n.mtime for _, n in tree.walk()), default=0)
    with _atomic_path(out) as final, tempfile.TemporaryDirectory(prefix="xbuild-disk.") as tmp_name:
        tmp = Path(tmp_name)
        digest = _write_tar(tree, tmp / "tree.tar", epoch, progress)
        conf = tmp / "mke2fs.conf"
        conf.write_text(MKE2FS_CONF)
        fs_uuid = str(uuidlib.UUID(bytes=bytes.fromhex(digest)[:16], version=4))
        inodes = max(need.inodes + need.inodes // 4 + 256, size // 16384)
        mkfs = _Mkfs(size, fs_uuid, inodes, need.journal_bytes, max(fs_time, 0), conf)
        raw = final if fmt == DiskFormat.RAW else tmp / "disk.raw"
        fill(tmp / "tree.tar", raw, mkfs, need, progress)
        _settle(raw, tree, epoch, mkfs)
        if fmt == DiskFormat.QCOW2:
            _tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(final)])
    return DiskImage(out, fmt, size, need.content_bytes, fs_uuid)


@contextmanager
def _atomic_path(out: Path) -> Iterator[Path]:
    """A temp file beside `out`, renamed onto it on success and removed on failure; made first, so an
    unwritable destination fails before any work."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as e:
        raise DiskInputError(f"cannot write {out}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except OSError as e:
        raise DiskError(f"cannot write {out}: {e}") from None
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def _settle(raw: Path, tree: Tree, epoch: int | None, mkfs: _Mkfs) -> None:
    """Pin what the kernel or the unpacking left to the clock or chance: inode times (atime/ctime/crtime =
    the clamped mtime, no nanoseconds) and generations, the superblock's mount bookkeeping, the journal.
    A directory's generation seeds its blocks' checksums, so e2fsck redoes them; tune2fs then swaps the used
    journal for a zeroed one and copies the primary superblock over the backups the kernel touched."""
    t = mkfs.fs_time
    lines = [
        *(f"ssv {f} @{t}" for f in ("mtime", "wtime", "lastcheck", "mkfs_time")),
        "ssv mnt_count 0",
        "ssv kbytes_written 0",
        'ssv last_mounted ""',
    ]
    lost_found = ("lost+found", t if epoch is None else min(t, epoch))
    for path, mtime in [*((e.path, e.mtime) for e in entries(tree, epoch)), lost_found]:
        if "\n" in path:
            continue  # debugfs reads one command a line: such a name keeps the time of unpacking
        quoted = '"/' + path.replace('"', '""') + '"'
        lines += [f"sif {quoted} {f} @{mtime}" for f in ("atime", "ctime", "crtime", "mtime")]
        lines += [
            f"sif {quoted} {f} 0"
            for f in ("atime_extra", "ctime_extra", "crtime_extra", "mtime_extra", "generation")
        ]
    _debugfs(raw, lines, mkfs)
    _tool(["e2fsck", "-f", "-y", str(raw)], t, mkfs.conf)
    _tool(["tune2fs", "-O", "^has_journal", str(raw)], t, mkfs.conf)
    _tool(["tune2fs", "-J", f"size={mkfs.journal_bytes // MIB}", str(raw)], t, mkfs.conf)


def _debugfs(raw: Path, commands: list[str], mkfs: _Mkfs) -> None:
    script = mkfs.conf.with_name("settle.debugfs")
    script.write_text("\n".join(commands) + "\n", errors="surrogateescape")
    _tool(["debugfs", "-w", "-n", "-f", str(script), str(raw)], mkfs.fs_time, mkfs.conf)


def _tool(cmd: list[str], fs_time: int | None = None, conf: Path | None = None) -> None:
    """Run an e2fsprogs/qemu-img/tar step (builder.proc.run_tool); e2fsck's status 1 (fixed) is success,
    and debugfs, which exits 0 whatever failed, fails on any stderr line but its banner."""
    env = dict(os.environ, LC_ALL="C")
    if fs_time is not None:
        env["E2FSPROGS_FAKE_TIME"] = env["E2FSCK_TIME"] = str(fs_time)
    if conf is not None:
        env["MKE2FS_CONFIG"] = str(conf)
    done = run_tool(
        cmd,
        DiskError,
        env=env,
        max_status=1 if cmd[0] == "e2fsck" else 0,
        missing=DiskInputError,
        hint=install_hint("e2fsck", "qemu-img"),
    )
    errors = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if cmd[0] == "debugfs" and errors:
        raise DiskError(f"debugfs failed: {errors[-1]}")


def _round_mib(n: int) -> int:
    return -(-n // MIB) * MIB


def _blocks(n: int) -> int:
    return -(-n // BLOCK_SIZE) * BLOCK_SIZE


# ------------------------------------------------------------------------------------------ tar stream


def _write_tar(tree: Tree, path: Path, epoch: int | None, progress: Progress | None) -> str:
    """Write `tree` as a PAX tar (builder.tree.entries: pack's order and clamping; a hardlinked file's first
    name carries the data, later ones link to it); return its sha256."""
    tick = progress("disk: tar", usage(tree).content_bytes) if progress else None
    with ContentReader() as contents, tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries(tree, epoch):
            info = _tarinfo(e)
            body = None
            if e.node.kind == FILE:
                if e.is_leader:
                    body = contents.open(e.node)
                else:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, e.leader, 0
            tar.addfile(info, body)
            if body is not None and tick:
                tick(e.node.size)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    node = e.node
    info = tarfile.TarInfo(e.path or ".")
    info.mode, info.uid, info.gid = node.mode & 0o7777, node.uid, node.gid
    info.uname = info.gname = ""
    info.mtime = e.mtime
    kind = node.kind
    if kind == FILE:
        info.type, info.size = tarfile.REGTYPE, node.size
    elif kind == DIR:
        info.type = tarfile.DIRTYPE
    elif kind == SYMLINK:
        info.type, info.linkname = tarfile.SYMTYPE, node.target
    elif kind in (CHAR, BLOCK):
        info.type = tarfile.CHRTYPE if kind == CHAR else tarfile.BLKTYPE
        info.devmajor, info.devminor = node.rdev
    elif kind == FIFO:
        info.type = tarfile.FIFOTYPE
    info.pax_headers = {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
        for k, v in sorted((node.xattrs or {}).items())
    }
    return info


# ------------------------------------------------------------------------------------------- libguestfs


def check_available() -> None:
    """DiskInputError naming the Debian packages when libguestfs (or its appliance kernel) is missing."""
    require("guestfs", "/boot/vmlinuz-*", "e2fsck", error=DiskInputError)


def _guestfs() -> Any:
    check_available()
    try:
        import guestfs
    except ImportError as e:
        raise DiskInputError(f"libguestfs' Python binding cannot be loaded: {e}") from None
    return guestfs


def _fill_guestfs(tar: Path, raw: Path, mkfs: _Mkfs, need: Usage, progress: Progress | None) -> None:
    guestfs = _guestfs()
    mkfs.run(raw)
    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    try:
        g.set_backend("direct")
        if force_tcg():
            g.set_backend_settings(["force_tcg"])
        g.add_drive_opts(str(raw), format="raw", readonly=False, cachemode="unsafe")
        with _ticking(progress, "disk: starting the libguestfs appliance", LAUNCH_ESTIMATE):
            g.launch()
        # blocks allocated in write order, not at writeback's whim: a reproducible layout (~3 s on nginx)
        g.mount_options("nodelalloc", "/dev/sda", "/")
        _watch_upload(g, guestfs, progress, tar.stat().st_size)
        try:
            g.tar_in(str(tar), "/", xattrs=True, acls=False, selinux=False)
        except RuntimeError as e:
            if "No space left" in str(e) or "Wrote only" in str(e):  # GNU tar's two ways of saying ENOSPC
                raise DiskInputError(
                    f"the image does not fit in {mkfs.size // MIB} MiB (it needs about "
                    f"{need.minimum // MIB} MiB): use a larger --disk-size or auto"
                ) from None
            raise
        g.umount_all()
        g.shutdown()
    except RuntimeError as e:
        raise DiskError(f"libguestfs: {str(e).splitlines()[0] if str(e) else e!r}") from None
    finally:
        g.close()


def _watch_upload(g: Any, guestfs: Any, progress: Progress | None, total: int) -> None:
    if not progress:
        return
    tick = progress("disk: writing", total)
    done = [0]

    def on_progress(event: int, handle: int, buf: str, array: list[int]) -> None:
        position = array[2]
        if position > done[0]:
            tick(position - done[0])
            done[0] = position

    g.set_event_callback(on_progress, guestfs.EVENT_PROGRESS)


@contextmanager
def _ticking(progress: Progress | None, label: str, seconds: int) -> Iterator[None]:
    """Advance a progress bar once a second while the body runs (the appliance launch says nothing)."""
    if not progress:
        yield
        return
    tick, stop = progress(label, seconds), threading.Event()

    def run() -> None:
        while not stop.wait(1.0):
            tick(1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def force_tcg() -> bool:
    """Whether the appliance must run under TCG: KVM unusable or hanging guests here (the one KVM probe,
    builder.run.qemu.kvm_works, booting the host kernel the appliance boots)."""
    from .run.qemu import kvm_works

    return not kvm_works()


# ------------------------------------------------------------------------------------- mkfs.ext4 -d path


def _fill_mkfs_d(tar: Path, raw: Path, mkfs: _Mkfs, need: Usage, progress: Progress | None) -> None:
    root = raw.with_name("root")
    root.mkdir()
    _tool(
        [
            "tar",
            "-x",
            "-p",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-f",
            str(tar),
            "-C",
            str(root),
        ]
    )
    mkfs.run(raw, "-d", str(root))
    shutil.rmtree(root)
