"""Recipes: the shipped ones parse, bad files fail clearly, matching, and the smoke checks."""

from __future__ import annotations

import http.server
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import BadInput
from builder.recipes import (
    RECIPES_DIR,
    Recipe,
    RecipeError,
    Smoke,
    load_recipe,
    recipe_for,
    recipe_for_ref,
    smoke_test,
)

SHIPPED = ["nginx", "redis", "python-web", "busybox-httpd", "static-hello"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_parse(name: str) -> None:
    r = load_recipe(name)
    assert r.name == name and r.smoke is not None and r.repositories
    for frag in r.kernel_fragments:
        assert (RECIPES_DIR.parent / "kernels" / f"{frag}.config").is_file(), frag


def test_nginx_recipe_details() -> None:
    r = load_recipe("nginx")
    assert r.smoke == Smoke("http", port=80, path="/", expect="Welcome to nginx", timeout=60.0)
    assert r.guest_ports == (80,) and r.memory == 128 and "/usr/share/nginx/html" in r.keep_paths
    assert load_recipe("redis").smoke.send == b"PING\r\n"  # type: ignore[union-attr]
    assert load_recipe("static-hello").guest_ports == ()


@pytest.mark.parametrize(
    "ref,name",
    [
        ("nginx", "nginx"),
        ("library/nginx", "nginx"),
        ("docker.io/library/nginx:1.25", "nginx"),
        ("registry.example.com:5000/nginx@sha256:" + "a" * 64, "nginx"),
        ("localhost/redis:7", "redis"),
        ("python-web", "python-web"),
        ("someone/nginx", None),
        ("nginx-unprivileged", None),
    ],
)
def test_recipe_for(ref: str, name: str | None) -> None:
    r = recipe_for(ref)
    assert (r.name if r else None) == name


BAD = [
    ("[match]\nrepositories = 'nginx'\n", "match.repositories must be a list"),
    ("[keep]\npaths = ['relative/path']\n", "must be an absolute path"),
    ("[keep]\npath = ['/x']\n", "unknown key keep.path"),
    ("[kepp]\n", r"unknown table \[kepp\]"),
    ("[guest]\nmemory = 'lots'\n", "guest.memory must be an integer"),
    ("[guest]\nmemory = 8\n", r"guest.memory: 8 MiB is outside 16\.\.65536"),
    ("[guest]\nmemory = 100000\n", r"guest.memory: 100000 MiB is outside 16\.\.65536"),
    ("[smoke]\nconsole = 'a'\nhttp = {port = 80}\n", "exactly one of"),
    ("[smoke]\nhttp = {port = 0}\n", "smoke.http.port must be a port"),
    ("[smoke]\nhttp = {port = 80, path = 'x'}\n", "must start with '/'"),
    ("[smoke]\ntcp = {port = 6379, recv = 'x'}\n", "inline table with keys"),
    ("[smoke]\nconsole = '(unclosed'\n", "not a valid regex"),
    ("[trace]\nseconds = -1\n", "trace.seconds must be a positive number"),
    ("not toml at all [\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,msg", BAD)
def test_bad_recipe_files(tmp_path: Path, text: str, msg: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=msg) as e:
        load_recipe(p)
    assert isinstance(e.value, BadInput) and str(p) in str(e.value)


def test_missing_recipe_lists_known() -> None:
    with pytest.raises(RecipeError, match="no such recipe.*known: .*nginx"):
        load_recipe("does-not-exist")


@pytest.mark.parametrize(
    "text,name",
    [
        ("nginx:1.25", "nginx"),
        ("docker.io/library/redis", "redis"),
        ("oci:/tmp/layout:nginx", "nginx"),
        ("oci:/tmp/layout", None),
        ("docker-archive:/tmp/x.tar", None),
    ],
)
def test_recipe_for_ref(text: str, name: str | None) -> None:
    from builder.reference import parse

    r = recipe_for_ref(parse(text))
    assert (r.name if r else None) == name


def test_recipe_for_custom_dir(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[match]\nrepositories = ['acme/app']\n")
    assert recipe_for("ghcr.io/acme/app:v1", tmp_path).name == "a"  # type: ignore[union-attr]
    assert recipe_for("acme/other", tmp_path) is None


# -- smoke checks --------------------------------------------------------------------------------


def test_console_smoke() -> None:
    r = Recipe("x", smoke=Smoke("console", console=r"hello \w+"))
    assert smoke_test(r, b"boot...\nhello world\n") == (True, "console matched 'hello \\\\w+'")
    ok, msg = smoke_test(r, b"kernel panic")
    assert not ok and "never matched" in msg
    assert smoke_test(Recipe("none"), b"")[0]


@pytest.fixture()
def http_port(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "index.html").write_text("<h1>Welcome to nginx!</h1>")

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):  # type: ignore[no-untyped-def]
            pass

    srv = socketserver.TCPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_http_smoke(http_port: int) -> None:
    r = Recipe("n", smoke=Smoke("http", port=80, path="/", expect="Welcome to nginx", timeout=2))
    ok, msg = smoke_test(r, b"", {80: http_port})
    assert ok, msg
    bad = Recipe("n", smoke=Smoke("http", port=80, path="/missing", expect="", timeout=0.5))
    ok, msg = smoke_test(bad, b"", {80: http_port})
    assert not ok and "HTTP 404" in msg
    ok, msg = smoke_test(r, b"", {})
    assert not ok and "not forwarded" in msg


def test_tcp_smoke_and_retry_until_deadline() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    def serve() -> None:
        time.sleep(0.7)  # the guest is still booting at first
        with socket.create_server(("127.0.0.1", port)) as srv:
            c, _ = srv.accept()
            with c:
                if c.recv(100) == b"PING\r\n":
                    c.sendall(b"+PONG\r\n")

    threading.Thread(target=serve, daemon=True).start()
    r = Recipe("r", smoke=Smoke("tcp", port=6379, send=b"PING\r\n", expect="+PONG", timeout=10))
    ok, msg = smoke_test(r, b"", {6379: port})
    assert ok, msg
    r2 = Recipe("r", smoke=Smoke("tcp", port=6379, send=b"PING\r\n", expect="+PONG", timeout=0.3))
    ok, msg = smoke_test(r2, b"", {6379: port})
    assert not ok and "tcp guest port 6379" in msg
