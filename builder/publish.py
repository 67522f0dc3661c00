"""Push and pull VM images and kernels as OCI artifacts: the mapping between an artifact directory and one
OCI manifest; the registry's side (manifest fetch and verification, blobs, uploads, mounts) is
`oci.repository`'s.

One artifact is one OCI image manifest with an `artifactType` of our own; its config is the directory's
JSON description (the artifact's `manifest.json`, a kernel's `kernel.json`) and every other file is a
layer with its own media type and an `org.opencontainers.image.title` annotation naming the file:

    VM      artifactType application/vnd.xbuild.vm.v1+json, config application/vnd.xbuild.vm.config.v1+json,
            layers kernel, initrd.img, cmdline, xen.cfg (VM_FILE_TYPES; initrd.v1+zstd|+lz4|+gzip) and,
            in a `--format disk` artifact, disk.img (DISK_TYPES: disk.raw.v1+zstd | disk.qcow2.v1+zstd)
    kernel  artifactType application/vnd.xbuild.kernel.v1+json,
            config application/vnd.xbuild.kernel.config.v1+json, layers vmlinux, bzImage, config...
    init    artifactType application/vnd.xbuild.init.v1+json (the compiled guest init, for `--cache`),
            config application/vnd.xbuild.init.config.v1+json ({key, sha256}), one layer `init`

The manifest is serialised canonically and dated by the build's SOURCE_DATE_EPOCH, so pushing the same
directory twice gives the same digest. A push skips blobs the repository has (HEAD), mounts blobs last seen
in another repository of the same registry, uploads the rest and PUTs the manifest last: a push that fails
half way leaves the tag as it was. A pull verifies every digest, goes through the blob cache and writes the
directory under a temp name renamed into place.

A VM artifact's SBOM and provenance (`sbom.*.json`, `provenance.*.json`: layers like any file) are also
attached to the pushed manifest as OCI referrers (`oci.referrers`), one per document, artifactType by format
(DOCUMENT_TYPES), so registry tools find them by the image's digest; a document of another format stays a
layer only.

The root disk is the one layer that is not the file as is: its blob is the file compressed with zstd (level
DISK_LEVEL, multi-threaded: the output depends on the parameters only, never on the thread count), streamed
into the blob cache, so the same disk always gives the same blob; `compressed/<sha256 of the file>.zstd<L>`
remembers which blob a disk became, so a re-push hashes the disk but does not compress it again. A pull
decompresses the blob into disk.img leaving holes for zero blocks (a raw ext4 image is mostly zeros) and
checks the result against the sha256 in manifest.json's `disk` section.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

from . import __version__
from . import kernel as kernel_cache
from .artifact import (
    CMDLINE,
    DISK,
    INITRD,
    KERNEL,
    MANIFEST,
    NAMES,
    XEN_CFG,
    Artifact,
    DiskInfo,
    Manifest,
    open_artifact,
    prepare_output,
)
from .blobs import CHUNK, HashingReader, HashingWriter, blob_path, check_digest, present, store_blob
from .cache import atomic_dir, atomic_file, cache_dir, file_sha256, lock_shared, remove_entry
from .compression import CorruptData, compressor, reader
from .errors import ArtifactError, CacheError, PublishError, SourceError, XbuildError
from .image import Platform
from .kernel import Kernel
from .oci import referrers
from .oci.manifest import (
    ACCEPT,
    DOCKER_CONFIG,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    manifest_parts,
)
from .oci.repository import Repository
from .options import DiskFormat, Say
from .reference import ImageRef, parse

VM_ARTIFACT = "application/vnd.xbuild.vm.v1+json"
VM_CONFIG = "application/vnd.xbuild.vm.config.v1+json"
VM_FILE_TYPES = {
    KERNEL: "application/vnd.xbuild.vm.kernel.v1",
    INITRD: "application/vnd.xbuild.vm.initrd.v1",  # + "+<compression>" unless uncompressed
    CMDLINE: "application/vnd.xbuild.vm.cmdline.v1",
    XEN_CFG: "application/vnd.xbuild.vm.xen-cfg.v1",
}
VM_OTHER_FILE = "application/vnd.xbuild.vm.file.v1"
DISK_TYPES: dict[str, str] = {  # the root disk's layer by its format: the file compressed with zstd
    DiskFormat.RAW: "application/vnd.xbuild.vm.disk.raw.v1+zstd",
    DiskFormat.QCOW2: "application/vnd.xbuild.vm.disk.qcow2.v1+zstd",
}
DISK_LEVEL = 9  # zstd level of disk layers: 512 MiB of ext4 holding 106 MB of files → 24 MB in ~1 s
HOLE = 4096  # a pulled disk gets a hole for every all-zero block of this size
KERNEL_ARTIFACT = "application/vnd.xbuild.kernel.v1+json"
KERNEL_CONFIG = "application/vnd.xbuild.kernel.config.v1+json"
KERNEL_JSON = "kernel.json"
KERNEL_FILE_TYPES = {
    "vmlinux": "application/vnd.xbuild.kernel.elf.v1",
    "bzImage": "application/vnd.xbuild.kernel.bzimage.v1",
    "config": "application/vnd.xbuild.kernel.kconfig.v1",
    "System.map": "application/vnd.xbuild.kernel.system-map.v1",
    "build.log": "application/vnd.xbuild.kernel.build-log.v1",
}
KERNEL_OTHER_FILE = "application/vnd.xbuild.kernel.file.v1"
DOCUMENT_TYPES = {  # the middle word of sbom.<format>.json / provenance.<format>.json → referrer artifactType
    "cdx": "application/vnd.cyclonedx+json",
    "spdx": "application/spdx+json",
    "intoto": "application/vnd.in-toto+json",
}
INIT_ARTIFACT = "application/vnd.xbuild.init.v1+json"
INIT_CONFIG = "application/vnd.xbuild.init.config.v1+json"
INIT_JSON = "init.json"
INIT_FILE = "init"
INIT_TYPE = "application/vnd.xbuild.init.binary.v1"
INIT_LIMIT = 16 << 20  # a pulled init binary is at most this large (musl: ~60 KB, glibc static: ~700 KB)
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
BASE_DIGEST = "org.opencontainers.image.base.digest"
BASE_NAME = "org.opencontainers.image.base.name"
TOOL_VERSION = "io.xbuild.tool.version"
IMAGE_CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)  # what a container image's config is
STALL = 300.0  # seconds a push or pull waits without a byte (a registry may think long after an upload)


@dataclass(frozen=True)
class _Kind:
    """What an artifact of one kind looks like: its types and the file that is its config."""

    name: str
    artifact_type: str
    config_type: str
    config_file: str


VM = _Kind("VM image", VM_ARTIFACT, VM_CONFIG, MANIFEST)
KERNEL_KIND = _Kind("kernel", KERNEL_ARTIFACT, KERNEL_CONFIG, KERNEL_JSON)
INIT_KIND = _Kind("guest init", INIT_ARTIFACT, INIT_CONFIG, INIT_JSON)
KINDS = (VM, KERNEL_KIND, INIT_KIND)


@dataclass(frozen=True)
class Blob:
    """A file to push: its media type, digest, size and, for layers, its file name (the title)."""

    media_type: str
    digest: str
    size: int
    path: Path
    title: str | None = None
    file_size: int | None = None  # when the blob is the file compressed: the file's size

    @classmethod
    def of(cls, path: Path, media_type: str, title: str | None = None) -> Blob:
        """The file `path` as a blob as it is (its sha256 and size)."""
        return cls(media_type, "sha256:" + file_sha256(path), path.stat().st_size, path, title)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.title:
            d["annotations"] = {TITLE: self.title}
        return d


@dataclass(frozen=True)
class Pushed:
    """The result of a push: `reference` is `registry/repo:tag@digest`; blob counts by what happened."""

    reference: str
    digest: str
    uploaded: int
    present: int
    mounted: int
    uploaded_bytes: int
    disk: dict[str, Any] | None = None  # {file, media_type, file_size, blob_size} when there is a disk
    referrers: dict[str, str] | None = None  # attached documents: file name → referrer manifest digest
    size: int = 0  # of the pushed manifest (or index)
    platforms: dict[str, Pushed] | None = None  # a pushed index: its entries by platform ("linux/arm64")


def target(text: str | ImageRef) -> ImageRef:
    """A registry reference for push/pull: `REF`, `docker://REF` or `oci://REF`; PublishError otherwise."""
    if isinstance(text, ImageRef):
        ref = text
    else:
        ref = parse("docker://" + text.removeprefix("oci://").removeprefix("docker://"))
    if ref.transport != "docker" or not ref.registry or not ref.repository:
        raise PublishError(f"{ref}: push and pull need a registry reference (REGISTRY/REPO:TAG)")
    return ref


def vm_blobs(art: Artifact, log: Say = lambda msg: None) -> tuple[Blob, list[Blob], dict[str, str]]:
    """(config, layers, annotations) of an artifact (opened by open_artifact: only its fixed file names,
    regular files), in a fixed order."""
    directory, m = art.path, art.manifest
    types = dict(VM_FILE_TYPES)
    if m.initrd.compression != "none":
        types[INITRD] += f"+{m.initrd.compression}"
    layers = [
        disk_blob(directory, m.disk, log)
        if name == DISK and m.disk
        else Blob.of(directory / name, types.get(name, VM_OTHER_FILE), name)
        for name in _files(directory, MANIFEST, order=(*VM_FILE_TYPES, DISK))
    ]
    annotations = {
        TOOL_VERSION: m.tool.version or __version__,
        BASE_DIGEST: m.source.manifest_digest,
        BASE_NAME: m.source.reference,
    }
    if m.source_date_epoch is not None:
        created = datetime.fromtimestamp(m.source_date_epoch, UTC)
        annotations[CREATED] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    return Blob.of(directory / MANIFEST, VM_CONFIG), layers, annotations


def disk_blob(
    directory: Path,
    section: DiskInfo,
    log: Say = lambda msg: None,
) -> Blob:
    """The root disk as a layer: its file compressed into the blob cache (once per content), its digest
    checked against the sha256 the manifest records (pull checks what it unpacks against that)."""
    path = directory / DISK
    media_type, want = DISK_TYPES[section.format], section.sha256
    changed = PublishError(
        f"{path}: does not match the sha256 in {MANIFEST} (changed since the build? "
        "`xl create xen.cfg` writes an rw disk in place); rebuild the artifact"
    )
    file_size = path.stat().st_size
    memo = cache_dir("compressed") / f"{want}.zstd{DISK_LEVEL}"
    try:
        digest, known = memo.read_text().split()
        size = int(known)
        if blob_path(digest).stat().st_size != size:
            raise ValueError
    except (OSError, ValueError, SourceError):
        log(f"compressing {path.name} ({file_size / 1e6:.1f} MB) with zstd -{DISK_LEVEL}")
        digest, size = _compress(path, want, changed)
        with atomic_file(memo, "w") as f:
            f.write(f"{digest} {size}\n")
    else:
        if file_sha256(path) != want:
            raise changed
    return Blob(media_type, digest, size, blob_path(digest), path.name, file_size)


def _compress(path: Path, want: str, changed: PublishError) -> tuple[str, int]:
    """Compress `path` with zstd into the blob cache, streamed; (blob digest, blob size). Raises `changed`,
    storing nothing, unless the file's sha256 is `want`."""
    raw, digest = hashlib.sha256(), ""
    # named by its digest, known once written: a flocked temp of the store (a full disk is one line naming
    # the blob being written) renamed to `blob_path(digest)`
    with atomic_file(cache_dir("blobs", "sha256") / f"zstd-of-{want}", place=lambda: blob_path(digest)) as f:
        with open(path, "rb") as src:
            out = HashingWriter(f)
            w = compressor("zstd", out, DISK_LEVEL, checksum=True)
            while chunk := src.read(CHUNK):
                raw.update(chunk)
                w.write(chunk)
            w.close()
        if raw.hexdigest() != want:
            raise changed
        digest = "sha256:" + out.hash.hexdigest()
    return digest, out.count


def push(directory: Path, ref: str | ImageRef, insecure: bool = False, log: Say = lambda msg: None) -> Pushed:
    """Push the artifact directory to `ref` (REGISTRY/REPO:TAG) as one OCI artifact."""
    config, layers, annotations = vm_blobs(open_artifact(directory), log)
    return _push(target(ref), VM, config, layers, annotations, insecure, log)


def push_index(
    directories: list[Path], ref: str | ImageRef, insecure: bool = False, log: Say = lambda msg: None
) -> Pushed:
    """Push artifacts of several platforms as ONE OCI index tagged `ref`: each directory is pushed by digest
    (`push`'s manifest, its SBOM and provenance attached to it as referrers), then the index naming them,
    each entry with the platform its manifest.json records (`source.platform`; a platform twice is refused
    before anything is pushed). The index is canonical JSON, so the same artifacts give the same digest.
    The counts are summed over the platforms; `platforms` holds each one's Pushed."""
    r = target(ref)
    if r.digest:
        raise PublishError(f"{r}: push needs a tag, not a digest")
    parts: list[tuple[str, Blob, list[Blob], dict[str, str]]] = []
    for d in directories:
        art = open_artifact(d)
        config, layers, annotations = vm_blobs(art, log)
        platform = art.manifest.source.platform
        if platform in (p for p, *_ in parts):
            raise PublishError(f"{d}: a second artifact for {platform}")
        parts.append((platform, config, layers, annotations))
    pushed = {p: _push(r, VM, c, ls, a, insecure, log, by_digest=True) for p, c, ls, a in parts}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": VM_ARTIFACT,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "artifactType": VM_ARTIFACT,
                "digest": one.digest,
                "size": one.size,
                "platform": _platform_json(platform),
            }
            for platform, one in pushed.items()
        ],
        "annotations": {TOOL_VERSION: __version__},
    }
    raw = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    with _repository(r, insecure, push=True) as repo:
        repo.put_manifest(str(r.tag), raw, digest, OCI_INDEX)
    log(f"pushed the index of {', '.join(pushed)}")
    total = {k: sum(getattr(one, k) for one in pushed.values()) for k in ("uploaded", "present", "mounted")}
    sent = sum(one.uploaded_bytes for one in pushed.values())
    return Pushed(
        f"{r.docker_name}@{digest}",
        digest,
        total["uploaded"],
        total["present"],
        total["mounted"],
        sent,
        size=len(raw),
        platforms=pushed,
    )


def platform_dirs(directory: Path) -> list[Path]:
    """The artifacts of a build of several platforms' `-o DIR` (its subdirectories holding a manifest.json:
    `linux-amd64/`, `linux-arm64/`), sorted; [] when `directory` is an artifact itself or holds none."""
    if (directory / MANIFEST).exists() or not directory.is_dir():
        return []
    return sorted(d for d in directory.iterdir() if d.is_dir() and (d / MANIFEST).is_file())


def _platform_json(text: str) -> dict[str, str]:
    p = Platform.parse(text)
    return {"os": p.os, "architecture": p.architecture} | ({"variant": p.variant} if p.variant else {})


def pull(
    ref: str | ImageRef,
    dest: Path,
    insecure: bool = False,
    reuse: bool = False,
    force: bool = False,
    platform: Platform | None = None,
) -> Path:
    """Pull the VM artifact `ref` into `dest` (replacing an earlier artifact there: prepare_output decides,
    `force` as for `-o`); return `dest`. `ref` is one VM image, or an index of VM images (not nested) of
    which the entry for `platform` (None: the host's) is taken; either way the artifact must be built for
    that platform (its manifest.json's `source.platform`), so an index entry whose platform lies about its
    image is refused. The manifest is validated (Manifest) before any layer is fetched,
    the directory (open_artifact) before it is renamed into place.
    `reuse`: keep `dest` as it is when it holds this very artifact already (its manifest.json is the
    pushed one byte for byte and every file still hashes to what was pushed: one sha256 pass over the copy),
    so only the manifest and config are fetched: for caches nothing writes to.
    Every cached blob used is checked against its digest as it is read (`_from_cache`)."""
    r = target(ref)
    want = platform or Platform.host()
    prepare_output(dest, force)
    with _repository(r, insecure, push=False) as repo:
        config_raw, meta, layers, _ = _fetch(repo, r, VM, want)
        vm = _vm_manifest(meta, layers, repo.what)
        if not want.matches(_platform_json(vm.source.platform)):
            raise PublishError(f"{repo.what}: the VM image is for {vm.source.platform}, not {want}")
        disk = vm.disk
        if (
            reuse
            and (dest / MANIFEST).is_file()
            and (dest / MANIFEST).read_bytes() == config_raw
            and _intact(dest, layers, disk)
        ):
            return dest
        with atomic_dir(dest) as tmp:
            _materialise(repo, config_raw, layers, tmp, VM, disk)
            open_artifact(tmp)
            prepare_output(dest, force)  # again: the directory may have changed during the download
    return dest


def _intact(directory: Path, layers: list[Blob], disk: DiskInfo | None) -> bool:
    """Whether every file of a pulled copy is still what was pulled: each layer's file hashes to the layer's
    digest (the root disk, pushed compressed, to the sha256 its manifest records). A copy kept in the
    cache is checked each time it is reused, so a flipped bit there is pulled again, never booted."""
    for blob in layers:
        assert blob.title is not None
        want = disk.sha256 if disk and blob.title == disk.file else blob.digest[7:]
        path = directory / blob.title
        if not path.is_file() or path.is_symlink() or file_sha256(path) != want:
            return False
    return True


def push_kernel(
    kernel: Kernel, ref: str | ImageRef, insecure: bool = False, log: Say = lambda msg: None
) -> Pushed:
    """Push a cached kernel (its directory: kernel.json as config, the files as layers)."""
    d = kernel.path.parent
    if not (d / KERNEL_JSON).is_file():
        raise PublishError(f"{d}: not a kernel directory (no {KERNEL_JSON})")
    kernel_cache.cached(d)  # never push a corrupt cache entry (CacheError names it); records an old one
    layers = [
        Blob.of(d / name, KERNEL_FILE_TYPES.get(name, KERNEL_OTHER_FILE), name)
        for name in _files(d, KERNEL_JSON, order=tuple(KERNEL_FILE_TYPES))
    ]
    annotations = {
        TOOL_VERSION: __version__,
        "io.xbuild.kernel.key": kernel.key,
        "io.xbuild.kernel.release": kernel.release,
        "io.xbuild.kernel.fragments": ",".join(kernel.fragments),
    }
    return _push(
        target(ref), KERNEL_KIND, Blob.of(d / KERNEL_JSON, KERNEL_CONFIG), layers, annotations, insecure, log
    )


def pull_kernel(ref: str | ImageRef, insecure: bool = False) -> Path:
    """Pull a kernel artifact into the kernel cache; return its bootable file.

    The entry is `kernels/oci-<hex of the manifest digest>/`, a name no local build uses (those are
    `kernels/<key>/`, key a bare sha256), so a pulled kernel whatever its kernel.json says never stands in
    for a built one; `xbuild kernel list`, `cache verify` and `cache prune` see it as any kernel entry.
    A cached entry is checked (`kernel.cached`) and used, held, when good; a bad one is removed and pulled
    again. Each file is checked against its layer digest as it lands in the entry (`_from_cache`) and
    kernel.json records the sha256 of each."""
    r = target(ref)
    with _repository(r, insecure, push=False) as repo:
        config_raw, meta, layers, digest = _fetch(repo, r, KERNEL_KIND)
        key, name = str(meta.get("key") or ""), Path(str(meta.get("path") or "")).name
        if not key.isalnum() or name not in {b.title for b in layers}:
            raise PublishError(f"{repo.what}: malformed kernel artifact ({KERNEL_JSON} names no key or file)")
        final = cache_dir("kernels") / f"oci-{digest[7:]}"
        try:
            have = kernel_cache.cached(final)
        except CacheError:  # removed: pulled again below
            have = None
        if have is None:
            with atomic_dir(final) as tmp:
                _materialise(repo, config_raw, layers, tmp, KERNEL_KIND)
                # kernel.json is kept as pushed when it records what was pulled
                if meta.get(kernel_cache.RECORD) != {b.title: b.digest[7:] for b in layers}:
                    kernel_cache.write_record(tmp, meta)
            kernel_cache.cached(final)
    return final / name


def push_init(
    data: bytes, key: str, ref: str | ImageRef, insecure: bool = False, log: Say = lambda msg: None
) -> Pushed:
    """Push a compiled guest init (its bytes, its builder/init.py cache key) as an init artifact: `init.json`
    ({key, sha256}) as config, the binary as the one layer `init`. Both are written as blobs of the blob
    cache first (content-addressed, so the same init is stored once)."""
    meta = json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest()}, sort_keys=True).encode()
    config, binary = (_stored(raw) for raw in (meta, data))
    layer = Blob(INIT_TYPE, binary.digest, binary.size, binary.path, INIT_FILE)
    annotations = {TOOL_VERSION: __version__, "io.xbuild.init.key": key}
    return _push(target(ref), INIT_KIND, config, [layer], annotations, insecure, log)


def pull_init(ref: str | ImageRef, insecure: bool = False) -> tuple[str, bytes, str]:
    """(the key its init.json names, the binary, `REF@DIGEST`) of the init artifact `ref`, through the blob
    cache, every digest verified; PublishError for anything but one `init` layer of at most INIT_LIMIT
    bytes."""
    r = target(ref)
    with _repository(r, insecure, push=False) as repo:
        _, meta, layers, digest = _fetch(repo, r, INIT_KIND)
        shape = [(b.title, b.media_type, b.size <= INIT_LIMIT) for b in layers]
        if shape != [(INIT_FILE, INIT_TYPE, True)]:
            raise PublishError(
                f"{repo.what}: malformed init artifact (not one {INIT_FILE!r} layer of at most "
                f"{INIT_LIMIT >> 20} MiB)"
            )
        data = [b""]

        def read(src: IO[bytes]) -> None:  # afresh on each try (_from_cache)
            data[0] = src.read()

        _from_cache(repo, layers[0], read)
    return str(meta.get("key") or ""), data[0], f"{r.docker_name}@{digest}"


def _stored(raw: bytes) -> Blob:
    """`raw` stored in the blob cache (unless there) as a config-typed Blob."""
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    path = blob_path(digest)
    if not present(path):
        store_blob(io.BytesIO(raw), digest, "init")
    return Blob(INIT_CONFIG, digest, len(raw), path)


def exists(ref: str | ImageRef, insecure: bool = False) -> bool:
    """Whether the registry has a manifest tagged `ref` (one HEAD); PublishError or RegistryUnavailable when
    it cannot say."""
    r = target(ref)
    with _repository(r, insecure, push=False) as repo:
        resp = repo.send("HEAD", f"{repo.base}/manifests/{r.tag}", {"Accept": ACCEPT})
        if resp.status_code not in (200, 404):
            raise repo.failure(resp, "manifest")
        return resp.status_code == 200


def _files(directory: Path, config_file: str, order: tuple[str, ...]) -> list[str]:
    """The files to publish besides the config (dot files skipped): names in `order` first, then sorted."""
    names = []
    for p in directory.iterdir():
        if p.name == config_file or p.name.startswith("."):
            continue
        if not p.is_file():
            raise PublishError(f"{p}: only regular files can be published (not a directory or special file)")
        names.append(p.name)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def _push(
    ref: ImageRef,
    kind: _Kind,
    config: Blob,
    layers: list[Blob],
    annotations: dict[str, str],
    insecure: bool,
    log: Say,
    by_digest: bool = False,
) -> Pushed:
    """Push one manifest of `kind` to `ref`'s repository as `ref`'s tag, or `by_digest` only (for an index
    to name)."""
    if ref.digest:
        raise PublishError(f"{ref}: push needs a tag, not a digest")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": kind.artifact_type,
        "config": config.descriptor(),
        "layers": [b.descriptor() for b in layers],
        "annotations": annotations,
    }
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    counts = {"uploaded": 0, "present": 0, "mounted": 0}
    sent = 0
    with _repository(ref, insecure, push=True) as repo:
        for blob in [config, *layers]:
            name = blob.title or kind.config_file
            how = repo.ensure_blob(blob.digest, blob.size, blob.path, name)
            counts[how] += 1
            sent += blob.size if how == "uploaded" else 0
            of = f", zstd of {blob.file_size / 1e6:.1f} MB" if blob.file_size is not None else ""
            log(f"{how} {name} ({blob.size / 1e6:.1f} MB{of})")
        repo.put_manifest(digest if by_digest else str(ref.tag), raw, digest)
        attached = _attach_documents(repo, referrers.Subject(OCI_MANIFEST, digest, len(raw)), layers, log)
    disk = next(
        (
            {"file": b.title, "media_type": b.media_type, "file_size": b.file_size, "blob_size": b.size}
            for b in layers
            if b.file_size is not None
        ),
        None,
    )
    return Pushed(
        f"{ref.docker_name}@{digest}",
        digest,
        counts["uploaded"],
        counts["present"],
        counts["mounted"],
        sent,
        disk,
        attached or None,
        len(raw),
    )


def document_type(name: str) -> str | None:
    """The referrer artifactType of an artifact file that is an SBOM or provenance document, else None."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] in ("sbom", "provenance") and parts[2] == "json":
        return DOCUMENT_TYPES.get(parts[1])
    return None


def _attach_documents(
    repo: Repository, subject: referrers.Subject, layers: list[Blob], log: Say
) -> dict[str, str]:
    """Attach each SBOM/provenance layer of a pushed artifact to it as a referrer; {file: referrer digest}."""
    attached = {}
    for blob in layers:
        kind = document_type(blob.title or "")
        if kind is None or blob.title is None:
            continue
        done = referrers.attach(repo, subject, kind, blob.path, kind, blob.title)
        attached[blob.title] = done.digest
        log(f"attached {blob.title} as a referrer ({kind}, {done.how})")
    return attached


def _fetch(
    repo: Repository, ref: ImageRef, kind: _Kind, platform: Platform | None = None
) -> tuple[bytes, dict[str, Any], list[Blob], str]:
    """(config bytes, config, layers, manifest digest) of the artifact `ref` names (with `platform`: or the
    entry for it of the index `ref` names, an index of manifests only), checked to be of `kind`;
    the manifest and config are read through the blob cache, verified (`Repository.manifest`, `.config`);
    layers are fetched as they are used (`_from_cache`)."""
    manifest = repo.manifest(ref, platform, depth=2)
    doc, what = manifest.doc, repo.what
    config: dict[str, Any] = doc["config"] if isinstance(doc.get("config"), dict) else {}
    atype, ctype = doc.get("artifactType"), config.get("mediaType")
    if atype != kind.artifact_type or ctype != kind.config_type:
        other = next((k.name for k in KINDS if (atype, ctype) == (k.artifact_type, k.config_type)), None)
        if other:
            found = f"an xbuild {other}"
        elif atype is None and ctype in IMAGE_CONFIGS:
            found = "a container image"
        else:
            found = f"artifactType {atype!r}, config {ctype!r}"
        raise PublishError(f"{what}: not an xbuild {kind.name} artifact (it is {found})")
    with repo.own_errors():
        cfg, descriptors = manifest_parts(doc, what)
    layers = [_layer(d, what) for d in descriptors]
    titles = [b.title for b in layers]
    if len(set(titles)) != len(titles) or kind.config_file in titles:
        raise PublishError(f"{what}: malformed artifact (duplicate file names)")
    config_raw = repo.config(cfg, kind.config_file)
    try:
        meta = json.loads(config_raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise PublishError(f"{what}: malformed artifact ({kind.config_file} is not a JSON object)")
    return config_raw, meta, layers, manifest.digest


def _layer(d: Descriptor, what: str) -> Blob:
    """A layer's descriptor as a Blob (path: where it lands in the blob cache), with a safe file name."""
    try:
        check_digest(d.digest, what)
    except SourceError as e:
        raise PublishError(str(e)) from None
    title = str(d.annotations.get(TITLE) or "")
    if not title or "/" in title or "\0" in title or title.startswith("."):
        raise PublishError(
            f"{what}: malformed artifact (layer {d.digest[:19]} has no usable file name {title!r})"
        )
    return Blob(d.media_type, d.digest, d.size, blob_path(d.digest), title)


def _vm_manifest(meta: dict[str, Any], layers: list[Blob], what: str) -> Manifest:
    """The pulled manifest.json validated (Manifest) and checked against the layers, before any layer is
    fetched: every layer is one of the artifact's file names; the disk section's file has a layer of a type
    we unpack (DISK_TYPES, or the file as is), and a disk layer has a disk section."""
    try:
        manifest = Manifest.from_json(meta)
    except ArtifactError as e:
        raise ArtifactError(f"{what}: {MANIFEST}: {e}") from None
    odd = next((b.title for b in layers if b.title not in NAMES), None)
    if odd is not None:
        raise ArtifactError(f"{what}: malformed artifact (layer {odd[:80]!r} is not an artifact file)")
    section = manifest.disk
    if section is None:
        if any(b.media_type in DISK_TYPES.values() for b in layers):
            raise PublishError(f"{what}: malformed artifact (a disk layer but no disk section in {MANIFEST})")
        return manifest
    blob = next((b for b in layers if b.title == DISK), None)
    if blob is None:
        raise PublishError(
            f"{what}: malformed artifact ({MANIFEST} names the disk {DISK!r}, no layer holds it)"
        )
    if blob.media_type not in (DISK_TYPES[section.format], VM_OTHER_FILE):
        raise PublishError(
            f"{what}: {DISK}: unsupported layer type {blob.media_type!r} for a "
            f"{section.format!r} disk (pushed by a newer xbuild?)"
        )
    return manifest


def _materialise(
    repo: Repository,
    config_raw: bytes,
    layers: list[Blob],
    out: Path,
    kind: _Kind,
    disk: DiskInfo | None = None,
) -> None:
    """Write the config and the layers, through the blob cache (`_from_cache`), into the directory `out`
    (the root disk `disk` describes decompressed and checked)."""
    (out / kind.config_file).write_bytes(config_raw)
    for blob in layers:
        assert blob.title is not None
        if disk and blob.title == DISK:
            _from_cache(
                repo,
                blob,
                partial(_unpack_disk, blob=blob, dest=out / blob.title, section=disk, what=repo.what),
            )
        else:
            _from_cache(repo, blob, partial(_copy, dest=out / blob.title))


def _from_cache(repo: Repository, blob: Blob, use: Callable[[IO[bytes]], None]) -> None:
    """Feed the blob `blob`, from the blob cache (downloaded first when missing), to `use`, hashing it as it
    is read. A cached blob that does not hash to its digest is removed and fetched once more, and `use` runs
    again (it must start its output afresh); bad again, or that fetch fails: CacheError naming the file.
    An error `use` raises while the blob is intact is the artifact's (PublishError), passed on."""
    healing = False
    while True:
        if not present(blob.path):
            try:
                _download(repo, blob)
            except XbuildError as e:
                if healing:
                    raise CacheError(
                        f"{blob.path}: corrupt cache entry (removed); fetching it again failed: {e}"
                    ) from None
                raise
        with open(blob.path, "rb") as f:
            lock_shared(f.fileno())  # `xbuild cache prune` leaves it alone while it is read
            src = HashingReader(f, blob.digest, str(blob.path), blob.size)
            failure: PublishError | None = None
            try:
                use(src)  # type: ignore[arg-type]  # a readable stream: what use() reads
            except PublishError as e:
                failure = e
            while src.read(CHUNK):  # the rest (trailing bytes after a compressed stream) counts too
                pass
            try:
                src.check()
            except SourceError:
                pass
            else:
                if failure is not None:
                    raise failure
                return
        remove_entry(blob.path)
        if healing:
            raise CacheError(f"{blob.path}: corrupt again right after it was fetched")
        healing = True


def _copy(src: IO[bytes], dest: Path) -> None:
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


_ZERO_CHUNK, _ZERO_BLOCK = bytes(CHUNK), bytes(HOLE)


def _unpack_disk(raw: IO[bytes], blob: Blob, dest: Path, section: DiskInfo, what: str) -> None:
    """Write the disk layer `blob`, read from `raw`, to `dest`, decompressed (unless it was pushed as is),
    with a hole for every all-zero block; streamed, no larger than the `file_size` recorded; its sha256 must
    be the section's (PublishError otherwise)."""
    name, want, limit = dest.name, section.sha256, section.file_size
    h, size = hashlib.sha256(), 0
    try:
        with open(dest, "wb") as out:
            src = reader("none" if blob.media_type == VM_OTHER_FILE else "zstd", raw)
            while chunk := src.read(CHUNK):
                h.update(chunk)
                _write_sparse(out.fileno(), chunk, size)
                size += len(chunk)
                if size > limit:
                    raise PublishError(f"{what}: {name} is larger than the {limit} bytes {MANIFEST} records")
            os.ftruncate(out.fileno(), size)
    except CorruptData as e:
        raise PublishError(f"{what}: {name}: corrupt zstd data ({e})") from None
    if h.hexdigest() != want:
        raise PublishError(
            f"{what}: {name} does not match the sha256 in {MANIFEST} (expected {want}, got {h.hexdigest()})"
        )


def _write_sparse(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at `offset` of the file `fd`, skipping its all-zero HOLE-sized blocks (holes)."""
    n = len(data)
    if data == (_ZERO_CHUNK if n == CHUNK else bytes(n)):
        return
    view, start = memoryview(data), 0
    for i in range(0, n, HOLE):
        if data[i : i + HOLE] == (_ZERO_BLOCK if i + HOLE <= n else bytes(n - i)):
            if start < i:
                _pwrite(fd, view[start:i], offset + start)
            start = i + HOLE
    if start < n:
        _pwrite(fd, view[start:], offset + start)


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _repository(ref: ImageRef, insecure: bool, push: bool) -> Repository:
    """The registry repository `ref` names (a context manager), its failures PublishErrors."""
    repo = str(ref.repository)
    return Repository(
        str(ref.registry),
        repo,
        what=str(ref.docker_name),
        insecure=insecure,
        scopes={repo: "pull,push" if push else "pull"},
        error=PublishError,
        stall=STALL,
        check_hint="check {config} (docker login)",
    )


def _download(repo: Repository, blob: Blob) -> None:
    """Download `blob` into the blob cache (verified) and remember where it was seen, unless it is in the
    cache (unchecked here: `_from_cache` checks it as it reads it)."""
    if present(blob.path):
        return
    repo.blob(Descriptor(blob.media_type, blob.digest, blob.size), blob.title or "config")
    repo.remember(blob.digest)
