"""The registry source (`docker://`): the distribution API v2 over httpx.

A tag is resolved with one `HEAD` of its manifest (`Docker-Content-Digest`); manifests, configs and layers
are fetched by digest, verified and kept in the blob cache, so a warm load costs that one request and a
load pinned by a cached digest costs none. Layers are downloaded only when `Layer.open()` is called.
Plain HTTP is used for loopback registries and with `insecure`; HTTPS otherwise, with no fallback.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from ..blobs import blob_bytes, blob_path, present, store_blob, verify_bytes
from ..errors import SourceError
from ..image import (
    ACCEPT,
    CONFIG_LIMIT,
    INDEX_TYPES,
    MANIFEST_LIMIT,
    MANIFEST_TYPES,
    Descriptor,
    Image,
    build_image,
    descriptor,
    load_json,
    media_type_of,
    select_platform,
)
from ..reference import ImageRef
from ..registry_client import RETRIES, RETRY_DELAY_ENV, RegistryClient, endpoint, errors
from . import SourceOptions

__all__ = ["RETRIES", "RETRY_DELAY_ENV", "endpoint", "load"]

SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")


def load(ref: ImageRef, options: SourceOptions) -> Image:
    """The Image `ref` names in its registry, resolved to `options.platform`; layers download lazily."""
    return _Registry(ref, options).image()


class _Registry:
    """One image of one registry repository: manifests, config and layers through the cache."""

    def __init__(self, ref: ImageRef, options: SourceOptions):
        if not ref.registry or not ref.repository:
            raise SourceError(f"{ref}: not a registry reference")
        self.ref, self.options, self.what = ref, options, str(ref)
        self.http = RegistryClient(ref.registry, ref.repository, what=self.what, insecure=options.insecure,
                                   no_credentials_hint="; the image may not exist or need a login")
        self.base = self.http.base

    def image(self) -> Image:
        with self.http:
            digest = self.ref.digest or self._resolve_tag()
            raw, digest = self._manifest(digest or str(self.ref.tag), digest)
            for _ in range(4):  # index -> (nested index ->) manifest
                doc = load_json(raw, f"{self.what} manifest {digest[:19]}")
                if doc.get("schemaVersion") == 1 or doc.get("mediaType") in SCHEMA1_TYPES:
                    raise SourceError(f"{self.what}: schema 1 manifests are not supported "
                                      "(re-push the image with a current docker, buildah or skopeo)")
                mt = media_type_of(doc)
                if mt in INDEX_TYPES:
                    desc = select_platform(doc, self.options.platform, self.what)
                    raw, digest = self._manifest(desc.digest, desc.digest)
                    continue
                if mt not in MANIFEST_TYPES:
                    raise SourceError(f"{self.what}: unsupported manifest media type {mt!r}")
                cfg = descriptor(doc.get("config"), f"{self.what} config")
                if cfg.size > CONFIG_LIMIT:
                    raise SourceError(f"{self.what}: config larger than {CONFIG_LIMIT >> 20} MiB")
                config_raw = blob_bytes(cfg.digest, f"{self.what} config", self._fetcher(cfg), CONFIG_LIMIT)
                return build_image(self.ref, digest, doc, config_raw, self._opener, self.what,
                                   self.options.platform)
        raise SourceError(f"{self.what}: index nesting too deep")

    def _resolve_tag(self) -> str | None:
        """The tag's manifest digest from a HEAD request, or None if the registry does not say."""
        resp = self.http.send("HEAD", f"{self.base}/manifests/{self.ref.tag}", {"Accept": ACCEPT})
        if resp.status_code == 404:
            raise self._failure(resp, "manifest")
        if resp.status_code != 200:  # e.g. 405 from registries without HEAD: the GET tells
            return None
        digest = resp.headers.get("Docker-Content-Digest", "")
        return digest if digest.startswith("sha256:") else None

    def _manifest(self, reference: str, digest: str | None) -> tuple[bytes, str]:
        """(bytes, digest) of a manifest by tag or digest (from the cache, verified, given the digest)."""
        if digest:
            fetch = lambda: self._get_manifest(reference, digest)  # noqa: E731
            return blob_bytes(digest, f"{self.what} manifest", fetch, MANIFEST_LIMIT), digest
        return self._get_manifest(reference, None)

    def _get_manifest(self, reference: str, digest: str | None) -> tuple[bytes, str]:
        """Fetch a manifest from the registry (at most MANIFEST_LIMIT), verify it, store it in the cache."""
        raw, headers = self.http.fetch(f"{self.base}/manifests/{reference}", "manifest", MANIFEST_LIMIT,
                                       lambda resp: self._failure(resp, "manifest"), {"Accept": ACCEPT})
        header = headers.get("Docker-Content-Digest", "")
        if not digest:
            digest = header if header.startswith("sha256:") else "sha256:" + hashlib.sha256(raw).hexdigest()
        verify_bytes(raw, digest, f"{self.what} manifest")
        store_blob(io.BytesIO(raw), digest, f"{self.what} manifest")
        return raw, digest

    def _blob(self, desc: Descriptor, what: str, progress: Callable[[int], None] | None = None) -> Path:
        """The blob in the cache, downloaded and verified first if missing (retried if cut off)."""
        return self.http.download(f"{self.base}/blobs/{desc.digest}", desc.digest, desc.size, what,
                                  lambda resp: self._failure(resp, f"blob {desc.digest}"), progress)

    def _fetcher(self, desc: Descriptor) -> Callable[[], Path]:
        return lambda: self._blob(desc, f"{self.what} config {desc.digest}")

    def _opener(self, desc: Descriptor) -> Callable[[], IO[bytes]]:
        def open_layer() -> IO[bytes]:
            path = blob_path(desc.digest)
            if not present(path):
                progress = self.options.progress
                advance = progress(f"layer {desc.digest[:19]}", desc.size) if progress else None
                with self.http:
                    self._blob(desc, f"{self.what} layer {desc.digest}", advance)
            return open(path, "rb")

        return open_layer

    def _failure(self, resp: httpx.Response, what: str) -> SourceError:
        codes, message = errors(resp)
        if resp.status_code == 404 or codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"}:
            if what == "manifest":
                return SourceError(f"{self.what}: manifest unknown (no such image or tag)")
            return SourceError(f"{self.what}: {what} unknown to the registry")
        detail = f": {message}" if message else ""
        return SourceError(f"{self.what}: {what} request failed (HTTP {resp.status_code}{detail})")
