"""Recipes: per-image knowledge that static analysis cannot find, in `recipes/<name>.toml`.

    [match]
    repositories = ["library/nginx", "nginx"]     # repository names (registry host and tag ignored)
    [keep]
    paths = ["/usr/share/nginx"]                   # kept with everything below them
    globs = ["/usr/lib/nginx/modules/*.so"]
    [kernel]
    fragments = ["net"]                            # kernels/<name>.config added to the defaults
    cmdline = ["ip=dhcp"]                          # extra kernel command-line words
    [guest]
    memory = 128                                   # MiB
    [xen]
    bridge = "xenbr1"                              # dom0's bridge for xen.cfg's vif (default xenbr0)
    [smoke]                                        # exactly one of console / http / tcp
    console = "regex"                              # a regex the console output must match
    http = {port = 80, path = "/", expect = "Welcome"}
    tcp = {port = 6379, send = "PING\\r\\n", expect = "+PONG"}
    timeout = 60                                   # seconds (default 60)
    [trace]
    seconds = 5

Unknown tables or keys are errors (a typo must not silently weaken a recipe).
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .artifact import network_problem
from .errors import BadInput
from .options import memory_outside
from .reference import ImageRef
from .resources import data_dir

RECIPES_DIR = data_dir("recipes")


class RecipeError(BadInput):
    """A recipe file that is missing or malformed."""


@dataclass(frozen=True)
class Smoke:
    kind: str  # console | http | tcp
    console: str = ""  # regex (console)
    port: int = 0  # guest port (http, tcp)
    path: str = "/"  # http
    send: bytes = b""  # tcp
    expect: str = ""  # substring of the HTTP body / TCP answer
    timeout: float = 60.0


@dataclass(frozen=True)
class Recipe:
    name: str
    repositories: tuple[str, ...] = ()
    keep_paths: tuple[str, ...] = ()
    keep_globs: tuple[str, ...] = ()
    kernel_fragments: tuple[str, ...] = ()
    cmdline: tuple[str, ...] = ()
    memory: int | None = None
    bridge: str | None = None
    smoke: Smoke | None = None
    trace_seconds: float = 5.0
    source: str = field(default="", compare=False)
    sha256: str = field(default="", compare=False)  # of the file it was read from (build inputs)

    @property
    def guest_ports(self) -> tuple[int, ...]:
        """Guest ports the smoke test needs forwarded."""
        return (self.smoke.port,) if self.smoke and self.smoke.kind in ("http", "tcp") else ()


_SCHEMA: dict[str, set[str]] = {
    "match": {"repositories"},
    "keep": {"paths", "globs"},
    "kernel": {"fragments", "cmdline"},
    "guest": {"memory"},
    "xen": {"bridge"},
    "smoke": {"console", "http", "tcp", "timeout"},
    "trace": {"seconds"},
}


def parse_recipe(doc: Mapping[str, Any], name: str, source: str = "") -> Recipe:
    what = source or name

    def fail(msg: str) -> RecipeError:
        return RecipeError(f"recipe {what}: {msg}")

    for table, value in doc.items():
        if table not in _SCHEMA:
            raise fail(f"unknown table [{table}] (known: {', '.join(sorted(_SCHEMA))})")
        if not isinstance(value, dict):
            raise fail(f"[{table}] must be a table")
        for key in value:
            if key not in _SCHEMA[table]:
                raise fail(f"unknown key {table}.{key} (known: {', '.join(sorted(_SCHEMA[table]))})")

    def strings(table: str, key: str) -> tuple[str, ...]:
        v = doc.get(table, {}).get(key, [])
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise fail(f"{table}.{key} must be a list of non-empty strings")
        return tuple(v)

    def paths(key: str) -> tuple[str, ...]:
        ps = strings("keep", key)
        for p in ps:
            if not p.startswith("/"):
                raise fail(f"keep.{key}: {p!r} must be an absolute path")
        return ps

    memory = doc.get("guest", {}).get("memory")
    if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool)):
        raise fail("guest.memory must be an integer number of MiB")
    if memory is not None and (why := memory_outside(memory)):
        raise fail(f"guest.memory: {why}")
    bridge = doc.get("xen", {}).get("bridge")
    if bridge is not None and (not isinstance(bridge, str) or (why := network_problem(bridge))):
        raise fail(f"xen.bridge: {why if isinstance(bridge, str) else 'must be a string'}")
    seconds = doc.get("trace", {}).get("seconds", 5)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
        raise fail("trace.seconds must be a positive number")
    return Recipe(
        name=name,
        repositories=strings("match", "repositories"),
        keep_paths=paths("paths"),
        keep_globs=paths("globs"),
        kernel_fragments=strings("kernel", "fragments"),
        cmdline=strings("kernel", "cmdline"),
        memory=memory,
        bridge=bridge,
        smoke=_smoke(doc.get("smoke"), fail),
        trace_seconds=float(seconds),
        source=source,
    )


def _smoke(s: dict[str, Any] | None, fail: Any) -> Smoke | None:
    if not s:
        return None
    timeout = s.get("timeout", 60)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise fail("smoke.timeout must be a positive number of seconds")
    kinds = [k for k in ("console", "http", "tcp") if k in s]
    if len(kinds) != 1:
        raise fail("[smoke] needs exactly one of console, http, tcp")
    kind = kinds[0]
    if kind == "console":
        if not isinstance(s["console"], str) or not s["console"]:
            raise fail("smoke.console must be a non-empty regex string")
        try:
            re.compile(s["console"])
        except re.error as e:
            raise fail(f"smoke.console is not a valid regex ({e})") from None
        return Smoke("console", console=s["console"], timeout=float(timeout))
    spec = s[kind]
    allowed = {"http": {"port", "path", "expect"}, "tcp": {"port", "send", "expect"}}[kind]
    if not isinstance(spec, dict) or set(spec) - allowed:
        raise fail(f"smoke.{kind} must be an inline table with keys from {sorted(allowed)}")
    port = spec.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise fail(f"smoke.{kind}.port must be a port number")
    expect = spec.get("expect", "")
    if not isinstance(expect, str):
        raise fail(f"smoke.{kind}.expect must be a string")
    if kind == "http":
        path = spec.get("path", "/")
        if not isinstance(path, str) or not path.startswith("/"):
            raise fail("smoke.http.path must start with '/'")
        return Smoke("http", port=port, path=path, expect=expect, timeout=float(timeout))
    send = spec.get("send", "")
    if not isinstance(send, str):
        raise fail("smoke.tcp.send must be a string")
    return Smoke("tcp", port=port, send=send.encode(), expect=expect, timeout=float(timeout))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (recipes/<name>.toml) or by file path."""
    p = Path(name_or_path)
    if p.suffix != ".toml" and "/" not in str(name_or_path):
        p = RECIPES_DIR / f"{name_or_path}.toml"
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        known = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.toml")))
        raise RecipeError(f"recipe {name_or_path}: no such recipe ({p}); known: {known or 'none'}") from None
    except OSError as e:
        raise RecipeError(f"recipe {p}: cannot read ({e.strerror})") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {p}: not valid TOML ({e})") from None
    return replace(parse_recipe(doc, p.stem, str(p)), sha256=hashlib.sha256(raw).hexdigest())


def _repo_name(repository: str) -> str:
    """'docker.io/library/nginx:1.25@sha256:..' -> 'library/nginx'; a registry host is dropped."""
    r = repository.split("@", 1)[0]
    last = r.rsplit("/", 1)[-1]
    if ":" in last:
        r = r[: len(r) - len(last)] + last.split(":", 1)[0]
    parts = r.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "/".join(parts)


def recipe_for(ref_repository: str, recipes_dir: Path | None = None) -> Recipe | None:
    """The recipe whose [match] repositories names this repository (exact match on the repository
    path without registry host or tag; `library/x` and `x` are the same on Docker Hub)."""
    want = _repo_name(ref_repository)
    forms = {want}
    if want.startswith("library/"):
        forms.add(want[len("library/") :])
    elif "/" not in want:
        forms.add("library/" + want)
    for p in sorted((recipes_dir or RECIPES_DIR).glob("*.toml")):
        r = load_recipe(p)
        if any(_repo_name(x) in forms for x in r.repositories):
            return r
    return None


def recipe_for_ref(ref: ImageRef, recipes_dir: Path | None = None) -> Recipe | None:
    """The recipe for a parsed reference: by its repository, or for a local layout/archive by the
    name inside it (`oci:DIR:nginx` -> nginx)."""
    name = ref.repository or ref.name
    return recipe_for(name, recipes_dir) if name else None


def smoke_test(
    recipe: Recipe,
    console: bytes,
    host_port_map: Mapping[int, int] | None = None,
    deadline: float | None = None,
) -> tuple[bool, str]:
    """Check the recipe's smoke test against a running guest: the console output so far (console
    regex) or the guest port forwarded to 127.0.0.1:host_port_map[guest_port] (http / tcp). Retries
    network probes until `deadline` (time.monotonic(); default now + smoke.timeout).
    Returns (ok, message)."""
    s = recipe.smoke
    if s is None:
        return True, f"recipe {recipe.name} has no smoke test"
    if s.kind == "console":
        m = re.search(s.console.encode(), console)
        if m:
            return True, f"console matched {s.console!r}"
        return False, f"console never matched {s.console!r}"
    hp = (host_port_map or {}).get(s.port)
    if hp is None:
        return False, f"guest port {s.port} is not forwarded to the host"
    end = deadline if deadline is not None else time.monotonic() + s.timeout
    last = "no attempt"
    while True:
        ok, last = (_http if s.kind == "http" else _tcp)(s, hp)
        if ok or time.monotonic() >= end:
            return ok, last
        time.sleep(0.5)


def _http(s: Smoke, host_port: int) -> tuple[bool, str]:
    import httpx

    url = f"http://127.0.0.1:{host_port}{s.path}"
    try:
        r = httpx.get(url, timeout=5.0)
    except httpx.HTTPError as e:
        return False, f"GET {s.path} (guest port {s.port}): {type(e).__name__}: {e}"
    if r.status_code >= 400:
        return False, f"GET {s.path} (guest port {s.port}): HTTP {r.status_code}"
    if s.expect and s.expect not in r.text:
        return False, f"GET {s.path} (guest port {s.port}): body lacks {s.expect!r}"
    return True, f"GET {s.path} (guest port {s.port}): HTTP {r.status_code}" + (
        f", body has {s.expect!r}" if s.expect else ""
    )


def _tcp(s: Smoke, host_port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection(("127.0.0.1", host_port), timeout=5.0) as c:
            c.settimeout(5.0)
            if s.send:
                c.sendall(s.send)
            data = b""
            while not s.expect or s.expect.encode() not in data:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
                if not s.expect:
                    break
    except OSError as e:
        return False, f"tcp guest port {s.port}: {e}"
    if s.expect and s.expect.encode() not in data:
        return False, f"tcp guest port {s.port}: answer {data[:80]!r} lacks {s.expect!r}"
    return True, f"tcp guest port {s.port}: answered {data[:40]!r}"
