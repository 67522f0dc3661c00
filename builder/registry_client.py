"""One HTTP client for the distribution API v2: image pulls (`source/registry.py`) and artifact pushes and
pulls (`publish.py`) both go through it.

It answers 401 challenges (Basic with docker's configured credentials, or a Bearer token asked for the
client's scopes plus whatever other repositories the challenge names, e.g. the source of a cross-repository
mount), retries transport errors, 5xx and 429 with exponential backoff (honouring `Retry-After`), re-sends
request bodies on each try, and streams blobs into the verified blob cache, retrying downloads that are cut
off. Refusals and bad answers raise the caller's error type (SourceError for pulls, PublishError for
publishing); a registry still unreachable or failing after RETRIES tries raises RegistryUnavailable.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from . import __version__
from .blobs import CHUNK, blob_path, check_digest, store_blob
from .errors import RegistryUnavailable, SourceError, XbuildError
from .source import auth

RETRIES = 4                                   # tries per request for transient failures
RETRY_DELAY_ENV = "XBUILD_REGISTRY_RETRY_DELAY"   # first backoff delay in seconds (default 0.5), then doubled
TIMEOUT = httpx.Timeout(60.0, connect=15.0)

Body = bytes | Path
"""A request body that can be sent again on a retry: bytes, or a file reopened for each try."""


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


def errors(resp: httpx.Response) -> tuple[set[str], str]:
    """The distribution error codes and first message of an error response (read)."""
    try:
        errs = resp.json().get("errors") or []
        return {str(e.get("code")) for e in errs}, str(errs[0].get("message") or "") if errs else ""
    except (ValueError, AttributeError, TypeError, httpx.ResponseNotRead):
        return set(), ""


def status(resp: httpx.Response) -> str:
    """`HTTP <code>`, with the registry's first error message if it gave one."""
    message = errors(resp)[1]
    return f"HTTP {resp.status_code}" + (f": {message}" if message else "")


def _is_tls(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _backoff(attempt: int, retry_after: str | None = None) -> None:
    delay = float(os.environ.get(RETRY_DELAY_ENV) or 0.5) * 2 ** (attempt - 1)
    if retry_after and retry_after.isdigit():
        delay = max(delay, min(float(retry_after), 60.0))
    time.sleep(delay)


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


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


class RegistryClient:
    """Requests to one registry, about one repository (`base` is its `/v2/<repository>` URL).

    `scopes` maps repositories to the actions a Bearer token is asked for (`{"team/app": "pull,push"}`;
    several repositories give several `scope` parameters). `error` is the exception type refusals and bad
    answers raise; `what` starts every message. A denial reads `<what>: access denied (HTTP 403); no
    credentials for <registry><no_credentials_hint>: <check_hint>`, `{config}` in `check_hint` being
    docker's config file. Use it as a context manager (again for each batch of requests; it nests): the
    HTTP connections live while it is entered, the authorization as long as the object.
    """

    def __init__(self, registry: str, repository: str, *, what: str, scopes: Mapping[str, str] | None = None,
                 insecure: bool = False, error: type[XbuildError] = SourceError,
                 timeout: httpx.Timeout = TIMEOUT, no_credentials_hint: str = "",
                 check_hint: str = "check credentials in {config}"):
        self.registry, self.repository, self.what, self.error = registry, repository, what, error
        self.base = f"{endpoint(registry, insecure)}/v2/{repository}"
        self.scopes = dict(scopes or {repository: "pull"})
        self.timeout = timeout
        self.no_credentials_hint, self.check_hint = no_credentials_hint, check_hint
        self.authorization: str | None = None
        self._creds: auth.Credentials | None = None
        self._creds_read = False
        self._http: httpx.Client | None = None
        self._entered = 0

    def __enter__(self) -> Self:
        if self._http is None:
            self._http = httpx.Client(follow_redirects=True, timeout=self.timeout,
                                      headers={"User-Agent": f"xbuild/{__version__}"})
        self._entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered -= 1
        if self._entered == 0 and self._http is not None:
            self._http.close()
            self._http = None

    def send(self, method: str, url: str | httpx.URL, headers: dict[str, str] | None = None,
             content: Body | None = None, stream: bool = False, authorize: bool = True,
             data: dict[str, str] | None = None) -> httpx.Response:
        """Send a request, answering one 401 challenge and retrying transient failures with backoff.

        Returns any other response; 401/403 after authenticating (or, with `authorize` False, at once)
        raise `error`, a host still unreachable or failing (5xx, 429) after RETRIES tries raises
        RegistryUnavailable. `content` is sent again on each try.
        """
        assert self._http is not None, "RegistryClient used outside its `with` block"
        host = urlsplit(str(url)).netloc
        who = f"registry {host}" if authorize else f"token server {host}"
        challenged = not authorize
        attempt = 0
        while True:
            hdrs = dict(headers or {})
            if authorize and self.authorization:
                hdrs["Authorization"] = self.authorization
            body = _chunks(content) if isinstance(content, Path) else content
            try:
                resp = self._http.send(self._http.build_request(method, url, headers=hdrs, content=body,
                                                                data=data), stream=stream)
            except httpx.TransportError as e:
                if _is_tls(e):
                    raise self.error(f"{self.what}: TLS with {host} failed ({e}); for a plain-HTTP registry "
                                     "use the insecure option") from None
                failure, retry_after = f"unreachable ({str(e) or type(e).__name__})", None
            else:
                if resp.status_code == 401 and not challenged:
                    resp.read()
                    self._authenticate(resp)
                    challenged = True
                    continue
                if resp.status_code in (401, 403):
                    resp.read()
                    raise self.denied(resp)
                if resp.status_code != 429 and resp.status_code < 500:
                    return resp
                failure, retry_after = f"failing (HTTP {resp.status_code})", resp.headers.get("Retry-After")
                resp.close()
            attempt += 1
            if attempt >= RETRIES:
                raise RegistryUnavailable(f"{self.what}: {who} {failure} after {RETRIES} tries")
            _backoff(attempt, retry_after)

    def download(self, url: str, digest: str, size: int, what: str,
                 failure: Callable[[httpx.Response], Exception],
                 progress: Callable[[int], None] | None = None) -> Path:
        """The blob `digest` in the blob cache, downloaded from `url` and verified first if missing; a
        download cut off is tried again. A response other than 200 raises `failure(response)`."""
        path = blob_path(digest)
        if path.exists():
            return path
        with self._own_errors():
            check_digest(digest, what)
        attempt = 0
        while True:
            resp = self.send("GET", url, stream=True)
            try:
                if resp.status_code != 200:
                    resp.read()
                    raise failure(resp)
                with self._own_errors():     # a download that does not match its digest or size
                    body = io.BufferedReader(_Body(resp, size), CHUNK)
                    return store_blob(body, digest, what, size, progress)
            except httpx.TransportError as e:
                attempt += 1
                if attempt >= RETRIES:
                    raise RegistryUnavailable(f"{what}: download failed after {RETRIES} tries ({e})") \
                        from None
            finally:
                resp.close()
            _backoff(attempt)

    def credentials(self) -> auth.Credentials | None:
        """The registry's credentials from docker's config (read once), or None."""
        if not self._creds_read:
            with self._own_errors():
                self._creds = auth.credentials(self.registry)
            self._creds_read = True
        return self._creds

    @contextlib.contextmanager
    def _own_errors(self) -> Iterator[None]:
        """SourceErrors (of the blob store, of docker's config) raised as `error` instead."""
        try:
            yield
        except SourceError as e:
            if isinstance(e, self.error):
                raise
            raise self.error(str(e)) from None

    def _authenticate(self, resp: httpx.Response) -> None:
        """Answer a 401 challenge: Basic with configured credentials, or fetch a Bearer token."""
        challenge = auth.pick_challenge(resp.headers.get_list("WWW-Authenticate"))
        creds = self.credentials()
        if challenge is None or (challenge.scheme == "basic" and (creds is None or creds.identity_token)):
            raise self.denied(resp)
        if challenge.scheme == "basic":
            assert creds is not None
            self.authorization = creds.basic()
            return
        realm = challenge.params.get("realm")
        if not realm:
            raise self.error(f"{self.what}: the registry's Bearer challenge names no realm")
        # ours, and what the challenge asks about other repositories (the source of a mount)
        ours = [f"repository:{repo}:{actions}" for repo, actions in self.scopes.items()]
        mine = tuple(f"repository:{repo}:" for repo in self.scopes)
        scopes = ours + [s for s in (challenge.params.get("scope") or "").split() if not s.startswith(mine)]
        service = {"service": challenge.params["service"]} if challenge.params.get("service") else {}
        if creds and creds.identity_token:
            answer = self.send("POST", realm, authorize=False, data={
                "scope": " ".join(scopes), **service, "grant_type": "refresh_token",
                "refresh_token": creds.identity_token, "client_id": "xbuild"})
        else:
            query: list[tuple[str, str | int | float | bool | None]] = [("scope", s) for s in scopes]
            query += service.items()
            answer = self.send("GET", httpx.URL(realm).copy_merge_params(query),
                               {"Authorization": creds.basic()} if creds else None, authorize=False)
        if answer.status_code != 200:
            raise self.error(f"{self.what}: token request to {realm} failed (HTTP {answer.status_code})")
        try:
            doc = answer.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise self.error(f"{self.what}: token server {realm} answered without a token")
        self.authorization = f"Bearer {token}"

    def denied(self, resp: httpx.Response) -> XbuildError:
        """The error for a refused request: which credentials were used, and where they are configured."""
        hint = ("the credentials were refused" if self.credentials() else
                f"no credentials for {self.registry}{self.no_credentials_hint}")
        check = self.check_hint.format(config=auth.config_path())
        return self.error(f"{self.what}: access denied ({status(resp)}); {hint}: {check}")
