"""The Docker daemon source (`docker-daemon:NAME[:TAG]`, and bare references found in the daemon).

The daemon is reached through the docker SDK, so `DOCKER_HOST` (and `DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`)
are honoured. The image comes from `docker save`, read as a tar stream while it arrives: each layer tar goes
straight into the cache (an uncompressed layer is its own diff, named by its sha256), never the whole archive
to disk. Docker 20.10 sends the layer directories first and `manifest.json` last, so members are hashed and
spooled as they pass and matched to the config's diff_ids at the end. A warm load (config and every diff
cached) does not call `save` at all: one inspect request.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import docker
import requests
from docker.errors import DockerException, ImageNotFound

from ..blobs import CHUNK, blob_bytes, blob_path, diff_path, present, verify_bytes
from ..cache import atomic_file, cache_dir
from ..compression import LAYER_CODECS, sniff
from ..errors import SourceError
from ..image import Image, Platform
from ..oci.manifest import CONFIG_LIMIT, DOCKER_CONFIG, DOCKER_MANIFEST, build_image
from ..reference import ImageRef
from . import SourceOptions

SMALL = 1 << 20  # archive members up to this size (JSON files, tiny layers) stay in memory
PROBE_TIMEOUT = 3  # seconds a bare-reference look-up waits for the daemon
DEFAULT_SOCKET = "/var/run/docker.sock"
_TAR_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True)
class _Blob:
    """A layer as it came out of the archive: where it is cached and how it is compressed."""

    digest: str
    size: int
    compression: str
    path: Path


def daemon_name(ref: ImageRef) -> str:
    """The name docker shows for `ref`: `myapp:dev`, `team/app:v1`, `localhost:5000/app:v1`."""
    name = ref.docker_name
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def find_local(ref: ImageRef, platform: Platform | None = None) -> bool:
    """True when a Docker daemon answers and holds `ref`'s image for `platform`; never raises.

    For a bare reference (`xbuild myapp:dev`): the build then loads it as `docker-daemon:` instead of
    pulling it. Without `DOCKER_HOST` and without the default socket, no connection is attempted.
    """
    if ref.transport not in ("docker", "docker-daemon") or ref.explicit:
        return False
    if not os.environ.get("DOCKER_HOST") and not os.path.exists(DEFAULT_SOCKET):
        return False
    try:
        client = docker.from_env(timeout=PROBE_TIMEOUT)
    except (DockerException, requests.RequestException):
        return False
    try:
        attrs = client.images.get(daemon_name(ref)).attrs
    except (DockerException, requests.RequestException):
        return False
    finally:
        client.close()
    return (platform or Platform()).matches(
        {"os": attrs.get("Os"), "architecture": attrs.get("Architecture"), "variant": attrs.get("Variant")}
    )


def load(ref: ImageRef, options: SourceOptions) -> Image:
    """The Image `ref` names in the local daemon; layers open from the cache."""
    what = str(ref)
    host = os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    try:
        client = docker.from_env()
    except (DockerException, requests.RequestException) as e:
        raise SourceError(f"{what}: no Docker daemon answers at {host} ({_first_line(e)})") from None
    try:
        image = client.images.get(daemon_name(ref))
        config_digest = str(image.id)
        diff_ids = [str(d) for d in (image.attrs.get("RootFS") or {}).get("Layers") or []]
        saved: list[_Blob] = []

        def save() -> None:
            total = int(image.attrs.get("Size") or 0)
            advance = options.progress(f"docker save {daemon_name(ref)}", total) if options.progress else None
            named = daemon_name(ref) if daemon_name(ref) in image.tags else False
            try:
                saved[:] = _save(image.save(chunk_size=CHUNK, named=named), config_digest, what, advance)
            except (DockerException, requests.RequestException) as e:
                raise SourceError(
                    f"{what}: docker save from the daemon at {host} failed ({_first_line(e)})"
                ) from None

        # the cached config is verified (a corrupt one is removed and saved again from the daemon); the
        # cached diffs are verified as flatten reads them
        config_raw = blob_bytes(config_digest, f"{what} config", save, CONFIG_LIMIT)
        if not saved:
            if all(present(diff_path(d)) for d in diff_ids):
                saved[:] = [_Blob(d, diff_path(d).stat().st_size, "none", diff_path(d)) for d in diff_ids]
            else:
                save()
        blobs = saved
    except ImageNotFound:
        raise SourceError(f"{what}: no such image in the Docker daemon at {host}") from None
    except (DockerException, requests.RequestException) as e:
        raise SourceError(f"{what}: Docker daemon at {host} failed ({_first_line(e)})") from None
    finally:
        client.close()
    # the same manifest the docker-archive reader makes of `docker save` output, so digests agree
    layers = [{"mediaType": _TAR_TYPES[b.compression], "digest": b.digest, "size": b.size} for b in blobs]
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": layers,
    }
    manifest_digest = "sha256:" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    paths = {b.digest: b.path for b in blobs}
    return build_image(
        ref,
        manifest_digest,
        manifest,
        config_raw,
        lambda d: lambda: open(paths[d.digest], "rb"),
        what,
        options.platform,
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class _Chunks(io.RawIOBase):
    """An iterator of byte chunks as a raw stream, reporting each chunk to `advance`."""

    def __init__(self, chunks: Iterator[bytes], advance: Callable[[int], None] | None):
        self.chunks, self.advance, self.buf = chunks, advance, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.buf = chunk
            if self.advance:
                self.advance(len(chunk))
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _save(
    chunks: Iterator[bytes], config_digest: str, what: str, advance: Callable[[int], None] | None
) -> list[_Blob]:
    """Read a `docker save` stream, caching the config and every layer; the layers in image order."""
    small: dict[str, bytes] = {}
    spooled: dict[str, tuple[str, int, str, Path]] = {}  # name -> (digest, size, compression, entry)
    links: dict[str, str] = {}  # docker writes a layer seen before (same diff_id) as a symlink to it
    tmp = cache_dir("tmp")
    try:
        with tarfile.open(fileobj=io.BufferedReader(_Chunks(chunks, advance), CHUNK), mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.issym() or member.islnk():
                    base = posixpath.dirname(name) if member.issym() else ""
                    links[name] = posixpath.normpath(posixpath.join(base, member.linkname)).removeprefix("./")
                    continue
                f = tar.extractfile(member) if member.isfile() else None
                if f is None:
                    continue
                if member.size <= SMALL:
                    small[name] = f.read()
                else:
                    spooled[name] = _spool(f, tmp / name.replace("/", "_"))
        entry = _entry(small, config_digest, what)
        config_name = str(entry.get("Config"))
        config_raw = small.get(config_name)
        if config_raw is None:
            raise SourceError(f"{what}: docker save output has no config {config_name}")
        _put(blob_path(config_digest), verify_bytes(config_raw, config_digest, f"{what} config"))
        blobs = []
        for name in entry.get("Layers") or []:
            for _ in range(8):
                name = links.get(name, name)
            if name in small:
                data = small[name]
                digest, compression = "sha256:" + hashlib.sha256(data).hexdigest(), _compression(data)
                final = _final(digest, compression)
                _put(final, data)
                size = len(data)
            elif name in spooled:
                digest, size, compression, final = spooled[name]
            else:
                raise SourceError(f"{what}: docker save output has no layer {name}")
            blobs.append(_Blob(digest, size, compression, final))
        return blobs
    except tarfile.TarError as e:
        raise SourceError(f"{what}: docker save output is not a readable tar ({e})") from None


def _entry(small: dict[str, bytes], config_digest: str, what: str) -> dict[str, Any]:
    """The manifest.json entry of the image whose config is `config_digest`."""
    try:
        entries = json.loads(small["manifest.json"])
    except KeyError:
        raise SourceError(f"{what}: docker save output has no manifest.json") from None
    except ValueError as e:
        raise SourceError(f"{what}: docker save manifest.json is not valid JSON ({e})") from None
    hexd = config_digest.removeprefix("sha256:")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and hexd in str(entry.get("Config")):
            return entry
    raise SourceError(f"{what}: docker save manifest.json does not list image {config_digest[:19]}")


def _final(digest: str, compression: str) -> Path:
    """An uncompressed layer is its own diff (its digest is its diff_id); a compressed one is a blob."""
    return diff_path(digest) if compression == "none" else blob_path(digest)


def _put(final: Path, data: bytes) -> None:
    if not present(final):
        with atomic_file(final) as out:
            out.write(data)


def _compression(head: bytes) -> str:
    return sniff(head, LAYER_CODECS)


def _spool(f: IO[bytes], name: Path) -> tuple[str, int, str, Path]:
    """Copy a member into the cache while hashing it: (digest, size, compression, its cache entry). Written
    as a flocked temp beside `name` (in the cache's tmp/) and renamed to the entry its digest names (a layer
    listed nowhere is then only an unused entry); a full disk is one line naming `name`."""
    h, size, head = hashlib.sha256(), 0, b""
    with atomic_file(name, place=lambda: _final("sha256:" + h.hexdigest(), _compression(head))) as out:
        while chunk := f.read(CHUNK):
            head = head or chunk[:4]
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
    digest = "sha256:" + h.hexdigest()
    return digest, size, _compression(head), _final(digest, _compression(head))
