"""A build's inputs: everything an artifact's bytes depend on, and nothing else, recorded once.

`BuildInputs` is computed once by the build (builder/build.py `build_inputs`) after the source image's
manifest is fetched and before anything is built, and is used three ways:

- its `key()` is the artifact's cache key (sha256 of the canonical JSON): the same inputs give the same key
  on any machine, a change of any field gives another key;
- it is the provenance statement's `externalParameters` (builder/provenance.py);
- `xbuild rebuild` reads it back (`BuildInputs.from_json`) and builds again from it.

What each field covers:

    source_reference  the reference the image was named by (recorded in manifest.json)
    source_digest     the image manifest's digest (the platform's manifest, not an index)
    platform          the image's platform
    recipe, recipe_sha256  the recipe's name and the sha256 of its file: keep lists, kernel fragments and
                      command line, memory, trace seconds (the minimizer's options) are all in it
    minimize          --minimize
    kernel            the trimmed kernel's cache key (builder/kernel.py: source, fragments, toolchain) and
                      fragments, or a given kernel's --kernel text and sha256; None with --kernel none
    init_key          the compiled init's cache key (builder/init.py: source, compiler, flags)
    xbuild_version    the builder's version (every stage's code)
    compression, level  the initramfs compression as given (None: the compression's default level)
    format, disk      --format and, with `disk`, the disk's format, size (None: auto) and mode
    memory_mb, xen_type, hostname, cmdline  the guest's settings as resolved (recipe and defaults applied)
    healthcheck       docker run's --health-* override (None: the image's own)
    source_date_epoch the resolved SOURCE_DATE_EPOCH (None: the image has no created time)
    network           xen.cfg's vif as resolved from --network/--bridge/--ip, the recipe and the image's
                      exposed ports: bridge, static address and gateway (None: no vif)

Not inputs: where the output goes (-o, --force), how the image is fetched (--insecure, the registry's
credentials), limits that make a build fail but never change its bytes (--max-layer-size), progress output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from .artifact import Network, _one_of, _Section
from .errors import ArtifactError, RebuildError
from .image import Healthcheck
from .options import DiskFormat, DiskMode, MinimizeMode, OutputFormat, XenType

SCHEMA = "xbuild.inputs.v1"


@dataclass(frozen=True)
class KernelInput(_Section):
    """The kernel paired with the artifact: the trimmed kernel xbuild builds (`key`, `fragments`) or a
    given kernel file (`source`, the --kernel text, and `sha256` of its bytes)."""

    NAME: ClassVar[str] = "kernel"
    key: str | None = None
    fragments: tuple[str, ...] | None = None
    source: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if (self.key is None) == (self.sha256 is None):
            raise ArtifactError("kernel: exactly one of key (a built kernel) and sha256 (a given file)")
        if self.sha256 is not None and not self.source:
            raise ArtifactError("kernel: a given kernel's sha256 without its source")


@dataclass(frozen=True)
class DiskInput(_Section):
    """`--format disk`'s options: the image format, the size in bytes (None: auto) and the mount mode."""

    NAME: ClassVar[str] = "disk"
    format: str
    mode: str
    size: int | None = None

    def __post_init__(self) -> None:
        _one_of(self.format, DiskFormat, "disk.format")
        _one_of(self.mode, DiskMode, "disk.mode")


@dataclass(frozen=True)
class BuildInputs(_Section):
    """Every input of one artifact (see the module docstring); `key()` is the artifact's cache key."""

    NAME: ClassVar[str] = "inputs"
    source_reference: str
    source_digest: str
    platform: str
    minimize: str
    init_key: str
    xbuild_version: str
    compression: str
    format: str
    memory_mb: int
    xen_type: str
    hostname: str
    cmdline: str
    recipe: str | None = None
    recipe_sha256: str | None = None
    kernel: KernelInput | None = None
    level: int | None = None
    disk: DiskInput | None = None
    healthcheck: Healthcheck | None = None
    source_date_epoch: int | None = None
    network: Network | None = None  # xen.cfg's vif as resolved (None: none)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise ArtifactError(f"inputs: schema {self.schema[:40]!r} is not {SCHEMA}")
        if (self.recipe is None) != (self.recipe_sha256 is None):
            raise ArtifactError("inputs: a recipe needs its sha256 and a sha256 its recipe")
        _one_of(self.minimize, MinimizeMode, "minimize")
        _one_of(self.format, OutputFormat, "format")
        _one_of(self.xen_type, XenType, "xen_type")

    def check_same(self, now: BuildInputs) -> None:
        """RebuildError (exit 2) naming the first fields where `now`, the inputs a build found, differ
        from these recorded ones: the recorded artifact cannot be built again here."""
        was, found = self.to_json(), now.to_json()
        changed = [k for k in sorted(was.keys() | found.keys()) if was.get(k) != found.get(k)]
        if changed:
            shown = "; ".join(
                f"{k}: {_short(was.get(k))} recorded, {_short(found.get(k))} here" for k in changed[:3]
            )
            raise RebuildError(f"the inputs differ from the recorded ones ({shown})")

    def canonical(self) -> bytes:
        """The canonical JSON: sorted keys, no whitespace, UTF-8; absent optional fields left out."""
        return canonical_json(self.to_json())

    def key(self) -> str:
        """The artifact's cache key: the hex sha256 of `canonical()`."""
        return hashlib.sha256(self.canonical()).hexdigest()


def _short(value: Any) -> str:
    text = "none" if value is None else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def canonical_json(obj: Any) -> bytes:
    """`obj` as canonical JSON bytes (sorted keys, no insignificant whitespace, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
