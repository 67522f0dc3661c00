"""`xbuild sbom ARTIFACT|REF`: print the SBOM a build wrote into the artifact (builder/sbom.py)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import click

from .artifact import SBOM, open_artifact
from .errors import ArtifactError
from .run_cli import pull_cached


@click.command("sbom")
@click.argument("target", metavar="ARTIFACT|REF")
@click.option("--insecure", is_flag=True, help="Plain HTTP / unverified TLS for the registry.")
def sbom_cmd(target: str, insecure: bool) -> None:
    """Print the guest's SBOM (CycloneDX JSON) of an artifact directory or a pushed VM image REF.

    A REF is pulled into the cache like `xbuild run REF` does. The file is printed only when its sha256 is
    the one manifest.json records; an artifact without one (built by an older xbuild) is refused (exit 2).
    """
    art = open_artifact(Path(target)) if Path(target).is_dir() else pull_cached(target, insecure)
    section = art.manifest.sbom
    if section is None:
        raise ArtifactError(f"{target}: no {SBOM} in this artifact (built by an xbuild without SBOMs)")
    data = (art.path / SBOM).read_bytes()
    if hashlib.sha256(data).hexdigest() != section.sha256:
        raise ArtifactError(f"{target}: {SBOM} does not match the sha256 manifest.json records")
    sys.stdout.buffer.write(data)
