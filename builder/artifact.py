"""The artifact directory: what a build writes and what run, verify, explain, push and pull read.

    <dir>/initrd.img     the packed initramfs (with `--format disk`: only the init and its config)
    <dir>/disk.img       with `--format disk`: the root filesystem (ext4, raw or qcow2), mounted by the init
    <dir>/kernel         the guest kernel (when one was paired)
    <dir>/cmdline        the kernel command line, one line
    <dir>/xen.cfg        an xl config with paths relative to the directory (for a hand-run `xl create`;
                         xbuild itself never reads it: its runners generate the config from the manifest;
                         only the nested rig's hand-run check, builder.run.xen.BridgeProbe, runs it, in
                         dom0). With a network (manifest `network`): `vif = [ 'bridge=NAME' ]` and the
                         kernel's `ip=dhcp` (or a static `ip=`) in `extra`, for a dom0 whose bridge NAME is
                         on a network with DHCP (Debian's documented Xen setup)
    <dir>/manifest.json  what went in: source image, config, sizes, digests, minimize report
    <dir>/provenance.intoto.json  how it was built: an in-toto statement naming every other file's sha256
                         and the build's inputs (builder/provenance.py); `xbuild rebuild` builds from it
    <dir>/sbom.cdx.json  the guest's software bill of materials (CycloneDX JSON, builder/sbom.py)

An artifact is data, never code or paths: a pulled one is as untrusted as an image. `open_artifact` is the
one place that reads a directory, and everything else works on the validated `Artifact` it returns:

- the directory holds only the names above, each a regular file (not a symlink, a device or a directory);
  the manifest names its files by these fixed names only, so no path from an artifact ever reaches a
  command line;
- `Manifest.from_json` checks every field the runners use: memory within options.MEMORY_MB, vcpus within
  VCPUS, xen_type, disk format and mode from their enums (builder/options.py), the hostname from
  HOSTNAME's alphabet, `network` (xen.cfg's vif) a bridge of BRIDGE's alphabet and a static IPv4
  address and gateway that `ipaddress` accepts (`network_problem`), sizes non-negative integers,
  digests well-formed; `cmdline` is one line of at most CMDLINE_MAX bytes from CMDLINE_WORD's alphabet
  (no quotes, backslashes or control characters);
- the recorded sizes match the files; a qcow2 disk has no backing file, no external data file and no
  incompatible feature bit this reader does not know (`check_qcow2`), so no host file can be reached
  through it (the runners also open disks with an explicit driver and `backing: null`).

Content digests (initrd, disk) are not re-hashed on open: pull checks every byte it writes, push checks the
disk it publishes. Unknown manifest keys are ignored (a newer xbuild may add some). A bad artifact is an
ArtifactError: one line, exit 2.

`prepare_output` is the one decision about what an `-o` path may replace (build and pull).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import struct
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .cache import no_space
from .compression import COMPRESSIONS
from .errors import ArtifactError
from .guest import GuestConfig
from .options import (
    DEFAULT_MEMORY_MB,
    DEFAULT_XEN_TYPE,
    DiskFormat,
    DiskMode,
    XenType,
    choices,
    memory_outside,
)

INITRD, KERNEL, CMDLINE, XEN_CFG, MANIFEST = "initrd.img", "kernel", "cmdline", "xen.cfg", "manifest.json"
DISK = "disk.img"
PROVENANCE = "provenance.intoto.json"
SBOM = "sbom.cdx.json"
NAMES = (MANIFEST, KERNEL, INITRD, CMDLINE, XEN_CFG, DISK, PROVENANCE, SBOM)  # every file an artifact holds
SCHEMA = "xbuild.artifact.v1"
VCPUS = (1, 64)
MANIFEST_LIMIT = 64 << 20  # a manifest.json larger than this is not read
CMDLINE_MAX = 2048  # x86 COMMAND_LINE_SIZE
HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
CMDLINE_WORD = re.compile(r"[A-Za-z0-9_.,:/=+@%~-]+")
DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]{32,}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
BRIDGE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")  # a Linux interface name (IFNAMSIZ - 1)


def _bad(where: str, what: str) -> ArtifactError:
    return ArtifactError(f"{where}: {what}")


def _count(value: int, where: str) -> None:
    if value < 0:
        raise _bad(where, f"{value} is negative")


def _one_of(value: str, members: type[StrEnum], where: str) -> None:
    if value not in choices(members):
        raise _bad(where, f"{value[:40]!r} is not one of {', '.join(choices(members))}")


def _file_name(value: str, expected: str, where: str) -> None:
    if value != expected:
        raise _bad(where, f"{value!r} is not the artifact's {expected} (files are fixed plain names)")


def cmdline_words(text: str, where: str) -> str:
    """`text` as a kernel command line an artifact may carry: one line, at most CMDLINE_MAX bytes, words of
    CMDLINE_WORD's alphabet; returned with single spaces."""
    if len(text.encode()) > CMDLINE_MAX or "\n" in text.strip():
        raise _bad(where, f"not one line of at most {CMDLINE_MAX} bytes")
    words = text.split()
    bad = next((w for w in words if not CMDLINE_WORD.fullmatch(w)), None)
    if bad is not None:
        raise _bad(where, f"kernel argument {bad[:60]!r}: only letters, digits and _.,:/=+@%~- are allowed")
    return " ".join(words)


# ---- the typed manifest ------------------------------------------------------------------------------------

_T = TypeVar("_T", bound="_Section")
_D = TypeVar("_D")


class _Section:
    """A frozen dataclass read from and written to JSON. `from_json` checks every field's JSON type from
    the annotations (int is never a bool, tuples are lists, nested sections are objects), ignores unknown
    keys, then `__post_init__` checks the values; `to_json` leaves out optional fields that are None."""

    NAME: ClassVar[str] = ""  # where errors point when read on its own

    @classmethod
    def from_json(cls: type[_T], obj: object, where: str | None = None) -> _T:
        return _from_json(cls, obj, cls.NAME if where is None else where)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


def _from_json(cls: type[_D], obj: object, where: str) -> _D:
    """A dataclass (a section, or a dataclass a section holds, like guest.Health) from a JSON object."""
    if not isinstance(obj, Mapping):
        raise _bad(where, "not a JSON object")
    hints = _hints(cls)
    kw: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in obj:
            if f.default is MISSING and f.default_factory is MISSING:
                raise _bad(where, f"no {f.name}")
            continue
        kw[f.name] = _typed(obj[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name)
    return cls(**kw)


def _to_json(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        out[f.name] = _plain(value)
    return out


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a section class (resolved once: `get_type_hints` is slow)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _to_json(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the annotation `hint` (str, int, bool, X | None, tuple[X, ...], a section,
    dict[str, Any]); tuples for lists, sections for objects."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise _bad(where, "not a list")
        return tuple(_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(where, "not a JSON object")
        return value
    if isinstance(hint, type) and issubclass(hint, _Section):
        return hint.from_json(value, where)
    if isinstance(hint, type) and is_dataclass(hint):
        return _from_json(hint, value, where)
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
    }.get(hint)
    if not ok:
        raise _bad(where, f"expected {getattr(hint, '__name__', hint)}, not {type(value).__name__}")
    return value


def _check_digest(value: str, where: str) -> None:
    if not DIGEST.fullmatch(value):
        raise _bad(where, f"{value[:80]!r} is not a digest")


@dataclass(frozen=True)
class Tool(_Section):
    NAME: ClassVar[str] = "tool"
    name: str
    version: str


@dataclass(frozen=True)
class SourceLayer(_Section):
    NAME: ClassVar[str] = "layers"
    digest: str
    size: int
    media_type: str
    diff_id: str

    def __post_init__(self) -> None:
        _check_digest(self.digest, "source.layers.digest")
        _check_digest(self.diff_id, "source.layers.diff_id")
        _count(self.size, "source.layers.size")


@dataclass(frozen=True)
class Source(_Section):
    """Where the image came from (informational: nothing of it reaches a command line)."""

    NAME: ClassVar[str] = "source"
    reference: str
    manifest_digest: str
    config_digest: str
    platform: str
    layers: tuple[SourceLayer, ...]
    created: str | None = None

    def __post_init__(self) -> None:
        _check_digest(self.manifest_digest, "source.manifest_digest")
        _check_digest(self.config_digest, "source.config_digest")


@dataclass(frozen=True)
class Initrd(_Section):
    NAME: ClassVar[str] = "initrd"
    sha256: str
    size: int
    uncompressed_size: int
    compression: str
    entries: int
    level: int | None = None
    file: str = INITRD

    def __post_init__(self) -> None:
        _file_name(self.file, INITRD, "initrd.file")
        if self.compression not in COMPRESSIONS:
            raise _bad(
                "initrd.compression", f"{self.compression[:40]!r} is not one of {', '.join(COMPRESSIONS)}"
            )
        if not SHA256_HEX.fullmatch(self.sha256):
            raise _bad("initrd.sha256", "not a hex sha256")
        for name in ("size", "uncompressed_size", "entries"):
            _count(getattr(self, name), f"initrd.{name}")


@dataclass(frozen=True)
class KernelInfo(_Section):
    """The paired kernel: `key`, `release`, `fragments` for the cached trimmed one, `source` for a file."""

    NAME: ClassVar[str] = "kernel"
    size: int
    format: str
    file: str = KERNEL
    key: str | None = None
    release: str | None = None
    fragments: tuple[str, ...] | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        _file_name(self.file, KERNEL, "kernel.file")
        _count(self.size, "kernel.size")


@dataclass(frozen=True)
class Guest(GuestConfig, _Section):
    """What the init runs (the GuestConfig that is also the initrd's /.xbuild/config, field for field) and
    what the runners give the guest (memory, vcpus, Xen type; the hostname is the init's)."""

    NAME: ClassVar[str] = "guest"
    memory_mb: int = DEFAULT_MEMORY_MB
    xen_type: str = DEFAULT_XEN_TYPE.value
    vcpus: int = 1
    recipe: str | None = None
    min_memory_mb: int | None = None  # builder/memory.py; None: an older artifact, or no kernel paired

    @classmethod
    def of(cls, gc: GuestConfig, **runner: Any) -> Guest:
        """The manifest's section for the init config `gc` and the runners' settings (memory_mb, …)."""
        return cls(**{f.name: getattr(gc, f.name) for f in fields(GuestConfig)}, **runner)

    def __post_init__(self) -> None:
        if self.health:
            for name, value in vars(self.health).items():
                if isinstance(value, int):
                    _count(value, f"guest.health.{name}")
        if why := memory_outside(self.memory_mb):
            raise _bad("guest.memory_mb", why)
        if self.min_memory_mb is not None:
            _count(self.min_memory_mb, "guest.min_memory_mb")
        if not VCPUS[0] <= self.vcpus <= VCPUS[1]:
            raise _bad("guest.vcpus", f"{self.vcpus} is outside {VCPUS[0]}..{VCPUS[1]}")
        _one_of(self.xen_type, XenType, "guest.xen_type")
        if not HOSTNAME.fullmatch(self.hostname):
            raise _bad(
                "guest.hostname",
                f"{self.hostname[:80]!r} is not a hostname (letters, digits, '.', '_', '-'; at most 63)",
            )


@dataclass(frozen=True)
class DiskInfo(_Section):
    """The root disk of a `--format disk` artifact."""

    NAME: ClassVar[str] = "disk"
    format: str
    mode: str
    size: int
    file_size: int
    sha256: str
    file: str = DISK
    uuid: str | None = None
    content_bytes: int | None = None
    fstype: str = "ext4"
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _file_name(self.file, DISK, "disk.file")
        _one_of(self.format, DiskFormat, "disk.format")
        _one_of(self.mode, DiskMode, "disk.mode")
        if self.size <= 0 or self.file_size <= 0:
            raise _bad("disk.size", f"sizes {self.size}, {self.file_size} must be positive")
        if not SHA256_HEX.fullmatch(self.sha256):
            raise _bad("disk.sha256", "not a hex sha256")


def network_problem(bridge: str, address: str | None = None, gateway: str | None = None) -> str | None:
    """Why `bridge` (a dom0 bridge) and the static `address` (IPv4 ADDR/PREFIX: the kernel's `ip=` is
    IPv4 only) and `gateway` (in that network) cannot be written into xen.cfg, or None."""
    if not BRIDGE.fullmatch(bridge):
        return f"bridge {bridge[:40]!r} is not an interface name (letters, digits, '_', '.', '-'; at most 15)"
    if address is None:
        return None if gateway is None else "a gateway needs a static address"
    try:
        iface = ipaddress.IPv4Interface(address)
        gw = ipaddress.IPv4Address(gateway) if gateway is not None else None
    except ValueError as e:
        return str(e)
    if (
        "/" not in address
        or iface.network.prefixlen == 32
        or iface.ip in (iface.network.network_address, iface.network.broadcast_address)
    ):
        return f"{address!r} is not a host address with its prefix (ADDR/PREFIX, a prefix below 32)"
    if gw is not None and (gw not in iface.network or gw == iface.ip):
        return f"gateway {gateway} is not another address of {iface.network}"
    return None


@dataclass(frozen=True)
class Network(_Section):
    """The guest's network as the artifact's xen.cfg gives it: one vif on dom0's bridge `bridge`, the guest
    configured by the kernel's `ip=`: DHCP on the bridge's network (`address` None) or the static IPv4
    `address` (ADDR/PREFIX) and `gateway`."""

    NAME: ClassVar[str] = "network"
    bridge: str
    address: str | None = None
    gateway: str | None = None

    def __post_init__(self) -> None:
        if why := network_problem(self.bridge, self.address, self.gateway):
            raise _bad("network", why)

    @property
    def vif(self) -> str:
        """The xl vifspec (xl-network-configuration(5)): the default vif-bridge script, a MAC from xl."""
        return f"bridge={self.bridge}"

    @property
    def ip_word(self) -> str:
        """The kernel's `ip=` word (Documentation/admin-guide/nfs/nfsroot.rst) for this network."""
        if self.address is None:
            return "ip=dhcp"
        iface = ipaddress.IPv4Interface(self.address)
        return f"ip={iface.ip}::{self.gateway or ''}:{iface.netmask}::eth0:off"


@dataclass(frozen=True)
class SbomInfo(_Section):
    """The artifact's SBOM file (builder/sbom.py): its format, size and sha256."""

    NAME: ClassVar[str] = "sbom"
    format: str
    size: int
    sha256: str
    components: int = 0  # packages, language packages, the init and the kernel
    files: int = 0  # the kept files it lists
    file: str = SBOM

    def __post_init__(self) -> None:
        _file_name(self.file, SBOM, "sbom.file")
        for name in ("size", "components", "files"):
            _count(getattr(self, name), f"sbom.{name}")
        if not SHA256_HEX.fullmatch(self.sha256):
            raise _bad("sbom.sha256", "not a hex sha256")


@dataclass(frozen=True)
class Manifest(_Section):
    """manifest.json. `image_config` (the image's runtime config) and `minimize` (the minimize report, read
    by explain) are kept as the JSON objects they are: nothing of them reaches a command line."""

    tool: Tool
    source: Source
    initrd: Initrd
    guest: Guest
    schema: str = SCHEMA
    image_config: dict[str, Any] = field(default_factory=dict)
    source_date_epoch: int | None = None
    minimize: dict[str, Any] | None = None
    disk: DiskInfo | None = None
    kernel: KernelInfo | None = None
    provenance: str | None = None  # PROVENANCE when the build wrote one
    network: Network | None = None  # None: xen.cfg has no vif
    sbom: SbomInfo | None = None

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise ArtifactError(f"{MANIFEST}: not an xbuild artifact manifest (schema {SCHEMA} expected)")
        if self.provenance is not None:
            _file_name(self.provenance, PROVENANCE, "provenance")

    @classmethod
    def parse(cls, raw: bytes, where: str = MANIFEST) -> Manifest:
        """Parse and validate manifest.json bytes; ArtifactError prefixed by `where`."""
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ArtifactError(f"{where}: malformed ({e})") from None
        except RecursionError:
            raise ArtifactError(f"{where}: nested too deeply") from None
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            raise ArtifactError(f"{where}: not an xbuild artifact manifest (schema {SCHEMA} expected)")
        try:
            return cls.from_json(obj)
        except ArtifactError as e:
            raise ArtifactError(f"{where}: {e}") from None
        except RecursionError:
            raise ArtifactError(f"{where}: nested too deeply") from None

    def files(self) -> tuple[str, ...]:
        """The files this manifest says the directory holds (kernel: only when a kernel section says so)."""
        return (
            (MANIFEST, INITRD)
            + ((KERNEL,) if self.kernel else ())
            + ((DISK,) if self.disk else ())
            + ((PROVENANCE,) if self.provenance else ())
            + ((SBOM,) if self.sbom else ())
        )

    def dump(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()


# ---- the directory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """An artifact directory that passed `open_artifact` (or that `build` just wrote)."""

    path: Path
    manifest: Manifest
    cmdline: str = ""  # the validated kernel command line ("" without a cmdline file)

    @property
    def initrd(self) -> Path:
        return self.path / INITRD

    @property
    def kernel(self) -> Path:
        return self.path / KERNEL

    @property
    def has_kernel(self) -> bool:
        return (self.path / KERNEL).is_file()

    def bootable(self) -> Artifact:
        """This artifact, or ArtifactError (exit 2) when it has no kernel to boot (a `--kernel none` build):
        the runners' one check."""
        if not self.has_kernel:
            raise ArtifactError(f"{self.path}: no kernel in the artifact (it was built with --kernel none)")
        return self

    @property
    def disk(self) -> Path | None:
        """The root disk of a `--format disk` artifact; None for an initramfs-only one."""
        return self.path / DISK if self.manifest.disk else None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write `directory`/manifest.json (a directory being written: `atomic_dir` renames it into place); a
    full disk is a NoSpaceError naming manifest.json."""
    with no_space(directory / MANIFEST):
        (directory / MANIFEST).write_bytes(manifest.dump())


def _regular_files(path: Path) -> dict[str, os.stat_result]:
    """name → lstat of every entry; ArtifactError for a name outside NAMES or anything not a regular file."""
    found: dict[str, os.stat_result] = {}
    try:
        entries = list(os.scandir(path))
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact directory ({e.strerror})") from None
    for entry in entries:
        if entry.name not in NAMES:
            raise ArtifactError(
                f"{path}: {entry.name[:80]!r} is not an artifact file "
                f"(an artifact holds only {', '.join(NAMES)})"
            )
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise ArtifactError(f"{path}: {entry.name} is {kind}")
        found[entry.name] = st
    return found


def _read(path: Path, limit: int, *, head: bool = False) -> bytes:
    """At most `limit` bytes of a file opened without following a symlink: the whole file (a larger one is
    an ArtifactError), or with `head` its first `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit if head else limit + 1)
    if len(data) > limit:
        raise ArtifactError(f"{path}: larger than {limit} bytes")
    return data


def open_artifact(path: Path) -> Artifact:
    """Read and validate an artifact directory (see the module docstring); ArtifactError, one line."""
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    files = _regular_files(path)
    if MANIFEST not in files:
        raise ArtifactError(f"{path}: not an xbuild artifact (no {MANIFEST})")
    manifest = Manifest.parse(_read(path / MANIFEST, MANIFEST_LIMIT), str(path / MANIFEST))
    for name in manifest.files():
        if name not in files:
            raise ArtifactError(
                f"{path}: missing {name}" + (" (the manifest names a root disk)" if name == DISK else "")
            )
    sizes = {
        INITRD: manifest.initrd.size,
        KERNEL: manifest.kernel and manifest.kernel.size,
        DISK: manifest.disk and manifest.disk.file_size,
        SBOM: manifest.sbom and manifest.sbom.size,
    }
    for name, size in sizes.items():
        if size is not None and name in files and files[name].st_size != size:
            raise ArtifactError(f"{path}: {name} is {files[name].st_size} bytes, {MANIFEST} records {size}")
    cmdline = ""
    if CMDLINE in files:
        cmdline = cmdline_words(
            _read(path / CMDLINE, CMDLINE_MAX + 1).decode("ascii", "replace"), str(path / CMDLINE)
        )
    if manifest.disk and manifest.disk.format == DiskFormat.QCOW2:
        check_qcow2(path / DISK)
    return Artifact(path, manifest, cmdline)


# ---- qcow2 -----------------------------------------------------------------------------------------------

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_INCOMPAT_KNOWN = 0b1_1011  # dirty, corrupt, compression type, extended L2 (bit 2, data file: refused)
QCOW2_DATA_FILE = 1 << 2


def check_qcow2(path: Path) -> int:
    """Check a qcow2 header (QEMU docs/interop/qcow2.txt) and return the virtual size. ArtifactError for a
    backing file (backing_file_offset or _size non-zero), an external data file (incompatible bit 2), an
    unknown incompatible feature bit, a version other than 2 or 3, or a header that is not qcow2."""
    head = _read(path, 104, head=True)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        raise ArtifactError(f"{path}: not a qcow2 image (bad magic)")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    size = struct.unpack_from(">Q", head, 24)[0]
    if version not in (2, 3):
        raise ArtifactError(f"{path}: qcow2 version {version} (2 or 3 expected)")
    if backing_offset or backing_size:
        raise ArtifactError(f"{path}: a qcow2 image with a backing file: refused (it would open a host file)")
    if version == 3:
        if len(head) < 104:
            raise ArtifactError(f"{path}: truncated qcow2 v3 header")
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        if incompatible & QCOW2_DATA_FILE:
            raise ArtifactError(
                f"{path}: a qcow2 image with an external data file: refused (it would open a host file)"
            )
        if incompatible & ~QCOW2_INCOMPAT_KNOWN:
            raise ArtifactError(f"{path}: qcow2 incompatible features {incompatible:#x} not supported")
    return int(size)


def disk_virtual_size(art: Artifact) -> int:
    """The guest-visible size of the artifact's root disk: the qcow2 header's, or a raw file's length."""
    assert art.disk is not None and art.manifest.disk is not None
    if art.manifest.disk.format == DiskFormat.QCOW2:
        return check_qcow2(art.disk)
    return art.disk.stat().st_size


# ---- -o: what may be replaced ----------------------------------------------------------------------------


def prepare_output(out: Path, force: bool = False, flag: str = "-o") -> None:
    """Decide whether `out` may become an artifact directory; ArtifactError (one line, exit 2) otherwise.

    Allowed: a path that does not exist, an empty directory, an xbuild artifact (a directory holding a
    valid manifest.json and only artifact files: it is replaced atomically), and with `force` any other
    directory. Never: a file or a symlink (not even with `force`), a mount point (it cannot be replaced
    atomically: give a directory inside it), `/`, the home directory, the current directory or one of its
    ancestors. A path that cannot be looked at (EACCES...) is refused too."""
    try:
        _check_output(out, force, f"{flag} {out}")
    except OSError as e:
        raise ArtifactError(f"{flag} {out}: {e.strerror or e}") from None


def _check_output(out: Path, force: bool, where: str) -> None:
    if out.is_symlink():
        raise ArtifactError(f"{where}: is a symlink; give the directory itself")
    real = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(Path.cwd()))
    if real == Path("/") or real == Path(os.path.realpath(Path.home())) or cwd.is_relative_to(real):
        raise ArtifactError(
            f"{where}: refusing to replace {'/' if real == Path('/') else real} "
            "(the root, the home directory, or the current directory or one of its parents)"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{where}: is a file, not an artifact directory; refusing to replace it")
    if os.path.ismount(out):
        raise ArtifactError(
            f"{where}: is a mount point, which cannot be replaced atomically; give a directory inside it"
        )
    names = sorted(p.name for p in out.iterdir())
    if not names or force or _is_artifact(out):
        return
    foreign = [n for n in names if n not in NAMES]
    why = (
        f"it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
        if foreign
        else f"no valid {MANIFEST}"
    )
    raise ArtifactError(
        f"{where}: a directory that is not an xbuild artifact ({why}); refusing to replace "
        "it (--force replaces it anyway)"
    )


def _is_artifact(path: Path) -> bool:
    """A directory holding a valid manifest.json and only artifact files."""
    try:
        files = _regular_files(path)
        return MANIFEST in files and bool(Manifest.parse(_read(path / MANIFEST, MANIFEST_LIMIT)))
    except ArtifactError:
        return False


# ---- the xl config -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XlDisk:
    """One `disk` entry of an xl config."""

    target: str
    format: str = DiskFormat.RAW
    access: str = DiskMode.RW
    vdev: str = "xvda"


def _xl_str(value: str, quote: str = '"') -> str:
    """A quoted xl string: `"` with backslash escapes, or `'` (disk and vif specs) where a quote or a
    backslash is refused; control characters never pass (the artifact's values are validated already)."""
    if not value.isprintable() or (quote == "'" and ("'" in value or "\\" in value)):
        raise ArtifactError(f"cannot write {value[:80]!r} into an xl config")
    if quote == '"':
        value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f"{quote}{value}{quote}"


def xen_config(
    name: str,
    extra: str,
    memory_mb: int,
    vcpus: int = 1,
    xen_type: str = DEFAULT_XEN_TYPE.value,
    *,
    kernel: str = KERNEL,
    ramdisk: str | None = INITRD,
    disks: tuple[XlDisk, ...] = (),
    vif: str | None = None,
    maxmem: bool = False,
    tsc_native: bool = False,
) -> str:
    """The one xl config writer: for the artifact's xen.cfg (kernel, ramdisk and disk paths relative to
    the directory, so `cd DIR && xl create xen.cfg` works wherever it was copied) and for the runners,
    which pass absolute or dom0 paths. Only these keys are ever written; every value is quoted."""
    _one_of(xen_type, XenType, "xen type")
    lines = [f"name = {_xl_str(name)}", f"type = {_xl_str(xen_type)}", f"kernel = {_xl_str(kernel)}"]
    if ramdisk is not None:
        lines.append(f"ramdisk = {_xl_str(ramdisk)}")
    lines += [f"extra = {_xl_str(extra)}", f"memory = {int(memory_mb)}"]
    if maxmem:
        lines.append(f"maxmem = {int(memory_mb)}")
    lines += [
        f"vcpus = {int(vcpus)}",
        'on_poweroff = "destroy"',
        'on_reboot = "destroy"',
        'on_crash = "destroy"',
    ]
    if tsc_native:
        lines.append('tsc_mode = "native"')  # TCG's SVM cannot have Xen emulate RDTSCP
    if disks:
        specs = []
        for d in disks:
            _one_of(d.format, DiskFormat, f"xl disk {d.target[:80]!r} format")
            _one_of(d.access, DiskMode, f"xl disk {d.target[:80]!r} access")
            specs.append(
                _xl_str(f"format={d.format}, vdev={d.vdev}, access={d.access}, target={d.target}", "'")
            )
        lines.append(f"disk = [ {', '.join(specs)} ]")
    if vif is not None:
        lines.append("vif = [ " + _xl_str(vif, "'") + " ]")
    return "\n".join(lines) + "\n"
