"""The registry source against a real docker-registry (distribution 2.8) on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.blobs import blob_path
from builder.errors import RegistryUnavailable, SourceError
from builder.image import Platform
from builder.oci import auth, client
from builder.oci.manifest import OCI_INDEX
from builder.reference import parse
from builder.source import SourceOptions, load
from tests.fixtures.images import file, write_oci_image
from tests.fixtures.registry import Registry, RegistryProxy, TokenIssuer, free_port

LAYERS = [[file("etc/a.txt", b"a" * 1000)], [file("etc/b.txt", b"b\n")], [file("bin/c", b"c", mode=0o755)]]


@pytest.fixture(autouse=True)
def _isolated(xbuild_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache, no docker credentials of the user's, fast retries."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    monkeypatch.setenv(client.RETRY_DELAY_ENV, "0.01")


@pytest.fixture
def proxy(registry: Registry) -> Iterator[RegistryProxy]:
    p = RegistryProxy(registry.url)
    yield p
    p.close()


def push(
    reg: Registry,
    tmp_path: Path,
    dest: str,
    layers: list[Any] = LAYERS,
    arch: str = "amd64",
    config: dict[str, Any] | None = None,
) -> None:
    """Write a small OCI image and push it to `dest` (`repo:tag`)."""
    layout = tmp_path / "oci" / dest.replace("/", "_").replace(":", "_")
    write_oci_image(
        layout,
        "img",
        layers,
        config or {"Cmd": ["/bin/c"], "Env": ["A=1"]},
        image_config={"architecture": arch},
    )
    reg.push(layout, "img", dest)


def manifest_digest(reg: Registry, repo: str, tag: str) -> str:
    return "sha256:" + hashlib.sha256(reg.manifest(repo, tag)[0]).hexdigest()


def write_docker_config(tmp_path: Path, doc: dict[str, Any]) -> None:
    d = tmp_path / "docker-config"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(doc))


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- pulls, caching, digests ----------------------------------------------------------------------


def test_pull_layers_lazily_with_progress(registry: Registry, proxy: RegistryProxy, tmp_path: Path) -> None:
    push(registry, tmp_path, "pull/app:v1")
    calls: list[tuple[str, int, list[int]]] = []

    def progress(label: str, total: int) -> Callable[[int], None]:
        calls.append((label, total, []))
        return calls[-1][2].append

    img = load(parse(f"{proxy.host}/pull/app:v1"), SourceOptions(progress=progress))
    assert img.manifest_digest == manifest_digest(registry, "pull/app", "v1")
    assert img.config.cmd == ("/bin/c",) and img.config.env == ("A=1",)
    assert img.platform == Platform("linux", "amd64")
    assert len(img.layers) == 3 and img.layers[0].compression == "gzip"
    assert not proxy.blob_gets()[1:], "only the config is fetched before a layer is opened"
    for layer in img.layers:
        with layer.open() as f:
            assert sha256_of(f.read()) == layer.digest
        assert blob_path(layer.digest).exists()
    assert [(label, total) for label, total, _ in calls] == [
        (f"layer {x.digest[:19]}", x.size) for x in img.layers
    ]
    assert [sum(n) for _, _, n in calls] == [x.size for x in img.layers]
    assert len(proxy.blob_gets()) == 4  # config + 3 layers
    assert blob_path(img.manifest_digest).exists() and blob_path(img.config_digest).exists()


def test_second_load_of_a_tag_pulls_no_blobs(
    registry: Registry, proxy: RegistryProxy, tmp_path: Path
) -> None:
    push(registry, tmp_path, "warm/app:v1")
    ref = parse(f"{proxy.host}/warm/app:v1")
    for layer in load(ref, SourceOptions()).layers:
        layer.open().close()
    proxy.requests.clear()
    img = load(ref, SourceOptions(progress=lambda label, total: pytest.fail("nothing to download")))
    for layer in img.layers:
        layer.open().close()
    assert proxy.requests == [("HEAD", "/v2/warm/app/manifests/v1")]


def test_retagged_image_is_pulled_again(registry: Registry, proxy: RegistryProxy, tmp_path: Path) -> None:
    push(registry, tmp_path, "moving/app:latest")
    first = load(parse(f"{proxy.host}/moving/app"), SourceOptions())
    push(registry, tmp_path, "moving/app:latest", config={"Cmd": ["/bin/new"]})
    second = load(parse(f"{proxy.host}/moving/app"), SourceOptions())
    assert second.manifest_digest != first.manifest_digest and second.config.cmd == ("/bin/new",)


def test_pin_by_digest_and_cached_pin_needs_no_request(
    registry: Registry, proxy: RegistryProxy, tmp_path: Path
) -> None:
    push(registry, tmp_path, "pin/app:v1")
    digest = manifest_digest(registry, "pin/app", "v1")
    img = load(parse(f"{proxy.host}/pin/app@{digest}"), SourceOptions())
    assert img.manifest_digest == digest
    proxy.requests.clear()
    assert load(parse(f"{proxy.host}/pin/app:v1@{digest}"), SourceOptions()).manifest_digest == digest
    assert proxy.requests == []
    with pytest.raises(SourceError, match="manifest unknown"):
        load(parse(f"{proxy.host}/pin/app@sha256:{'0' * 64}"), SourceOptions())


def test_unknown_tag_and_repository(registry: Registry, tmp_path: Path) -> None:
    push(registry, tmp_path, "known/app:v1")
    for ref in (f"{registry.host}/known/app:nope", f"{registry.host}/unknown/app:v1"):
        with pytest.raises(SourceError, match=r"^docker://.*: manifest unknown \(no such image or tag\)$"):
            load(parse(ref), SourceOptions())


# ---- manifest lists and platforms -----------------------------------------------------------------


def test_index_resolved_to_platform(registry: Registry, tmp_path: Path) -> None:
    push(registry, tmp_path, "multi/app:amd64", arch="amd64")
    push(registry, tmp_path, "multi/app:arm64", layers=[[file("arm", b"arm64")]], arch="arm64")
    entries = []
    for arch in ("amd64", "arm64"):
        raw, media_type = registry.manifest("multi/app", arch)
        entries.append(
            {
                "mediaType": media_type,
                "digest": sha256_of(raw),
                "size": len(raw),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = registry.put_manifest(
        "multi/app", "v1", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX
    )
    ref = parse(f"{registry.host}/multi/app:v1")
    amd = load(ref, SourceOptions())
    assert amd.manifest_digest == entries[0]["digest"] and len(amd.layers) == 3
    arm = load(ref, SourceOptions(platform=Platform("linux", "arm64")))
    assert arm.manifest_digest == entries[1]["digest"] and arm.platform.architecture == "arm64"
    pinned = load(parse(f"{registry.host}/multi/app@{index}"), SourceOptions())
    assert pinned.manifest_digest == amd.manifest_digest
    with pytest.raises(SourceError, match=r"platform linux/s390x \(has: linux/amd64, linux/arm64\)"):
        load(ref, SourceOptions(platform=Platform("linux", "s390x")))


def test_single_manifest_for_another_platform(registry: Registry, tmp_path: Path) -> None:
    push(registry, tmp_path, "armonly/app:v1", arch="arm64")
    with pytest.raises(SourceError, match="image is for linux/arm64, not linux/amd64"):
        load(parse(f"{registry.host}/armonly/app:v1"), SourceOptions())


# ---- corrupt content -------------------------------------------------------------------------------


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_layer_is_rejected_and_not_cached(
    registry_factory: Callable[..., Registry], tmp_path: Path
) -> None:
    reg = registry_factory()
    push(reg, tmp_path, "bad/app:v1")
    img = load(parse(f"{reg.host}/bad/app:v1"), SourceOptions())
    bad = img.layers[1]
    corrupt(reg.blob_file(bad.digest))
    with pytest.raises(SourceError, match=f"layer {bad.digest}: digest mismatch"):
        bad.open()
    assert not blob_path(bad.digest).exists()
    with img.layers[0].open() as f:
        assert sha256_of(f.read()) == img.layers[0].digest


def test_corrupt_manifest_and_config(registry_factory: Callable[..., Registry], tmp_path: Path) -> None:
    reg = registry_factory()
    push(reg, tmp_path, "bad/one:v1")
    push(reg, tmp_path, "bad/two:v1", layers=[[file("other", b"x")]])
    digest = manifest_digest(reg, "bad/one", "v1")
    corrupt(reg.blob_file(digest))
    with pytest.raises(SourceError, match=f"manifest: digest mismatch \\(expected {digest}\\)"):
        load(parse(f"{reg.host}/bad/one:v1"), SourceOptions())
    config = json.loads(reg.manifest("bad/two", "v1")[0])["config"]["digest"]
    corrupt(reg.blob_file(config))
    with pytest.raises(SourceError, match=f"config {config}: digest mismatch"):
        load(parse(f"{reg.host}/bad/two:v1"), SourceOptions())


# ---- retries and unreachable registries -----------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_are_retried(registry: Registry, tmp_path: Path, status: int) -> None:
    push(registry, tmp_path, "flaky/app:v1")
    proxy = RegistryProxy(registry.url, fail=3, fail_status=status)
    try:
        img = load(parse(f"{proxy.host}/flaky/app:v1"), SourceOptions())
        assert img.manifest_digest == manifest_digest(registry, "flaky/app", "v1")
        assert proxy.requests[:4] == [("HEAD", "/v2/flaky/app/manifests/v1")] * 4
        proxy.fail = 2
        with img.layers[0].open() as f:
            assert sha256_of(f.read()) == img.layers[0].digest
    finally:
        proxy.close()


def test_cut_download_is_retried(registry: Registry, proxy: RegistryProxy, tmp_path: Path) -> None:
    push(registry, tmp_path, "cut/app:v1")
    img = load(parse(f"{proxy.host}/cut/app:v1"), SourceOptions())
    proxy.cut = 2
    with img.layers[0].open() as f:
        assert sha256_of(f.read()) == img.layers[0].digest
    assert len([p for p in proxy.blob_gets() if img.layers[0].digest in p]) == 3
    proxy.cut = 10
    with pytest.raises(RegistryUnavailable, match=f"{img.layers[1].digest}: registry .* after 4 tries$"):
        img.layers[1].open()
    assert not blob_path(img.layers[1].digest).exists()


def test_persistent_5xx_gives_up(registry: Registry) -> None:
    proxy = RegistryProxy(registry.url, fail=100, fail_status=502)
    try:
        with pytest.raises(RegistryUnavailable, match=r"failing \(HTTP 502\) after 4 tries$"):
            load(parse(f"{proxy.host}/any/app:v1"), SourceOptions())
        assert len(proxy.requests) == client.RETRIES
    finally:
        proxy.close()


def test_forbidden_is_not_retried(registry: Registry) -> None:
    proxy = RegistryProxy(registry.url, fail=1, fail_status=403)
    try:
        with pytest.raises(SourceError, match=r"access denied \(HTTP 403\); no credentials for 127.0.0.1"):
            load(parse(f"{proxy.host}/any/app:v1"), SourceOptions())
        assert len(proxy.requests) == 1
    finally:
        proxy.close()


def test_unreachable_registry() -> None:
    ref = parse(f"127.0.0.1:{free_port()}/any/app:v1")
    with pytest.raises(RegistryUnavailable, match=r"unreachable \(.*Connection refused\) after 4 tries$"):
        load(ref, SourceOptions())


def serve(handler: Callable[[http.server.BaseHTTPRequestHandler], None]) -> http.server.ThreadingHTTPServer:
    """A throwaway HTTP server on 127.0.0.1 answering every request with `handler`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            handler(self)

        do_GET = do_HEAD = do_POST = _any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def reply(
    h: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def test_https_to_a_plain_http_registry_is_a_clear_error() -> None:
    server = serve(lambda h: reply(h, 400))
    try:  # 127.1 is 127.0.0.1 to the resolver but not a loopback literal, so HTTPS is used
        with pytest.raises(SourceError, match="TLS with 127.1:.* failed .*use the insecure option"):
            load(parse(f"127.1:{server.server_address[1]}/any/app:v1"), SourceOptions())
    finally:
        server.shutdown()


def test_schema1_manifest_is_refused() -> None:
    doc = json.dumps({"schemaVersion": 1, "name": "old/app", "tag": "v1", "fsLayers": []}).encode()
    server = serve(
        lambda h: reply(
            h, 200, doc, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
        )
    )
    try:
        with pytest.raises(SourceError, match="schema 1 manifests are not supported"):
            load(parse(f"127.0.0.1:{server.server_address[1]}/old/app:v1"), SourceOptions())
    finally:
        server.shutdown()


def test_endpoint_scheme() -> None:
    assert client.endpoint("docker.io") == "https://registry-1.docker.io"
    assert client.endpoint("ghcr.io") == "https://ghcr.io"
    assert client.endpoint("registry.lan:5000", insecure=True) == "http://registry.lan:5000"
    for host in ("localhost:5000", "localhost", "127.0.0.1:5000", "127.3.2.1", "[::1]:5000"):
        assert client.endpoint(host).startswith("http://"), host


# ---- auth -----------------------------------------------------------------------------------------


@pytest.fixture
def basic_registry(registry_factory: Callable[..., Registry], tmp_path: Path) -> Registry:
    """A registry with htpasswd auth (user alice, password s3cret)."""
    if not (htpasswd := shutil.which("htpasswd")):
        pytest.skip("htpasswd is needed (apt-get install apache2-utils)")
    users = tmp_path / "htpasswd"
    subprocess.run([htpasswd, "-Bbc", str(users), "alice", "s3cret"], check=True, capture_output=True)
    reg = registry_factory(
        auth={"htpasswd": {"realm": "xbuild-test", "path": str(users)}}, creds="alice:s3cret"
    )
    reg.headers["Authorization"] = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    push(reg, tmp_path, "private/app:v1")
    return reg


def test_basic_auth_without_credentials(basic_registry: Registry) -> None:
    with pytest.raises(
        SourceError,
        match=r"access denied \(HTTP 401.*\); no credentials for 127.0.0.1:\d+.*"
        r"check credentials in .*docker-config/config.json$",
    ):
        load(parse(f"{basic_registry.host}/private/app:v1"), SourceOptions())


@pytest.mark.parametrize(
    "entry",
    [{"auth": base64.b64encode(b"alice:s3cret").decode()}, {"username": "alice", "password": "s3cret"}],
)
def test_basic_auth_with_docker_config(
    basic_registry: Registry, tmp_path: Path, entry: dict[str, str]
) -> None:
    write_docker_config(tmp_path, {"auths": {f"http://{basic_registry.host}": entry}})
    img = load(parse(f"{basic_registry.host}/private/app:v1"), SourceOptions())
    with img.layers[0].open() as f:
        assert sha256_of(f.read()) == img.layers[0].digest


def test_basic_auth_with_wrong_password(basic_registry: Registry, tmp_path: Path) -> None:
    write_docker_config(tmp_path, {"auths": {basic_registry.host: {"username": "alice", "password": "nope"}}})
    with pytest.raises(SourceError, match="access denied .*the credentials were refused"):
        load(parse(f"{basic_registry.host}/private/app:v1"), SourceOptions())


def write_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str, status: int = 0) -> Path:
    """A `docker-credential-fake` on PATH printing `answer`; it saves the server URL it was asked about."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    helper = bindir / "docker-credential-fake"
    helper.write_text(
        f'#!/bin/sh\ntest "$1" = get || exit 3\ncat > {tmp_path}/asked\n'
        f"printf '%s' '{answer}'\nexit {status}\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "asked"


def test_credential_helper(basic_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = write_helper(
        tmp_path, monkeypatch, json.dumps({"ServerURL": "", "Username": "alice", "Secret": "s3cret"})
    )
    write_docker_config(tmp_path, {"credHelpers": {basic_registry.host: "fake"}})
    assert load(parse(f"{basic_registry.host}/private/app:v1"), SourceOptions()).layers
    assert asked.read_text() == basic_registry.host


def test_creds_store_with_nothing_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = write_helper(tmp_path, monkeypatch, "credentials not found in native keychain", status=1)
    hub = {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}
    write_docker_config(tmp_path, {"credsStore": "fake", "auths": hub})
    assert auth.credentials("docker.io") == auth.Credentials("u", "p")
    assert asked.read_text() == "https://index.docker.io/v1/"
    write_docker_config(tmp_path, {"credsStore": "missing-helper"})
    with pytest.raises(SourceError, match="docker-credential-missing-helper .* is not installed"):
        auth.credentials("ghcr.io")


def test_credentials_lookup(tmp_path: Path) -> None:
    assert auth.credentials("docker.io") is None  # no config file
    hub = base64.b64encode(b"hubuser:pw:with:colons").decode()
    write_docker_config(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": hub},
                "registry.lan:5000": {"identitytoken": "refresh"},
            }
        },
    )
    assert auth.credentials("docker.io") == auth.Credentials("hubuser", "pw:with:colons")
    assert auth.credentials("registry.lan:5000") == auth.Credentials("", "", "refresh")
    assert auth.credentials("registry.lan") is None
    write_docker_config(tmp_path, {"auths": {"x.io": {"auth": "bm90LWEtcGFpcg=="}}})
    with pytest.raises(SourceError, match="not base64 of user:password"):
        auth.credentials("x.io")


def test_parse_challenge() -> None:
    c = auth.parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull"'
    )
    assert c == auth.Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/nginx:pull",
        },
    )
    quoted = auth.parse_challenge('Basic realm="a \\"b\\", c"')
    assert quoted == auth.Challenge("basic", {"realm": 'a "b", c'})
    assert auth.parse_challenge("bearer realm=http://t/token , Scope=x") == auth.Challenge(
        "bearer", {"realm": "http://t/token", "scope": "x"}
    )
    both = ['Basic realm="r"', 'Bearer realm="t"']
    assert auth.pick_challenge(both) == auth.Challenge("bearer", {"realm": "t"})
    assert auth.pick_challenge(["Negotiate x"]) is None


@pytest.fixture
def token_registry(
    registry_factory: Callable[..., Registry], tmp_path: Path
) -> Iterator[tuple[Registry, TokenIssuer]]:
    """A registry with `auth: token:` and its issuer (user bob/hunter2, refresh token refresh-1 of bob)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to sign tokens")
    issuer = TokenIssuer(tmp_path / "issuer", {"bob": "hunter2"}, {"refresh-1": "bob"})
    reg = registry_factory(auth=issuer.auth_config, creds="bob:hunter2")
    push(reg, tmp_path, "tok/app:v1")
    issuer.requests.clear()
    yield reg, issuer
    issuer.close()


@pytest.mark.parametrize("token_key", ["token", "access_token"])
def test_bearer_token_anonymous(token_registry: tuple[Registry, TokenIssuer], token_key: str) -> None:
    reg, issuer = token_registry
    issuer.token_key = token_key
    img = load(parse(f"{reg.host}/tok/app:v1"), SourceOptions())
    with img.layers[0].open() as f:
        assert sha256_of(f.read()) == img.layers[0].digest
    assert issuer.requests[0] == ("GET", {"service": "xbuild-test", "scope": "repository:tok/app:pull"}, None)


def test_bearer_token_with_credentials(token_registry: tuple[Registry, TokenIssuer], tmp_path: Path) -> None:
    reg, issuer = token_registry
    write_docker_config(tmp_path, {"auths": {reg.host: {"username": "bob", "password": "hunter2"}}})
    assert load(parse(f"{reg.host}/tok/app:v1"), SourceOptions()).layers
    assert issuer.requests[0][2] == "Basic " + base64.b64encode(b"bob:hunter2").decode()
    write_docker_config(tmp_path, {"auths": {reg.host: {"username": "bob", "password": "wrong"}}})
    with pytest.raises(SourceError, match=r"access denied \(HTTP 401\); the credentials were refused"):
        load(parse(f"{reg.host}/tok/app:v1"), SourceOptions())


def test_bearer_token_from_identity_token(
    token_registry: tuple[Registry, TokenIssuer], tmp_path: Path
) -> None:
    reg, issuer = token_registry
    write_docker_config(tmp_path, {"auths": {reg.host: {"identitytoken": "refresh-1"}}})
    assert load(parse(f"{reg.host}/tok/app:v1"), SourceOptions()).layers
    method, form, _ = issuer.requests[0]
    assert method == "POST" and form["grant_type"] == "refresh_token" and form["refresh_token"] == "refresh-1"
