"""The image model every source produces: manifest, config and layers, parsed and checked.

Sources (registry, OCI layout/archive, docker-archive, daemon) differ only in how they find the
manifest and open blobs; they all end in `Image`. Parsing is strict: a malformed document is a
SourceError naming the document.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import SourceError
from .reference import ImageRef

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
MANIFEST_LIMIT = 4 << 20    # largest manifest or index read (distribution's own limit for a manifest PUT)
CONFIG_LIMIT = 4 << 20      # largest config read (an image's, an artifact's): real ones are a few KiB

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
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise SourceError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def matches(self, other: dict[str, Any]) -> bool:
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        return self.variant is None or other.get("variant") in (None, self.variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = field(default=None, compare=False)


NS_MAX = (1 << 63) - 1       # Go's time.Duration (int64 nanoseconds): the largest Docker can store
MAX_ARG_STRLEN = 128 << 10   # Linux refuses an execve word longer than this (E2BIG)
HEALTH_KINDS = ("NONE", "CMD", "CMD-SHELL")


@dataclass(frozen=True)
class Healthcheck:
    """The image config's Healthcheck (Docker's HealthConfig), checked as `docker create` checks it.

    `test`: () = none given (inherit), ("NONE",) = disabled, ("CMD", prog, args…), ("CMD-SHELL", command…).
    Durations are nanoseconds, `retries` a count; 0 means "Docker's default" (30 s interval, 30 s timeout,
    0 start period, 5 s start interval, 3 retries). A duration must be 0 or at least 1 ms and fit Go's
    int64; a probe word longer than Linux's MAX_ARG_STRLEN could never be executed: SourceError for all.
    """

    test: tuple[str, ...] = ()
    interval_ns: int = 0
    timeout_ns: int = 0
    start_period_ns: int = 0
    start_interval_ns: int = 0
    retries: int = 0

    def __post_init__(self) -> None:
        if self.test:
            if self.test[0] not in HEALTH_KINDS:
                raise SourceError(f"Healthcheck.Test[0] {self.test[0][:40]!r} is not one of "
                                  f"{', '.join(HEALTH_KINDS)}")
            if self.test[0] != "NONE" and (len(self.test) < 2 or not self.test[1]):
                raise SourceError(f"Healthcheck.Test: {self.test[0]} without a command")
            longest = max(len(w.encode("utf-8", "surrogateescape")) for w in self.test)
            if longest > MAX_ARG_STRLEN:
                raise SourceError(f"Healthcheck.Test: a word of {longest} bytes (Linux executes words of "
                                  f"at most {MAX_ARG_STRLEN})")
        for name in ("interval_ns", "timeout_ns", "start_period_ns", "start_interval_ns"):
            v = getattr(self, name)
            label = "".join(w.capitalize() for w in name[:-3].split("_"))
            if not 0 <= v <= NS_MAX:
                raise SourceError(f"Healthcheck.{label} {v} is outside 0..{NS_MAX} ns")
            if 0 < v < 1_000_000:
                raise SourceError(f"Healthcheck.{label} {v} ns: Docker refuses less than 1ms (0 = default)")
        if not 0 <= self.retries <= NS_MAX:
            raise SourceError(f"Healthcheck.Retries {self.retries} is outside 0..{NS_MAX}")

    @property
    def disabled(self) -> bool:
        return self.test[:1] == ("NONE",)

    def merged(self, base: Healthcheck | None) -> Healthcheck:
        """Docker's merge of a container's Healthcheck over the image's: every empty/0 field is `base`'s."""
        if base is None:
            return self
        return Healthcheck(self.test or base.test, self.interval_ns or base.interval_ns,
                           self.timeout_ns or base.timeout_ns, self.start_period_ns or base.start_period_ns,
                           self.start_interval_ns or base.start_interval_ns, self.retries or base.retries)


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of the image config (OCI image-spec `config` object; Healthcheck and Shell are
    Docker's additions)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    healthcheck: Healthcheck | None = None
    shell: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layer:
    """One layer blob; `open()` yields its (compressed) bytes, `compression` is none|gzip|zstd."""

    digest: str
    size: int
    media_type: str
    compression: str
    diff_id: str
    open: Callable[[], IO[bytes]] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Image:
    ref: ImageRef
    manifest_digest: str
    platform: Platform
    config: ImageConfig
    config_digest: str
    config_raw: bytes = field(repr=False)
    created: str | None
    layers: tuple[Layer, ...]


def parse_json(raw: bytes, what: str) -> Any:
    """Parse a JSON document or raise SourceError naming `what`."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:      # json's documented answer to deeply nested input
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
    """A content descriptor: digest (string), size (integer), optional mediaType and platform (object)."""
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("size"), int) \
            or not isinstance(d.get("platform") or {}, dict):
        raise SourceError(f"{what}: malformed descriptor {str(d)[:200]}")
    return Descriptor(str(d.get("mediaType", "")), d["digest"], d["size"], d.get("platform"))


def select_platform(index: dict[str, Any], platform: Platform, what: str) -> Descriptor:
    """Pick the manifest for `platform` from an OCI index / Docker manifest list."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise SourceError(f"{what}: index lists no manifests")
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
        entrypoint=strings("Entrypoint"), cmd=strings("Cmd"), env=strings("Env"),
        working_dir=string("WorkingDir"), user=string("User"), stop_signal=string("StopSignal"),
        exposed_ports=tuple(sorted(ports)), labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        healthcheck=_healthcheck(c.get("Healthcheck"), what), shell=strings("Shell"),
    )
    plat = Platform(str(doc.get("os") or "linux"), str(doc.get("architecture") or "amd64"),
                    doc.get("variant"))
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
        return Healthcheck(tuple(test), nums["Interval"], nums["Timeout"], nums["StartPeriod"],
                           nums["StartInterval"], nums["Retries"])
    except SourceError as e:
        raise SourceError(f"{what}: config.{e}") from None


def build_image(ref: ImageRef, manifest_digest: str, manifest: dict[str, Any], config_raw: bytes,
                opener: Callable[[Descriptor], Callable[[], IO[bytes]]], what: str,
                platform: Platform | None = None) -> Image:
    """Assemble an Image from a parsed manifest and its config; `opener(desc)` opens a blob."""
    cfg_desc, layer_descs = manifest_parts(manifest, what)
    config, diff_ids, created, plat = parse_config(config_raw, f"{what} config {cfg_desc.digest[:19]}")
    if platform and not platform.matches({"os": plat.os, "architecture": plat.architecture,
                                          "variant": plat.variant}):
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
