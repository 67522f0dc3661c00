"""The Image every source produces (registry, OCI layout/archive, docker-archive, daemon): its platform,
runtime config and layers, as later stages read them. `oci.manifest` builds it from the OCI documents.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import SourceError
from .reference import ImageRef


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise SourceError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        """This machine's platform, named as OCI names it (x86_64 is amd64, aarch64 arm64)."""
        machine = platform.machine()
        return cls("linux", {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine))

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def matches(self, other: dict[str, Any]) -> bool:
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        return self.variant is None or other.get("variant") in (None, self.variant)


NS_MAX = (1 << 63) - 1  # Go's time.Duration (int64 nanoseconds): the largest Docker can store
MAX_ARG_STRLEN = 128 << 10  # Linux refuses an execve word longer than this (E2BIG)
HEALTH_KINDS = ("NONE", "CMD", "CMD-SHELL")


@dataclass(frozen=True)
class Healthcheck:
    """The image config's Healthcheck (Docker's HealthConfig), checked as `docker create` checks it.

    `test`: () = none given (inherit), ("NONE",) = disabled, ("CMD", prog, args…), ("CMD-SHELL", command…).
    Durations are nanoseconds, `retries` a count; 0 means "Docker's default" (30 s interval, 30 s timeout,
    0 start period, 5 s start interval, 3 retries). A duration must be 0 or at least 1 ms and fit Go's
    int64; a probe word longer than Linux's MAX_ARG_STRLEN could never be executed: SourceError for all.
    """

    test: tuple[str, ...] = ()
    interval_ns: int = 0
    timeout_ns: int = 0
    start_period_ns: int = 0
    start_interval_ns: int = 0
    retries: int = 0

    def __post_init__(self) -> None:
        if self.test:
            if self.test[0] not in HEALTH_KINDS:
                raise SourceError(
                    f"Healthcheck.Test[0] {self.test[0][:40]!r} is not one of {', '.join(HEALTH_KINDS)}"
                )
            if self.test[0] != "NONE" and (len(self.test) < 2 or not self.test[1]):
                raise SourceError(f"Healthcheck.Test: {self.test[0]} without a command")
            longest = max(len(w.encode("utf-8", "surrogateescape")) for w in self.test)
            if longest > MAX_ARG_STRLEN:
                raise SourceError(
                    f"Healthcheck.Test: a word of {longest} bytes (Linux executes words of "
                    f"at most {MAX_ARG_STRLEN})"
                )
        for name in ("interval_ns", "timeout_ns", "start_period_ns", "start_interval_ns"):
            v = getattr(self, name)
            label = "".join(w.capitalize() for w in name[:-3].split("_"))
            if not 0 <= v <= NS_MAX:
                raise SourceError(f"Healthcheck.{label} {v} is outside 0..{NS_MAX} ns")
            if 0 < v < 1_000_000:
                raise SourceError(f"Healthcheck.{label} {v} ns: Docker refuses less than 1ms (0 = default)")
        if not 0 <= self.retries <= NS_MAX:
            raise SourceError(f"Healthcheck.Retries {self.retries} is outside 0..{NS_MAX}")

    @property
    def disabled(self) -> bool:
        return self.test[:1] == ("NONE",)

    def merged(self, base: Healthcheck | None) -> Healthcheck:
        """Docker's merge of a container's Healthcheck over the image's: every empty/0 field is `base`'s."""
        if base is None:
            return self
        return Healthcheck(
            self.test or base.test,
            self.interval_ns or base.interval_ns,
            self.timeout_ns or base.timeout_ns,
            self.start_period_ns or base.start_period_ns,
            self.start_interval_ns or base.start_interval_ns,
            self.retries or base.retries,
        )


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of the image config (OCI image-spec `config` object; Healthcheck and Shell are
    Docker's additions)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    healthcheck: Healthcheck | None = None
    shell: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layer:
    """One layer blob; `open()` yields its (compressed) bytes, `compression` is none|gzip|zstd."""

    digest: str
    size: int
    media_type: str
    compression: str
    diff_id: str
    open: Callable[[], IO[bytes]] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Image:
    ref: ImageRef
    manifest_digest: str
    platform: Platform
    config: ImageConfig
    config_digest: str
    config_raw: bytes = field(repr=False)
    created: str | None
    layers: tuple[Layer, ...]
