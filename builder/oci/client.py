"""The one HTTP client of the distribution API v2: every request of `oci.repository` (image pulls, artifact
pushes and pulls) goes through it.

It answers 401 challenges (Basic with docker's configured credentials, or a Bearer token asked for the
client's scopes plus whatever other repositories the challenge names, e.g. the source of a cross-repository
mount), retries transport errors, 5xx and 429 with exponential backoff (honouring `Retry-After`), re-sends
request bodies on each try, and streams blobs into the verified blob cache, retrying downloads that are cut
off. Refusals and bad answers raise the caller's error type (SourceError for pulls, PublishError for
publishing); a registry still unreachable or failing after RETRIES tries raises RegistryUnavailable.

A registry, its token server and wherever they redirect are untrusted, so every answer is bounded:
- size: JSON documents (manifests, indexes, configs, tokens) are read streamed through `fetch` and refused
  once past their cap (a Content-Length above it: not read at all), blobs are cut one byte past their
  descriptor's size, any other answer (errors, redirects) is kept to ERROR_LIMIT bytes;
- encoding: `Accept-Encoding: identity` is asked for; a gzip Content-Encoding sent anyway is undone by our
  own decoder, never more than CHUNK bytes per step (httpx's decoders inflate a whole network read at once:
  a 2 MB gzip bomb took 4 GB); any other encoding (br, zstd, deflate...) is refused;
- time: a transfer (one request with its tries, redirects and backoff) ends by a deadline of
  $XBUILD_REGISTRY_DEADLINE seconds (default 300) plus one per MIN_RATE bytes of a blob, enforced on
  every socket wait (the connection pool's network backend), so a registry dripping bytes, even inside
  its headers, is cut off; a try fails once no byte came for $XBUILD_REGISTRY_STALL_TIMEOUT seconds
  (default 60; 300 for push and pull of VM images) and is retried;
- redirects: at most MAX_REDIRECTS, only to http(s) URLs; a token realm must be an http(s) URL.
A bad answer raises the caller's error type (exit 2); a registry too slow or unreachable to the end,
RegistryUnavailable (exit 2).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import ssl
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import httpcore
import httpx

from .. import __version__
from ..blobs import CHUNK, blob_path, check_digest, store_blob
from ..cache import format_size
from ..errors import BadInput, RegistryUnavailable, SourceError, XbuildError
from ..text import is_decimal
from . import auth

RETRIES = 4  # tries per request for transient failures
RETRY_DELAY_ENV = "XBUILD_REGISTRY_RETRY_DELAY"  # first backoff delay in seconds (default 0.5), then doubled
RETRY_AFTER_MAX = 60.0  # longest Retry-After honoured (seconds)
STALL_ENV = "XBUILD_REGISTRY_STALL_TIMEOUT"  # seconds without a byte before a try fails (default 60)
DEADLINE_ENV = "XBUILD_REGISTRY_DEADLINE"  # seconds for one transfer, all its tries (default 300) ...
MIN_RATE = 100_000  # ... plus one second per MIN_RATE bytes of a blob's size
CONNECT_TIMEOUT = 15.0
MAX_REDIRECTS = 5
ERROR_LIMIT = 64 << 10  # bytes of an answer kept when only its status and message matter
TOKEN_LIMIT = 1 << 20  # a token server's answer
ENCODINGS = ("gzip", "x-gzip")  # Content-Encodings undone (bounded); "identity" is none; others refused
MAX_ENCODINGS = 2

Body = bytes | Path
"""A request body that can be sent again on a retry: bytes, or a file reopened for each try."""

T = TypeVar("T")
_deadline: ContextVar[float | None] = ContextVar("xbuild_registry_deadline", default=None)


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


def _seconds(env: str, default: float) -> float:
    """A positive number of seconds from the environment variable `env`, else `default`."""
    text = os.environ.get(env) or ""
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BadInput(f"{env}={text!r}: expected a positive number of seconds")
    return value


def _is_tls(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _left(timeout: float | None) -> float | None:
    """`timeout` shortened to what is left of the current transfer's deadline (httpcore's ReadTimeout once
    it has passed)."""
    at = _deadline.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the transfer's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A connection whose every wait (read, write, TLS handshake) ends by the current transfer's deadline:
    a registry dripping bytes, even inside the response headers, cannot hold a transfer past it."""

    def __init__(self, inner: httpcore.NetworkStream):
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, _left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for i in range(0, len(buffer), 1 << 16):
            self.inner.write(buffer[i : i + (1 << 16)], _left(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _Stream(self.inner.start_tls(ssl_context, server_hostname, _left(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _Backend(httpcore.SyncBackend):
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(super().connect_tcp(host, port, _left(timeout), local_address, socket_options))


class _Transport(httpx.HTTPTransport):
    """httpx's transport (its defaults) over a connection pool whose connections honour the deadline."""

    def __init__(self) -> None:
        super().__init__()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_Backend(),
        )


class _BadEncoding(Exception):
    """A Content-Encoding that is not one of ENCODINGS, or corrupt gzip data."""


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """gzip members decoded, never more than CHUNK bytes at a time whatever the compression ratio."""
    d, fed = zlib.decompressobj(31), False
    try:
        for data in chunks:
            while data:
                fed = True
                out = d.decompress(data, CHUNK)
                if out:
                    yield out
                if d.eof:  # the next gzip member, if any
                    data, d, fed = d.unused_data, zlib.decompressobj(31), False
                else:
                    data = d.unconsumed_tail
    except zlib.error as e:
        raise _BadEncoding(f"corrupt gzip Content-Encoding ({e})") from None
    if fed and not d.eof:
        raise _BadEncoding("corrupt gzip Content-Encoding (truncated)")


def _decoded(resp: httpx.Response) -> Iterator[bytes]:
    """The response body as sent (httpx's decoders are not used: they inflate a whole network read at
    once), each Content-Encoding undone with bounded output; an unknown encoding raises _BadEncoding."""
    codings = [c.strip().lower() for c in ",".join(resp.headers.get_list("Content-Encoding")).split(",")]
    codings = [c for c in codings if c and c != "identity"]
    unknown = [c for c in codings if c not in ENCODINGS]
    if unknown or len(codings) > MAX_ENCODINGS:
        raise _BadEncoding(f"unsupported Content-Encoding {(unknown or codings)[0]!r}")
    chunks: Iterator[bytes] = resp.iter_raw()
    for _ in codings:
        chunks = _gunzip(chunks)
    return chunks


class _Body(io.RawIOBase):
    """Chunks as a raw stream, cut after `limit` + 1 bytes (the size check then fails)."""

    def __init__(self, chunks: Iterator[bytes], limit: int):
        self.chunks = chunks
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

    Every request is one transfer with a deadline: $XBUILD_REGISTRY_DEADLINE seconds (default 300) plus a
    second per MIN_RATE bytes of a blob, for all its tries, redirects and backoff together; a try fails
    when no byte comes for $XBUILD_REGISTRY_STALL_TIMEOUT seconds (default `stall`). Bodies are read
    streamed, never decoded by more than CHUNK bytes at a time, and capped: JSON documents at their
    `limit`, blobs at their size, any other answer at ERROR_LIMIT.
    """

    def __init__(
        self,
        registry: str,
        repository: str,
        *,
        what: str,
        scopes: Mapping[str, str] | None = None,
        insecure: bool = False,
        error: type[XbuildError] = SourceError,
        stall: float = 60.0,
        no_credentials_hint: str = "",
        check_hint: str = "check credentials in {config}",
    ):
        self.registry, self.repository, self.what, self.error = registry, repository, what, error
        self.base = f"{endpoint(registry, insecure)}/v2/{repository}"
        self.scopes = dict(scopes or {repository: "pull"})
        self.stall = _seconds(STALL_ENV, stall)
        self.deadline = _seconds(DEADLINE_ENV, 300.0)
        self.no_credentials_hint, self.check_hint = no_credentials_hint, check_hint
        self.authorization: str | None = None
        self._creds: auth.Credentials | None = None
        self._creds_read = False
        self._http: httpx.Client | None = None
        self._entered = 0

    def __enter__(self) -> Self:
        if self._http is None:
            timeout = httpx.Timeout(self.stall, connect=min(CONNECT_TIMEOUT, self.stall))
            self._http = httpx.Client(
                timeout=timeout,
                transport=_Transport(),
                follow_redirects=False,
                headers={"User-Agent": f"xbuild/{__version__}", "Accept-Encoding": "identity"},
            )
        self._entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered -= 1
        if self._entered == 0 and self._http is not None:
            self._http.close()
            self._http = None

    def send(
        self,
        method: str,
        url: str | httpx.URL,
        headers: dict[str, str] | None = None,
        content: Body | None = None,
        authorize: bool = True,
        data: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send a request, answering one 401 challenge and retrying transient failures with backoff.

        Returns any other response, its body read (at most ERROR_LIMIT bytes of it: enough for `errors`);
        401/403 after authenticating (or, with `authorize` False, at once) raise `error`, a host still
        unreachable or failing (5xx, 429) after RETRIES tries or past the deadline raises
        RegistryUnavailable. `content` is sent again on each try.
        """
        size = content.stat().st_size if isinstance(content, Path) else 0
        return self._request(
            method,
            url,
            self._kept,
            f"{method} {urlsplit(str(url)).path}",
            headers,
            content,
            authorize,
            data,
            size,
        )

    def fetch(
        self,
        url: str | httpx.URL,
        what: str,
        limit: int,
        failure: Callable[[httpx.Response], Exception],
        headers: dict[str, str] | None = None,
        *,
        method: str = "GET",
        authorize: bool = True,
        data: dict[str, str] | None = None,
    ) -> tuple[bytes, httpx.Headers]:
        """(body, headers) of a 200 answer, for JSON documents (manifests, indexes, tokens): the body read
        streamed and refused as soon as it passes `limit` bytes (a Content-Length above it: unread), a
        response cut off retried. Another status raises `failure(response)`; `what` names the document."""

        def read(resp: httpx.Response) -> tuple[bytes, httpx.Headers]:
            if resp.status_code != 200:
                raise failure(self._kept(resp))
            too_large = self.error(f"{self.what}: {what} larger than {format_size(limit)}")
            length = resp.headers.get("Content-Length", "")
            if is_decimal(length) and int(length) > limit and "Content-Encoding" not in resp.headers:
                raise too_large
            body = bytearray()
            for chunk in self._body(resp, what):
                body += chunk
                if len(body) > limit:
                    raise too_large
            return bytes(body), resp.headers

        return self._request(method, url, read, what, headers, None, authorize, data, 0)

    def download(
        self,
        url: str,
        digest: str,
        size: int,
        what: str,
        failure: Callable[[httpx.Response], Exception],
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """The blob `digest` in the blob cache, downloaded from `url` and verified first if missing; a
        download cut off is tried again. A response other than 200 raises `failure(response)`. No more
        than `size` + 1 bytes are read (then the size check fails)."""
        path = blob_path(digest)
        if path.exists():
            return path
        with self.own_errors():
            check_digest(digest, what)
        subject = what.removeprefix(f"{self.what} ")  # `what` may name the image: messages do first

        def store(resp: httpx.Response) -> Path:
            if resp.status_code != 200:
                raise failure(self._kept(resp))
            with self.own_errors():  # a download that does not match its digest or size
                body = io.BufferedReader(_Body(self._body(resp, subject), size), CHUNK)
                return store_blob(body, digest, what, size, progress)

        return self._request("GET", url, store, subject, None, None, True, None, size)

    def _request(
        self,
        method: str,
        url: str | httpx.URL,
        consume: Callable[[httpx.Response], T],
        what: str,
        headers: dict[str, str] | None,
        content: Body | None,
        authorize: bool,
        data: dict[str, str] | None,
        size: int,
    ) -> T:
        """One transfer: `consume(response)` of the final answer (not a 401 challenge, 5xx or 429), under
        the transfer's deadline, retried on transient failures (also while `consume` reads the body)."""
        assert self._http is not None, "RegistryClient used outside its `with` block"
        host = urlsplit(str(url)).netloc
        who = f"registry {host}" if authorize else f"token server {host}"
        seconds = self.deadline + size / MIN_RATE
        deadline = time.monotonic() + seconds
        late = f"{self.what}: {what}: not received from {who} within {seconds:.0f} s ({DEADLINE_ENV})"
        reset = _deadline.set(deadline)
        challenged = not authorize
        attempt = 0
        try:
            while True:
                hdrs = dict(headers or {})
                if authorize and self.authorization:
                    hdrs["Authorization"] = self.authorization
                body = _chunks(content) if isinstance(content, Path) else content
                request = self._http.build_request(method, url, headers=hdrs, content=body, data=data)
                retry_after = None
                try:
                    with contextlib.closing(self._send(request, what)) as resp:
                        if resp.status_code == 401 and not challenged:
                            self._authenticate(self._kept(resp))
                            challenged = True
                            continue
                        if resp.status_code in (401, 403):
                            raise self.denied(self._kept(resp))
                        if resp.status_code != 429 and resp.status_code < 500:
                            return consume(resp)
                        failure = f"failing (HTTP {resp.status_code})"
                        retry_after = resp.headers.get("Retry-After")
                except httpx.TransportError as e:
                    failure = self._transport_failure(e, host)
                    if time.monotonic() >= deadline:
                        raise RegistryUnavailable(f"{late}; last try: {failure}") from None
                attempt += 1
                if attempt >= RETRIES:
                    raise RegistryUnavailable(f"{self.what}: {what}: {who} {failure} after {RETRIES} tries")
                delay = float(os.environ.get(RETRY_DELAY_ENV) or 0.5) * 2 ** (attempt - 1)
                if retry_after and is_decimal(retry_after):
                    wait = min(float(retry_after), RETRY_AFTER_MAX)
                    if time.monotonic() + wait > deadline:
                        raise RegistryUnavailable(
                            f"{self.what}: {what}: {who} {failure} and asks to retry "
                            f"after {retry_after} s (Retry-After), past the "
                            f"{seconds:.0f} s deadline ({DEADLINE_ENV})"
                        )
                    delay = max(delay, wait)
                if time.monotonic() + delay > deadline:
                    raise RegistryUnavailable(f"{late}; last try: {failure}")
                time.sleep(delay)
        finally:
            _deadline.reset(reset)

    def _transport_failure(self, e: httpx.TransportError, host: str) -> str:
        """What went wrong with a try, for the message; a TLS failure is final (raised)."""
        if _is_tls(e):
            raise self.error(
                f"{self.what}: TLS with {host} failed ({e}); for a plain-HTTP registry "
                "use the insecure option"
            ) from None
        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            return f"stalled (no data for {self.stall:g} s, {STALL_ENV})"
        return f"unreachable ({str(e) or type(e).__name__})"

    def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        """Send `request`, following at most MAX_REDIRECTS redirects to http(s) URLs; the final response's
        body is not read (a redirect's is never read)."""
        assert self._http is not None
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._http.send(request, stream=True)
            if resp.next_request is None:
                return resp
            resp.close()
            request, location = resp.next_request, resp.headers.get("Location", "")[:200]
            if request.url.scheme not in ("http", "https"):
                raise self.error(f"{self.what}: {what} redirected to a non-http(s) URL {location!r}")
        raise self.error(
            f"{self.what}: {what}: too many redirects (more than {MAX_REDIRECTS}, the last to {location!r})"
        )

    def _body(self, resp: httpx.Response, what: str) -> Iterator[bytes]:
        """The body of `resp` decoded with bounded output; a bad encoding raises `error`; the deadline is
        checked between chunks too (for connections the deadline's transport does not carry: proxies)."""
        try:
            for chunk in _decoded(resp):
                at = _deadline.get()
                if at is not None and time.monotonic() >= at:
                    raise httpx.ReadTimeout("the transfer's deadline has passed")
                yield chunk
        except _BadEncoding as e:
            raise self.error(f"{self.what}: {what}: the registry sent {e}") from None

    def _kept(self, resp: httpx.Response) -> httpx.Response:
        """`resp` with its body read: at most ERROR_LIMIT bytes, decoded (a body that cannot be decoded
        is left empty: the status still tells)."""
        body = bytearray()
        try:
            for chunk in _decoded(resp):
                body += chunk
                if len(body) >= ERROR_LIMIT:
                    break
        except _BadEncoding:
            body.clear()
        headers = [
            (k, v)
            for k, v in resp.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            resp.status_code, headers=headers, content=bytes(body[:ERROR_LIMIT]), request=resp.request
        )

    def credentials(self) -> auth.Credentials | None:
        """The registry's credentials from docker's config (read once), or None."""
        if not self._creds_read:
            with self.own_errors():
                self._creds = auth.credentials(self.registry)
            self._creds_read = True
        return self._creds

    @contextlib.contextmanager
    def own_errors(self) -> Iterator[None]:
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
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL:
            realm_url = None
        if realm_url is None or realm_url.scheme not in ("http", "https") or not realm_url.host:
            raise self.error(f"{self.what}: the registry's token realm {realm[:200]!r} is not an http(s) URL")
        # ours, and what the challenge asks about other repositories (the source of a mount)
        ours = [f"repository:{repo}:{actions}" for repo, actions in self.scopes.items()]
        mine = tuple(f"repository:{repo}:" for repo in self.scopes)
        scopes = ours + [s for s in (challenge.params.get("scope") or "").split() if not s.startswith(mine)]
        service = {"service": challenge.params["service"]} if challenge.params.get("service") else {}

        def failure(answer: httpx.Response) -> Exception:
            return self.error(f"{self.what}: token request to {realm} failed (HTTP {answer.status_code})")

        what = f"token from {realm[:200]}"
        if creds and creds.identity_token:
            raw, _ = self.fetch(
                realm_url,
                what,
                TOKEN_LIMIT,
                failure,
                method="POST",
                authorize=False,
                data={
                    "scope": " ".join(scopes),
                    **service,
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "xbuild",
                },
            )
        else:
            query: list[tuple[str, str | int | float | bool | None]] = [("scope", s) for s in scopes]
            query += service.items()
            raw, _ = self.fetch(
                realm_url.copy_merge_params(query),
                what,
                TOKEN_LIMIT,
                failure,
                {"Authorization": creds.basic()} if creds else None,
                authorize=False,
            )
        try:
            doc = json.loads(raw)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise self.error(f"{self.what}: token server {realm} answered without a token")
        self.authorization = f"Bearer {token}"

    def denied(self, resp: httpx.Response) -> XbuildError:
        """The error for a refused request: which credentials were used, and where they are configured."""
        hint = (
            "the credentials were refused"
            if self.credentials()
            else f"no credentials for {self.registry}{self.no_credentials_hint}"
        )
        check = self.check_hint.format(config=auth.config_path())
        error = self.error(f"{self.what}: access denied ({status(resp)}); {hint}: {check}")
        error.denied = True
        return error
