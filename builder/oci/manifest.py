"""The OCI wire format: media types, descriptors and the image index, manifest and config documents,
parsed strictly (a malformed document is a SourceError naming it), and `resolve`, the one walk from a
manifest or index to the image manifest for a platform that every source of documents uses (a registry
repository, an OCI layout). Limits on what is read are here too: MANIFEST_LIMIT, CONFIG_LIMIT.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import SourceError
from ..image import Healthcheck, Image, ImageConfig, Layer, Platform
from ..reference import ImageRef

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
INDEX_ENTRIES = 256  # an index with more is refused (Docker Hub's largest official images list ~20)
MANIFEST_LIMIT = 4 << 20  # largest manifest or index read (distribution's own limit for a manifest PUT)
CONFIG_LIMIT = 4 << 20  # largest config read (an image's, an artifact's): real ones are a few KiB

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest or index says about one blob (annotations as found: objects)."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = field(default=None, compare=False)
    annotations: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ImageManifest:
    """An image manifest (not an index) as fetched: its bytes, verified to be `digest`, and the parsed
    document, of one of MANIFEST_TYPES."""

    raw: bytes = field(repr=False)
    doc: dict[str, Any] = field(repr=False)
    digest: str


def parse_json(raw: bytes, what: str) -> Any:
    """Parse a JSON document or raise SourceError naming `what`."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:  # json's documented answer to deeply nested input
        raise SourceError(f"{what}: JSON nested too deeply") from None


def load_json(raw: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object or raise SourceError naming `what`."""
    doc = parse_json(raw, what)
    if not isinstance(doc, dict):
        raise SourceError(f"{what}: expected a JSON object")
    return doc


def media_type_of(doc: dict[str, Any], fallback: str | None = None) -> str:
    """The document's mediaType, or guessed from its shape (OCI allows omitting it)."""
    mt = doc.get("mediaType") or fallback
    if mt:
        return str(mt)
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def descriptor(d: Any, what: str) -> Descriptor:
    """A content descriptor: digest (string), size (integer), optional mediaType, platform and annotations
    (objects)."""
    if (
        not isinstance(d, dict)
        or not isinstance(d.get("digest"), str)
        or not isinstance(d.get("size"), int)
        or not all(isinstance(d.get(key) or {}, dict) for key in ("platform", "annotations"))
    ):
        raise SourceError(f"{what}: malformed descriptor {str(d)[:200]}")
    return Descriptor(
        str(d.get("mediaType", "")),
        d["digest"],
        d["size"],
        d.get("platform"),
        dict(d.get("annotations") or {}),
    )


def select_platform(index: dict[str, Any], platform: Platform, what: str) -> Descriptor:
    """Pick the manifest for `platform` from an OCI index / Docker manifest list (at most INDEX_ENTRIES)."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise SourceError(f"{what}: index lists no manifests")
    if len(manifests) > INDEX_ENTRIES:
        raise SourceError(f"{what}: index lists {len(manifests)} manifests (more than {INDEX_ENTRIES})")
    seen = []
    for m in manifests:
        d = descriptor(m, what)
        p = d.platform or {}
        if p:
            variant = f"/{p['variant']}" if p.get("variant") else ""
            seen.append(f"{p.get('os')}/{p.get('architecture')}{variant}")
        if platform.matches(p) and d.media_type not in ("application/vnd.in-toto+json",):
            return d
    raise SourceError(f"{what}: no manifest for platform {platform} (has: {', '.join(seen) or 'none'})")


def resolve(
    raw: bytes,
    digest: str,
    read: Callable[[str], bytes],
    platform: Platform | None,
    what: str,
    media_type: str | None = None,
    depth: int = 4,
) -> ImageManifest:
    """The image manifest for `platform` from the manifest or index `raw` (already verified to be `digest`;
    `media_type` is what its descriptor says, if anything): an index is followed to its entry for `platform`
    (`read(digest)` gives a manifest's bytes, verified), `depth` documents in all (4: indexes nested 3 deep;
    2: an index of manifests only); with `platform` None an index is refused like any other type that is
    not an image manifest. Schema 1 manifests are refused."""
    for _ in range(depth):  # index -> (nested index ->) manifest
        doc = load_json(raw, f"{what} manifest {digest[:19]}")
        if doc.get("schemaVersion") == 1 or doc.get("mediaType") in SCHEMA1_TYPES:
            raise SourceError(
                f"{what}: schema 1 manifests are not supported "
                "(re-push the image with a current docker, buildah or skopeo)"
            )
        mt = media_type_of(doc, media_type)
        if mt in INDEX_TYPES and platform is not None:
            desc = select_platform(doc, platform, what)
            raw, digest, media_type = read(desc.digest), desc.digest, desc.media_type or None
            continue
        if mt not in MANIFEST_TYPES:
            raise SourceError(f"{what}: unsupported manifest media type {mt!r}")
        return ImageManifest(raw, doc, digest)
    raise SourceError(f"{what}: index nesting too deep")


def manifest_parts(doc: dict[str, Any], what: str) -> tuple[Descriptor, list[Descriptor]]:
    """(config descriptor, layer descriptors) of an image manifest."""
    if doc.get("schemaVersion") != 2:
        raise SourceError(f"{what}: unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    cfg = descriptor(doc.get("config"), f"{what} config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SourceError(f"{what}: manifest has no layers list")
    return cfg, [descriptor(x, f"{what} layer") for x in layers]


def parse_config(raw: bytes, what: str) -> tuple[ImageConfig, list[str], str | None, Platform]:
    """(runtime config, diff_ids, created, platform) from an image config blob."""
    doc = load_json(raw, what)
    c = doc.get("config") or {}
    rootfs = doc.get("rootfs")
    if not (isinstance(c, dict) and isinstance(rootfs, dict) and isinstance(rootfs.get("diff_ids"), list)):
        raise SourceError(f"{what}: malformed image config (needs config object and rootfs.diff_ids)")

    def strings(key: str) -> tuple[str, ...]:
        v = c.get(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise SourceError(f"{what}: config.{key} must be a list of strings")
        return tuple(v)

    def string(key: str) -> str:
        v = c.get(key) or ""
        if not isinstance(v, str):
            raise SourceError(f"{what}: config.{key} must be a string")
        return v

    labels = c.get("Labels") or {}
    ports = c.get("ExposedPorts") or {}
    if not isinstance(labels, dict) or not isinstance(ports, dict):
        raise SourceError(f"{what}: config.Labels and config.ExposedPorts must be objects")
    cfg = ImageConfig(
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        env=strings("Env"),
        working_dir=string("WorkingDir"),
        user=string("User"),
        stop_signal=string("StopSignal"),
        exposed_ports=tuple(sorted(ports)),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        healthcheck=_healthcheck(c.get("Healthcheck"), what),
        shell=strings("Shell"),
    )
    plat = Platform(
        str(doc.get("os") or "linux"), str(doc.get("architecture") or "amd64"), doc.get("variant")
    )
    created = doc.get("created") if isinstance(doc.get("created"), str) else None
    return cfg, [str(d) for d in rootfs["diff_ids"]], created, plat


def _healthcheck(h: Any, what: str) -> Healthcheck | None:
    """config.Healthcheck: null/absent, or an object of Test (strings) and integer durations/retries."""
    if h is None:
        return None
    if not isinstance(h, dict):
        raise SourceError(f"{what}: config.Healthcheck must be an object")
    test = h.get("Test") or []
    if not isinstance(test, list) or not all(isinstance(w, str) for w in test):
        raise SourceError(f"{what}: config.Healthcheck.Test must be a list of strings")
    nums = {}
    for key in ("Interval", "Timeout", "StartPeriod", "StartInterval", "Retries"):
        v = h.get(key) or 0
        if not isinstance(v, int) or isinstance(v, bool):
            raise SourceError(f"{what}: config.Healthcheck.{key} must be an integer")
        nums[key] = v
    try:
        return Healthcheck(
            tuple(test),
            nums["Interval"],
            nums["Timeout"],
            nums["StartPeriod"],
            nums["StartInterval"],
            nums["Retries"],
        )
    except SourceError as e:
        raise SourceError(f"{what}: config.{e}") from None


def build_image(
    ref: ImageRef,
    manifest_digest: str,
    manifest: dict[str, Any],
    config_raw: bytes,
    opener: Callable[[Descriptor], Callable[[], IO[bytes]]],
    what: str,
    platform: Platform | None = None,
) -> Image:
    """Assemble an Image from a parsed manifest and its config; `opener(desc)` opens a blob."""
    cfg_desc, layer_descs = manifest_parts(manifest, what)
    config, diff_ids, created, plat = parse_config(config_raw, f"{what} config {cfg_desc.digest[:19]}")
    if platform and not platform.matches(
        {"os": plat.os, "architecture": plat.architecture, "variant": plat.variant}
    ):
        raise SourceError(f"{what}: image is for {plat}, not {platform}")
    if not layer_descs:
        raise SourceError(f"{what}: empty image (no layers)")
    if len(diff_ids) != len(layer_descs):
        raise SourceError(f"{what}: config has {len(diff_ids)} diff_ids for {len(layer_descs)} layers")
    layers = []
    for d, diff_id in zip(layer_descs, diff_ids, strict=True):
        comp = LAYER_TYPES.get(d.media_type)
        if comp is None:
            raise SourceError(f"{what}: unsupported layer media type {d.media_type!r}")
        layers.append(Layer(d.digest, d.size, d.media_type, comp, diff_id, opener(d)))
    return Image(ref, manifest_digest, plat, config, cfg_desc.digest, config_raw, created, tuple(layers))
