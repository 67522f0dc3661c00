"""Registry credentials and auth challenges.

Credentials come from docker's config file (`$DOCKER_CONFIG/config.json`, default `~/.docker/config.json`):
a `credHelpers` entry for the host, else `credsStore`, else `auths.<host>` (`auth` = base64 `user:pass`,
or `username`/`password`, or `identitytoken`). Docker Hub is stored under `https://index.docker.io/v1/`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SourceError

HUB_SERVER = "https://index.docker.io/v1/"
_HUB_HOSTS = frozenset({"index.docker.io", "docker.io", "registry-1.docker.io"})
_PARAM = re.compile(r'([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Credentials:
    """A user name and password, or an OAuth2 refresh token (docker's `identitytoken`)."""

    username: str
    password: str
    identity_token: str | None = None

    def basic(self) -> str:
        """The `Authorization` header value for HTTP Basic auth."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme (lowercase) and its parameters (keys lowercase)."""

    scheme: str
    params: dict[str, str]


def config_path() -> Path:
    """Docker's client config file, honouring `$DOCKER_CONFIG`."""
    d = os.environ.get("DOCKER_CONFIG")
    return Path(d) / "config.json" if d else Path.home() / ".docker" / "config.json"


def parse_challenge(header: str) -> Challenge | None:
    """Parse `Bearer realm="…",service="…",scope="…"` (or `Basic realm=…`); None if empty."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m[1].lower(): (re.sub(r"\\(.)", r"\1", m[2]) if m[2] is not None else m[3])
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def pick_challenge(headers: list[str]) -> Challenge | None:
    """The challenge to answer among a response's `WWW-Authenticate` headers: Bearer first, then Basic."""
    found = [c for c in map(parse_challenge, headers) if c and c.scheme in ("bearer", "basic")]
    found.sort(key=lambda c: c.scheme != "bearer")
    return found[0] if found else None


def _hostname(key: str) -> str:
    return key.removeprefix("https://").removeprefix("http://").split("/", 1)[0]


def credentials(registry: str) -> Credentials | None:
    """Credentials configured for `registry` (a reference's registry, e.g. `docker.io`), or None."""
    path = config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: unreadable docker config ({e})") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: docker config is not a JSON object")
    hosts = _HUB_HOSTS if registry == "docker.io" else {registry}
    helpers = doc.get("credHelpers") or {}
    auths = doc.get("auths") or {}
    if not isinstance(helpers, dict) or not isinstance(auths, dict):
        raise SourceError(f"{path}: credHelpers and auths must be objects")
    helper = next((v for k, v in helpers.items() if _hostname(k) in hosts), None) or doc.get("credsStore")
    key, entry = next(
        ((k, v) for k, v in auths.items() if _hostname(k) in hosts),
        (HUB_SERVER if registry == "docker.io" else registry, None),
    )
    if helper:
        creds = _from_helper(str(helper), key, path)
        if creds:
            return creds
    return _from_entry(entry, path) if isinstance(entry, dict) else None


def _from_entry(entry: dict[str, Any], path: Path) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials(str(entry.get("username") or ""), "", str(entry["identitytoken"]))
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise SourceError(f"{path}: an auths entry's `auth` is not base64 of user:password")
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password") or ""))
    return None


def _from_helper(name: str, server: str, path: Path) -> Credentials | None:
    """Ask `docker-credential-<name> get` for `server`; None when it has nothing stored."""
    program = f"docker-credential-{name}"
    try:
        done = subprocess.run(
            [program, "get"], check=False, input=server, capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise SourceError(f"credential helper {program} (configured in {path}) is not installed") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"credential helper {program} did not answer within 60 s") from None
    if done.returncode != 0:
        if "credentials not found" in (done.stdout + done.stderr).lower():
            return None
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        detail = lines[0] if lines else f"exit status {done.returncode}"
        raise SourceError(f"credential helper {program} failed for {server}: {detail}")
    try:
        doc = json.loads(done.stdout)
        user, secret = str(doc["Username"]), str(doc["Secret"])
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"credential helper {program} gave an unreadable answer for {server}") from None
    return Credentials("", "", secret) if user == "<token>" else Credentials(user, secret)
