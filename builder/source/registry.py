"""The registry source (`docker://`): the distribution API v2 over httpx.

A tag is resolved with one `HEAD` of its manifest (`Docker-Content-Digest`); manifests, configs and layers
are fetched by digest, verified and kept in the blob cache, so a warm load costs that one request and a
load pinned by a cached digest costs none. Layers are downloaded only when `Layer.open()` is called.
Plain HTTP is used for loopback registries and with `insecure`; HTTPS otherwise, with no fallback.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from .. import __version__
from ..blobs import CHUNK, blob_path, check_digest, store_blob, verify_bytes
from ..errors import RegistryUnavailable, SourceError
from ..image import (
    ACCEPT,
    INDEX_TYPES,
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
from . import SourceOptions, auth

RETRIES = 4                                   # tries per request for transient failures
RETRY_DELAY_ENV = "XBUILD_REGISTRY_RETRY_DELAY"   # first backoff delay in seconds (default 0.5), then doubled
MANIFEST_LIMIT = 4 << 20
TIMEOUT = httpx.Timeout(60.0, connect=15.0)
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")


def load(ref: ImageRef, options: SourceOptions) -> Image:
    """The Image `ref` names in its registry, resolved to `options.platform`; layers download lazily."""
    return _Registry(ref, options).image()


def endpoint(registry: str, insecure: bool = False) -> str:
    """The base URL serving `registry`'s API: plain HTTP for loopback hosts or when `insecure`."""
    if registry == "docker.io":
        return "https://registry-1.docker.io"
    host = urlsplit(f"//{registry}").hostname or registry
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return f"{'http' if loopback or insecure else 'https'}://{registry}"


class _Body(io.RawIOBase):
    """A streamed response body as a raw stream, cut after `limit` + 1 bytes (the size check then fails)."""

    def __init__(self, resp: httpx.Response, limit: int):
        self.chunks = resp.iter_bytes(CHUNK)
        self.buf = b""
        self.left = limit + 1

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf and self.left > 0:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.buf = chunk[: self.left]
            self.left -= len(self.buf)
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _is_tls(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _errors(resp: httpx.Response) -> tuple[set[str], str]:
    """The distribution error codes and first message of an error response."""
    try:
        errs = resp.json().get("errors") or []
        return {str(e.get("code")) for e in errs}, str(errs[0].get("message") or "") if errs else ""
    except (ValueError, AttributeError, TypeError, httpx.ResponseNotRead):
        return set(), ""


class _Registry:
    """One repository of one registry: requests with auth, retries and cache look-ups."""

    def __init__(self, ref: ImageRef, options: SourceOptions):
        if not ref.registry or not ref.repository:
            raise SourceError(f"{ref}: not a registry reference")
        self.ref, self.options, self.what = ref, options, str(ref)
        self.base = f"{endpoint(ref.registry, options.insecure)}/v2/{ref.repository}"
        self.scope = f"repository:{ref.repository}:pull"
        self.authorization: str | None = None
        self.creds: auth.Credentials | None = None
        self.creds_read = False

    def _client(self) -> httpx.Client:
        return httpx.Client(follow_redirects=True, timeout=TIMEOUT,
                            headers={"User-Agent": f"xbuild/{__version__}"})

    def image(self) -> Image:
        with self._client() as client:
            digest = self.ref.digest or self._resolve_tag(client)
            raw, digest = self._manifest(client, digest or str(self.ref.tag), digest)
            for _ in range(4):  # index -> (nested index ->) manifest
                doc = load_json(raw, f"{self.what} manifest {digest[:19]}")
                if doc.get("schemaVersion") == 1 or doc.get("mediaType") in SCHEMA1_TYPES:
                    raise SourceError(f"{self.what}: schema 1 manifests are not supported "
                                      "(re-push the image with a current docker, buildah or skopeo)")
                mt = media_type_of(doc)
                if mt in INDEX_TYPES:
                    desc = select_platform(doc, self.options.platform, self.what)
                    raw, digest = self._manifest(client, desc.digest, desc.digest)
                    continue
                if mt not in MANIFEST_TYPES:
                    raise SourceError(f"{self.what}: unsupported manifest media type {mt!r}")
                cfg = descriptor(doc.get("config"), f"{self.what} config")
                config_raw = self._blob(client, cfg, f"{self.what} config {cfg.digest}").read_bytes()
                return build_image(self.ref, digest, doc, config_raw, self._opener, self.what,
                                   self.options.platform)
        raise SourceError(f"{self.what}: index nesting too deep")

    def _resolve_tag(self, client: httpx.Client) -> str | None:
        """The tag's manifest digest from a HEAD request, or None if the registry does not say."""
        resp = self._send(client, "HEAD", f"{self.base}/manifests/{self.ref.tag}", {"Accept": ACCEPT})
        if resp.status_code == 404:
            raise self._failure(resp, "manifest")
        if resp.status_code != 200:  # e.g. 405 from registries without HEAD: the GET tells
            return None
        digest = resp.headers.get("Docker-Content-Digest", "")
        return digest if digest.startswith("sha256:") else None

    def _manifest(self, client: httpx.Client, reference: str, digest: str | None) -> tuple[bytes, str]:
        """(bytes, digest) of a manifest by tag or digest, from the cache when its digest is known."""
        if digest and (path := blob_path(digest)).exists():
            return path.read_bytes(), digest
        resp = self._send(client, "GET", f"{self.base}/manifests/{reference}", {"Accept": ACCEPT})
        if resp.status_code != 200:
            raise self._failure(resp, "manifest")
        raw = resp.content
        if len(raw) > MANIFEST_LIMIT:
            raise SourceError(f"{self.what}: manifest larger than {MANIFEST_LIMIT >> 20} MiB")
        header = resp.headers.get("Docker-Content-Digest", "")
        if not digest:
            digest = header if header.startswith("sha256:") else "sha256:" + hashlib.sha256(raw).hexdigest()
        verify_bytes(raw, digest, f"{self.what} manifest")
        store_blob(io.BytesIO(raw), digest, f"{self.what} manifest")
        return raw, digest

    def _blob(self, client: httpx.Client, desc: Descriptor, what: str,
              progress: Callable[[int], None] | None = None) -> Path:
        """The blob in the cache, downloaded and verified first if missing (retried if cut off)."""
        path = blob_path(desc.digest)
        if path.exists():
            return path
        check_digest(desc.digest, what)
        attempt = 0
        while True:
            resp = self._send(client, "GET", f"{self.base}/blobs/{desc.digest}", stream=True)
            try:
                if resp.status_code != 200:
                    resp.read()
                    raise self._failure(resp, f"blob {desc.digest}")
                body = io.BufferedReader(_Body(resp, desc.size), CHUNK)
                return store_blob(body, desc.digest, what, desc.size, progress)
            except httpx.TransportError as e:
                attempt += 1
                if attempt >= RETRIES:
                    raise RegistryUnavailable(f"{what}: download failed after {RETRIES} tries ({e})") \
                        from None
            finally:
                resp.close()
            self._sleep(attempt)

    def _opener(self, desc: Descriptor) -> Callable[[], IO[bytes]]:
        def open_layer() -> IO[bytes]:
            path = blob_path(desc.digest)
            if not path.exists():
                progress = self.options.progress
                advance = progress(f"layer {desc.digest[:19]}", desc.size) if progress else None
                with self._client() as client:
                    self._blob(client, desc, f"{self.what} layer {desc.digest}", advance)
            return open(path, "rb")

        return open_layer

    def _sleep(self, attempt: int, retry_after: str | None = None) -> None:
        delay = float(os.environ.get(RETRY_DELAY_ENV) or 0.5) * 2 ** (attempt - 1)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        time.sleep(delay)

    def _send(self, client: httpx.Client, method: str, url: str, headers: dict[str, str] | None = None,
              stream: bool = False, authorize: bool = True,
              data: dict[str, str] | None = None) -> httpx.Response:
        """Send a request, answering one 401 challenge and retrying transient failures with backoff.

        Returns any other response; 401/403 after authenticating raise SourceError, a registry still
        unreachable or failing (5xx, 429) after RETRIES tries raises RegistryUnavailable.
        """
        host = urlsplit(url).netloc
        challenged = not authorize
        attempt = 0
        while True:
            hdrs = dict(headers or {})
            if authorize and self.authorization:
                hdrs["Authorization"] = self.authorization
            try:
                resp = client.send(client.build_request(method, url, headers=hdrs, data=data), stream=stream)
            except httpx.TransportError as e:
                if _is_tls(e):
                    raise SourceError(f"{self.what}: TLS with {host} failed ({e}); for a plain-HTTP registry "
                                      "use the insecure option") from None
                failure, retry_after = f"unreachable ({str(e) or type(e).__name__})", None
            else:
                if resp.status_code == 401 and not challenged:
                    resp.close()
                    self._authenticate(client, resp)
                    challenged = True
                    continue
                if resp.status_code in (401, 403):
                    resp.read()
                    raise self._denied(resp)
                if resp.status_code != 429 and resp.status_code < 500:
                    return resp
                failure, retry_after = f"failing (HTTP {resp.status_code})", resp.headers.get("Retry-After")
                resp.close()
            attempt += 1
            if attempt >= RETRIES:
                raise RegistryUnavailable(f"{self.what}: registry {host} {failure} after {RETRIES} tries")
            self._sleep(attempt, retry_after)

    def _credentials(self) -> auth.Credentials | None:
        if not self.creds_read:
            self.creds, self.creds_read = auth.credentials(str(self.ref.registry)), True
        return self.creds

    def _authenticate(self, client: httpx.Client, resp: httpx.Response) -> None:
        """Answer a 401 challenge: Basic with configured credentials, or fetch a Bearer token."""
        challenge = auth.pick_challenge(resp.headers.get_list("WWW-Authenticate"))
        creds = self._credentials()
        if challenge is None or (challenge.scheme == "basic" and (creds is None or creds.identity_token)):
            raise self._denied(resp)
        if challenge.scheme == "basic":
            assert creds is not None
            self.authorization = creds.basic()
            return
        realm = challenge.params.get("realm")
        if not realm:
            raise SourceError(f"{self.what}: the registry's Bearer challenge names no realm")
        params = {"scope": challenge.params.get("scope") or self.scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        if creds and creds.identity_token:
            answer = self._send(client, "POST", realm, authorize=False, data={
                **params, "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                "client_id": "xbuild"})
        else:
            headers = {"Authorization": creds.basic()} if creds else None
            answer = self._send(client, "GET", str(httpx.URL(realm, params=params)), headers, authorize=False)
        if answer.status_code != 200:
            raise SourceError(f"{self.what}: token request to {realm} failed (HTTP {answer.status_code})")
        try:
            doc = answer.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{self.what}: token server {realm} answered without a token")
        self.authorization = f"Bearer {token}"

    def _denied(self, resp: httpx.Response) -> SourceError:
        _, message = _errors(resp)
        status = f"HTTP {resp.status_code}" + (f": {message}" if message else "")
        creds = self._credentials()
        hint = ("the credentials were refused" if creds else
                f"no credentials for {self.ref.registry}; the image may not exist or need a login")
        return SourceError(f"{self.what}: access denied ({status}); {hint}: check credentials in "
                           f"{auth.config_path()}")

    def _failure(self, resp: httpx.Response, what: str) -> SourceError:
        codes, message = _errors(resp)
        if resp.status_code == 404 or codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"}:
            if what == "manifest":
                return SourceError(f"{self.what}: manifest unknown (no such image or tag)")
            return SourceError(f"{self.what}: {what} unknown to the registry")
        detail = f": {message}" if message else ""
        return SourceError(f"{self.what}: {what} request failed (HTTP {resp.status_code}{detail})")
