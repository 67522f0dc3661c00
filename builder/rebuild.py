"""`xbuild rebuild ARTIFACT|REF`: build an artifact again from its provenance and compare every file.

The claim "same inputs, same bytes on any machine" made checkable. The artifact (a directory, or a VM image
pulled from a registry into a temp directory) names its inputs in `provenance.intoto.json`
(builder/provenance.py); the rebuild uses exactly those:

- the source image by its manifest digest (a registry is asked for that digest, not the tag; a layout or
  archive must still hold it), recorded under the same reference;
- the recipe by name (or the file `--recipe` gives), refused unless its sha256 is the recorded one;
- the same options, SOURCE_DATE_EPOCH, kernel (the trimmed kernel of the recorded key, or the given
  kernel file with the recorded sha256) and init;

and the build refuses to start (BuildOptions.expect) when the inputs it finds differ in any field from the
recorded ones (another xbuild version, compiler or kernel source): that is RebuildError, exit 2, one line,
as is a source digest the registry no longer has or a provenance that is not xbuild's. Otherwise every
file of the rebuilt artifact is compared with the original's (and with the sha256 the provenance records
for it): all equal is a match (exit 0), any difference a mismatch (exit 1).

Everything is written into one temp directory, removed at the end; only the caches (blobs, init, kernel)
keep what the build fetched or built, as any build's would.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import provenance
from .artifact import NAMES, open_artifact
from .build import BuildOptions, build
from .cache import file_sha256
from .errors import RebuildError
from .image import Platform
from .inputs import BuildInputs
from .options import DiskFormat, DiskMode, MinimizeMode, NetworkMode, OutputFormat, Say, XenType
from .recipes import load_recipe


@dataclass(frozen=True)
class FileCheck:
    """One file: its sha256 in the original artifact, in the rebuilt one and in the provenance's subject
    list (None where it is absent; the provenance is not its own subject)."""

    name: str
    original: str | None
    rebuilt: str | None
    recorded: str | None

    @property
    def match(self) -> bool:
        return (
            self.original is not None
            and self.original == self.rebuilt
            and (self.recorded is None or self.recorded == self.original)
        )

    def line(self) -> str:
        """`match NAME sha256:…` or `mismatch NAME …` saying which copies differ."""
        if self.match:
            return f"match     {self.name:<23} sha256:{self.original}"
        parts = [f"artifact {_short(self.original)}", f"rebuilt {_short(self.rebuilt)}"]
        if self.recorded is not None and self.recorded != self.original:
            parts.append(f"provenance {_short(self.recorded)}")
        return f"mismatch  {self.name:<23} " + ", ".join(parts)


def _short(digest: str | None) -> str:
    return "missing" if digest is None else f"sha256:{digest[:16]}"


@dataclass(frozen=True)
class Result:
    inputs: BuildInputs
    files: tuple[FileCheck, ...]

    @property
    def match(self) -> bool:
        return all(f.match for f in self.files)


def rebuild(
    target: str, recipe: str | None = None, insecure: bool = False, log: Say = lambda m: None
) -> Result:
    """Rebuild the artifact directory or VM image reference `target` from its provenance and compare (see
    the module docstring). `recipe`: the recipe file to use for a recipe that was given as a file."""
    with tempfile.TemporaryDirectory(prefix="xbuild-rebuild.") as tmp:
        if Path(target).is_dir():
            original = open_artifact(Path(target)).path
        else:
            from .publish import pull

            original = open_artifact(pull(target, Path(tmp) / "original", insecure)).path
        recorded = provenance.read(original)
        inputs = recorded.inputs
        log(f"rebuilding {inputs.source_reference} ({inputs.source_digest[:19]}), build key {inputs.key()}")
        build(inputs.source_reference, options(inputs, Path(tmp) / "rebuilt", recipe, insecure, log))
        names = sorted(
            {p.name for p in original.iterdir()} | {p.name for p in (Path(tmp) / "rebuilt").iterdir()}
        )
        files = tuple(
            FileCheck(
                name,
                _sha256(original / name),
                _sha256(Path(tmp) / "rebuilt" / name),
                recorded.subjects.get(name),
            )
            for name in names
            if name in NAMES
        )
    return Result(inputs, files)


def _sha256(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def options(inputs: BuildInputs, output: Path, recipe: str | None, insecure: bool, log: Say) -> BuildOptions:
    """The BuildOptions that give `inputs` again, into `output`; RebuildError for a recorded recipe that
    cannot be had (missing, or its sha256 changed)."""
    found = None
    if inputs.recipe is not None:
        found = load_recipe(recipe or inputs.recipe)
        if found.sha256 != inputs.recipe_sha256:
            raise RebuildError(
                f"recipe {inputs.recipe} changed since the build (sha256 {str(inputs.recipe_sha256)[:16]} "
                f"recorded, {found.sha256[:16]} in {found.source})"
            )
    kernel = inputs.kernel
    disk = inputs.disk
    return BuildOptions(
        output=output,
        compression=inputs.compression,
        level=inputs.level,
        epoch=inputs.source_date_epoch,
        platform=Platform.parse(inputs.platform),
        insecure=insecure,
        minimize=MinimizeMode(inputs.minimize),
        recipe=found,  # the very recipe whose sha256 was checked
        kernel=None if kernel is None else "default" if kernel.key else kernel.source,
        memory_mb=inputs.memory_mb,
        xen_type=XenType(inputs.xen_type),
        hostname=inputs.hostname,
        format=OutputFormat(inputs.format),
        disk_format=DiskFormat(disk.format) if disk else DiskFormat.RAW,
        disk_size=disk.size if disk else None,
        disk_mode=DiskMode(disk.mode) if disk else DiskMode.RW,
        healthcheck=inputs.healthcheck,
        network=NetworkMode.BRIDGE if inputs.network else NetworkMode.NONE,
        bridge=inputs.network.bridge if inputs.network else None,
        ip=_ip(inputs.network.address, inputs.network.gateway) if inputs.network else None,
        pin=inputs.source_digest,
        expect=inputs,
        log=log,
    )


def _ip(address: str | None, gateway: str | None) -> str | None:
    """build's `--ip` for a recorded static address (None: DHCP)."""
    return None if address is None else f"{address}:{gateway}" if gateway else address
