"""Image references: docker's normalisation and skopeo's transports.

nginx                         -> docker://docker.io/library/nginx:latest
localhost:5000/team/app:v1    -> docker://localhost:5000/team/app:v1
repo@sha256:…                 -> pinned by digest
oci:DIR[:REF]  oci-archive:FILE[:REF]  docker-archive:FILE[:REF]  docker-daemon:NAME[:TAG]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .errors import ReferenceError_

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "docker-daemon")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")
_SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST_RE = re.compile(r"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. Registry/daemon refs fill registry/repository/tag/digest; file
    transports fill path and, optionally, name (the tag inside the layout or archive)."""

    transport: str
    registry: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    path: str | None = None
    name: str | None = None
    explicit: bool = field(default=False, compare=False)  # `docker://` was written out (no daemon look-up)

    @property
    def is_remote(self) -> bool:
        return self.transport == "docker"

    @property
    def short_name(self) -> str:
        """A file-system friendly name for output directories (`nginx`, `app`)."""
        if self.repository:
            return self.repository.rsplit("/", 1)[-1]
        base = (self.name or self.path or "image").rstrip("/").rsplit("/", 1)[-1]
        base = base.rsplit(":", 1)[-1] if self.name else base
        return re.sub(r"\.(tar|tgz|tar\.gz|oci)$", "", base) or "image"

    @property
    def docker_name(self) -> str:
        """`registry/repository[:tag][@digest]` for registry and daemon refs."""
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    def __str__(self) -> str:
        if self.transport in ("docker", "docker-daemon"):
            return (
                f"{self.transport}://{self.docker_name}"
                if self.transport == "docker"
                else (f"docker-daemon:{self.docker_name}")
            )
        return f"{self.transport}:{self.path}" + (f":{self.name}" if self.name else "")


def parse(text: str) -> ImageRef:
    """Parse a user-given reference; raise ReferenceError_ naming what is wrong."""
    if not text or text != text.strip():
        raise ReferenceError_(f"invalid image reference {text!r}: empty or surrounded by spaces")
    if text.startswith("docker://"):
        return replace(_docker("docker", text[len("docker://") :], text), explicit=True)
    for transport in ("oci-archive", "docker-archive", "oci", "docker-daemon"):
        if text.startswith(transport + ":"):
            rest = text[len(transport) + 1 :]
            if transport == "docker-daemon":
                return _docker("docker-daemon", rest, text)
            return _file(transport, rest, text)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise ReferenceError_(
            f"invalid image reference {text!r}: unknown transport (known: {', '.join(TRANSPORTS)})"
        )
    return _docker("docker", text, text)


def _file(transport: str, rest: str, text: str) -> ImageRef:
    if not rest:
        raise ReferenceError_(f"invalid image reference {text!r}: {transport}: needs a path")
    path, _, name = rest.partition(":")
    if not path:
        raise ReferenceError_(f"invalid image reference {text!r}: {transport}: needs a path")
    return ImageRef(transport, path=path, name=name or None)


def _docker(transport: str, rest: str, text: str) -> ImageRef:
    """docker/distribution normalisation: default registry, library/ prefix, latest tag."""
    name, digest = rest, None
    if "@" in rest:
        name, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest) or (digest.startswith("sha256:") and not _SHA256_RE.match(digest)):
            raise ReferenceError_(f"invalid image reference {text!r}: bad digest {digest!r}")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ReferenceError_(f"invalid image reference {text!r}: bad tag {tag!r}")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repo = first, remainder
        if not _HOST_RE.match(registry):
            raise ReferenceError_(f"invalid image reference {text!r}: bad registry host {registry!r}")
    else:
        registry, repo = DEFAULT_REGISTRY, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repo:
        repo = f"library/{repo}"
    if not _REPO_RE.match(repo):
        raise ReferenceError_(
            f"invalid image reference {text!r}: bad repository name {repo!r} "
            "(lowercase letters, digits and . _ - / only)"
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(transport, registry=registry, repository=repo, tag=tag, digest=digest)
