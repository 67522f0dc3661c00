"""One repository of a registry: what the image source (`source/registry.py`) and publishing (`publish.py`)
ask of it, over the RegistryClient (auth, retries, caps, deadlines).

- `manifest(ref, platform)`: the one manifest fetch. A tag is resolved with one `HEAD`
  (`Docker-Content-Digest`); a manifest known by digest is read from the blob cache, verified, and fetched
  only when missing or corrupt; a manifest fetched by tag is verified against the digest the registry
  names. Every manifest fetched is stored in the blob cache under its digest. `oci.manifest.resolve` then
  follows an index to the platform's manifest and checks the media type.
- `config(desc, name)`: a config blob (at most CONFIG_LIMIT) through the blob cache, verified.
- `blob(desc, label)`: any blob downloaded into the blob cache, verified, unless it is there.
- push: `ensure_blob` (HEAD, cross-repository mount, upload) and `put_manifest`; which repository of the
  registry holds which blob is remembered in the cache (`$XBUILD_CACHE/publish/<registry>/<hex>`) so a later
  push elsewhere in the registry can mount it instead of uploading it.

Refusals and bad answers raise the client's error type (SourceError for image pulls, PublishError for
publishing); the messages start with the client's `what`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import httpx

from ..blobs import blob_bytes, check_digest, store_blob, verify_bytes
from ..cache import atomic_file, cache_dir, format_size
from ..errors import XbuildError
from ..image import Platform
from ..reference import ImageRef
from .client import Body, RegistryClient, errors, status
from .manifest import ACCEPT, CONFIG_LIMIT, MANIFEST_LIMIT, OCI_MANIFEST, Descriptor, ImageManifest, resolve

UNKNOWN = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})  # distribution's "no such thing"


class Repository(RegistryClient):
    """A RegistryClient with the distribution API's operations on its repository. Use it as a context
    manager, like the client."""

    # -- pull -----------------------------------------------------------------------------------------------

    def manifest(self, ref: ImageRef, platform: Platform | None, depth: int = 4) -> ImageManifest:
        """The image manifest `ref` (tag or digest) names, for `platform` when it is an index (None: an index
        is refused; `depth` as for `resolve`), its digest verified (against the ref's when pinned)."""
        digest = ref.digest or self._resolve_tag(str(ref.tag))
        raw, digest = self._manifest(digest or str(ref.tag), digest)
        with self.own_errors():
            return resolve(raw, digest, lambda d: self._manifest(d, d)[0], platform, self.what, depth=depth)

    def _resolve_tag(self, tag: str) -> str | None:
        """The tag's manifest digest from a HEAD request, or None if the registry does not say."""
        resp = self.send("HEAD", f"{self.base}/manifests/{tag}", {"Accept": ACCEPT})
        if resp.status_code == 404:
            raise self.failure(resp, "manifest")
        if resp.status_code != 200:  # e.g. 405 from registries without HEAD: the GET tells
            return None
        digest = resp.headers.get("Docker-Content-Digest", "")
        return digest if digest.startswith("sha256:") else None

    def _manifest(self, reference: str, digest: str | None) -> tuple[bytes, str]:
        """(bytes, digest) of a manifest by tag or digest (from the cache, verified, given the digest)."""
        if digest:
            fetch = lambda: self._get_manifest(reference, digest)  # noqa: E731
            with self.own_errors():
                return blob_bytes(digest, f"{self.what} manifest", fetch, MANIFEST_LIMIT), digest
        return self._get_manifest(reference, None)

    def _get_manifest(self, reference: str, digest: str | None) -> tuple[bytes, str]:
        """Fetch a manifest (at most MANIFEST_LIMIT), verify it against `digest` (else the digest the
        registry names, else its own hash), store it in the blob cache."""
        raw, headers = self.fetch(
            f"{self.base}/manifests/{reference}",
            "manifest",
            MANIFEST_LIMIT,
            lambda resp: self.failure(resp, "manifest"),
            {"Accept": ACCEPT},
        )
        header = headers.get("Docker-Content-Digest", "")
        if not digest:
            digest = header if header.startswith("sha256:") else "sha256:" + hashlib.sha256(raw).hexdigest()
        with self.own_errors():
            verify_bytes(raw, digest, f"{self.what} manifest")
            store_blob(io.BytesIO(raw), digest, f"{self.what} manifest")
        return raw, digest

    def config(self, desc: Descriptor, name: str) -> bytes:
        """The config blob `desc` (`name` in messages: "config", "manifest.json"...) from the blob cache,
        verified, fetched first when missing or corrupt; refused unread past CONFIG_LIMIT."""
        if desc.size > CONFIG_LIMIT:
            raise self.error(f"{self.what}: config larger than {format_size(CONFIG_LIMIT)}")
        with self.own_errors():
            return blob_bytes(
                desc.digest,
                f"{self.what} {name}",
                lambda: self.blob(desc, f"{name} {desc.digest}"),
                CONFIG_LIMIT,
            )

    def blob(self, desc: Descriptor, label: str, progress: Callable[[int], None] | None = None) -> Path:
        """The blob `desc` in the blob cache, downloaded and verified first if missing (retried if cut off);
        `label` names it in messages ("layer sha256:…", "initrd.img")."""
        return self.download(
            f"{self.base}/blobs/{desc.digest}",
            desc.digest,
            desc.size,
            f"{self.what} {label}",
            lambda resp: self.failure(resp, label),
            progress,
        )

    def failure(self, resp: httpx.Response, action: str) -> XbuildError:
        """The error for an unexpected answer to `action` ("manifest", "layer sha256:…", "upload of x")."""
        codes = errors(resp)[0]
        if resp.status_code == 413:
            return self.error(f"{self.what}: the registry refused {action}: too large ({status(resp)})")
        if resp.status_code == 405 or "UNSUPPORTED" in codes:
            return self.error(
                f"{self.what}: the registry refused {action} ({status(resp)}); "
                "is the registry or repository read-only?"
            )
        if resp.status_code == 404 or codes & UNKNOWN:
            if action == "manifest":
                return self.error(f"{self.what}: manifest unknown (no such image or tag)")
            return self.error(f"{self.what}: {action} unknown to the registry ({status(resp)})")
        return self.error(f"{self.what}: {action} request failed ({status(resp)})")

    # -- push -----------------------------------------------------------------------------------------------

    def ensure_blob(self, digest: str, size: int, content: Body, name: str) -> str:
        """Make the repository hold the blob `digest` (`content`, file `name`): "present" (HEAD), "mounted"
        (from the repository last seen holding it) or "uploaded"."""
        resp = self.send("HEAD", f"{self.base}/blobs/{digest}")
        if resp.status_code == 200:
            self.remember(digest)
            return "present"
        location = None
        known = self._known(digest)
        if known and known != self.repository:
            try:
                resp = self.send(
                    "POST", httpx.URL(f"{self.base}/blobs/uploads/", params={"mount": digest, "from": known})
                )
            except self.error:  # no access to the other repository: upload instead
                self.authorization = None
            else:
                if resp.status_code == 201:
                    self.remember(digest)
                    return "mounted"
                if resp.status_code == 202:
                    location = resp.headers.get("Location")
        if location is None:
            resp = self.send("POST", f"{self.base}/blobs/uploads/", {"Content-Length": "0"})
            if resp.status_code != 202 or not resp.headers.get("Location"):
                raise self.failure(resp, f"upload of {name}")
            location = resp.headers["Location"]
        url = httpx.URL(self.base).join(location).copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        resp = self.send("PUT", url, headers, content)
        if resp.status_code != 201:
            raise self.failure(resp, f"upload of {name}")
        self.remember(digest)
        return "uploaded"

    def put_manifest(self, tag: str, raw: bytes, digest: str, media_type: str = OCI_MANIFEST) -> None:
        """PUT the OCI manifest (or index: `media_type`) `raw`, whose digest is `digest`, as `tag` (a tag, or
        the digest itself for a manifest an index will name)."""
        resp = self.send("PUT", f"{self.base}/manifests/{tag}", {"Content-Type": media_type}, raw)
        if resp.status_code != 201:
            raise self.failure(resp, "manifest upload")
        answered = resp.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise self.error(f"{self.what}: the registry stored the manifest as {answered}, not {digest}")

    def _known(self, digest: str) -> str | None:
        p = self._known_dir() / check_digest(digest, "blob")
        return p.read_text().strip() if p.is_file() else None

    def remember(self, digest: str) -> None:
        """Note that this repository holds `digest`, for cross-repository mounts by later pushes."""
        with atomic_file(self._known_dir() / check_digest(digest, "blob"), "w") as f:
            f.write(self.repository)

    def _known_dir(self) -> Path:
        return cache_dir("publish", self.registry.replace(":", "_").replace("/", "_"))
