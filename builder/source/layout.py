"""Local image sources: OCI image layouts (`oci:DIR[:REF]`), OCI archives (`oci-archive:FILE[:REF]`)
and `docker save` archives (`docker-archive:FILE[:REF]`).

Archives are read in place: a blob is a byte range of the (uncompressed) tar, never extracted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .. import tarread
from ..blobs import check_digest, verify_bytes
from ..cache import format_size
from ..compression import LAYER_CODECS, sniff
from ..errors import SourceError
from ..image import Image, Platform
from ..oci.manifest import (
    CONFIG_LIMIT,
    DOCKER_MANIFEST,
    MANIFEST_LIMIT,
    Descriptor,
    build_image,
    descriptor,
    load_json,
    parse_json,
    resolve,
)
from ..reference import ImageRef
from ..tarread import TarFormatError, read_members
from ..tree import ByteRange, split

REF_ANNOTATION = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class _Files:
    """Named files of a directory or of an uncompressed tar, opened as streams."""

    root: Path
    members: dict[str, tuple[int, int]] | None  # tar: name -> (offset, size)

    @classmethod
    def of(cls, ref: ImageRef) -> _Files:
        path = Path(ref.path or "")
        if ref.transport == "oci":
            if not (path / "oci-layout").is_file():
                raise SourceError(f"{ref}: {path} is not an OCI image layout (no oci-layout file)")
            return cls(path, None)
        if not path.is_file():
            raise SourceError(f"{ref}: no such archive {path}")
        try:
            with open(path, "rb") as f:
                members = {
                    "/".join(split(m.name)): (m.offset, m.size)
                    for m in read_members(f, os.fstat(f.fileno()).st_size)
                    if m.type == tarread.REG
                }
        except TarFormatError as e:
            raise SourceError(f"{ref}: not an uncompressed tar archive we can read ({e})") from None
        return cls(path, members)

    def _path(self, name: str) -> Path:
        """The file `name` of a layout directory; a symlink may lead elsewhere inside the layout only."""
        p = self.root / name
        real, root = os.path.realpath(p), os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            raise SourceError(f"{self.root}: {name} leads outside the layout (to {real})")
        return p

    def exists(self, name: str) -> bool:
        return self._path(name).is_file() if self.members is None else name in self.members

    def opener(self, name: str) -> Callable[[], IO[bytes]]:
        if self.members is None:
            p = self._path(name)
            return lambda: open(p, "rb")
        off, size = self.members[name]
        return lambda: io.BufferedReader(ByteRange(str(self.root), off, size), 1 << 20)

    def read(self, name: str, what: str, limit: int) -> bytes:
        """The file `name`, refused past `limit` bytes (MANIFEST_LIMIT, CONFIG_LIMIT)."""
        if not self.exists(name):
            raise SourceError(f"{what}: missing {name}")
        with self.opener(name)() as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise SourceError(f"{what}: {name} is larger than {format_size(limit)}")
        return data


def load(ref: ImageRef, platform: Platform) -> Image:
    """Open a local layout or archive and return the Image it holds."""
    files = _Files.of(ref)
    if ref.transport == "docker-archive":
        return _docker_archive(ref, files, platform)
    return _oci(ref, files, platform)


def _blob_name(digest: str, what: str) -> str:
    return f"blobs/sha256/{check_digest(digest, what)}"


def _oci(ref: ImageRef, files: _Files, platform: Platform) -> Image:
    what = str(ref)
    index = load_json(files.read("index.json", what, MANIFEST_LIMIT), f"{what} index.json")
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise SourceError(f"{what}: index.json lists no images")
    for i, m in enumerate(manifests):
        if not isinstance(m, dict):
            raise SourceError(f"{what}: index.json: manifests[{i}] is not an object")
        if not isinstance(m.get("annotations") or {}, dict) or not isinstance(m.get("platform") or {}, dict):
            raise SourceError(f"{what}: index.json: manifests[{i}]: annotations and platform must be objects")
    if ref.name:
        chosen = [m for m in manifests if (m.get("annotations") or {}).get(REF_ANNOTATION) == ref.name]
        if not chosen:
            names = sorted({str((m.get("annotations") or {}).get(REF_ANNOTATION, "?")) for m in manifests})
            raise SourceError(f"{what}: no image tagged {ref.name!r} (has: {', '.join(names)})")
        # one tag on one manifest per platform (as `docker buildx --output type=oci` writes): the platform's
        chosen = [m for m in chosen if platform.matches(m.get("platform") or {})] or chosen
    elif len(manifests) == 1:
        chosen = manifests
    else:
        chosen = [m for m in manifests if platform.matches(m.get("platform") or {})] or manifests
        if len(chosen) > 1:
            raise SourceError(f"{what}: holds {len(manifests)} images; name one as {ref.transport}:PATH:REF")
    desc = descriptor(chosen[0], what)
    return _resolve(ref, files, desc, platform, what)


def _resolve(ref: ImageRef, files: _Files, desc: Descriptor, platform: Platform, what: str) -> Image:
    def read(digest: str) -> bytes:
        raw = files.read(_blob_name(digest, what), what, MANIFEST_LIMIT)
        return verify_bytes(raw, digest, f"{what} manifest")

    manifest = resolve(read(desc.digest), desc.digest, read, platform, what, desc.media_type or None)
    cfg = descriptor(manifest.doc.get("config"), f"{what} config")
    config_raw = verify_bytes(
        files.read(_blob_name(cfg.digest, what), what, CONFIG_LIMIT), cfg.digest, f"{what} config"
    )

    def opener(d: Descriptor) -> Callable[[], IO[bytes]]:
        name = _blob_name(d.digest, what)
        if not files.exists(name):
            raise SourceError(f"{what}: missing layer blob {d.digest}")
        return files.opener(name)

    return build_image(ref, manifest.digest, manifest.doc, config_raw, opener, what, platform)


def _docker_archive(ref: ImageRef, files: _Files, platform: Platform) -> Image:
    """`docker save` format: manifest.json names the config file and layer tars of each image."""
    what = str(ref)
    entries = parse_json(files.read("manifest.json", what, MANIFEST_LIMIT), f"{what} manifest.json")
    if not isinstance(entries, list) or not entries:
        raise SourceError(f"{what}: manifest.json lists no images")
    for i, e in enumerate(entries):
        lists = [e.get(k) or [] for k in ("Layers", "RepoTags")] if isinstance(e, dict) else [None]
        if not (
            isinstance(e, dict)
            and isinstance(e.get("Config"), str)
            and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists)
        ):
            raise SourceError(
                f"{what}: manifest.json: entry {i} is not an object with a Config string, "
                "Layers and RepoTags lists of strings"
            )
    if ref.name:
        want = {ref.name, f"{ref.name}:latest", f"docker.io/library/{ref.name}"}
        entries = [e for e in entries if want & set(e.get("RepoTags") or [])]
        if not entries:
            raise SourceError(f"{what}: no image tagged {ref.name!r}")
    elif len(entries) > 1:
        raise SourceError(f"{what}: holds {len(entries)} images; name one as docker-archive:PATH:REPO:TAG")
    entry = entries[0]
    config_raw = files.read(entry["Config"], what, CONFIG_LIMIT)
    config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
    doc = load_json(config_raw, f"{what} config")
    diff_ids = (doc.get("rootfs") or {}).get("diff_ids") or []
    layer_files = entry.get("Layers") or []
    layers = []
    if len(diff_ids) != len(layer_files):
        raise SourceError(f"{what}: config has {len(diff_ids)} diff_ids for {len(layer_files)} layers")
    for name, diff_id in zip(layer_files, diff_ids, strict=True):
        if not files.exists(name):
            raise SourceError(f"{what}: missing layer {name}")
        with files.opener(name)() as f:
            head = f.read(4)
        codec = sniff(head, LAYER_CODECS)
        mt = "application/vnd.oci.image.layer.v1.tar" + ("" if codec == "none" else f"+{codec}")
        # an uncompressed layer's digest is its diff_id, which flatten verifies anyway
        digest = diff_id if codec == "none" else _file_digest(files, name)
        off_size = files.members[name] if files.members else (0, 0)
        layers.append({"mediaType": mt, "digest": digest, "size": off_size[1], "name": name})
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config_digest,
            "size": len(config_raw),
        },
        "layers": [{k: v for k, v in x.items() if k != "name"} for x in layers],
    }
    by_digest = {x["digest"]: x["name"] for x in layers}
    manifest_digest = "sha256:" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return build_image(
        ref,
        manifest_digest,
        manifest,
        config_raw,
        lambda d: files.opener(by_digest[d.digest]),
        what,
        platform,
    )


def _file_digest(files: _Files, name: str) -> str:
    h = hashlib.sha256()
    with files.opener(name)() as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
