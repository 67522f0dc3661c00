"""`xbuild push`, `xbuild pull` and `xbuild kernel push`: artifacts and kernels to and from OCI registries."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click

from . import kernel as kern
from . import publish
from .errors import PublishError
from .options import stderr_say


def _report(pushed: publish.Pushed, seconds: float, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(pushed) | {"seconds": round(seconds, 3)}, indent=2))
        return
    disk = pushed.disk
    of = (
        f"; {disk['file']}: {disk['file_size'] / 1e6:.1f} MB as {disk['blob_size'] / 1e6:.1f} MB zstd"
        if disk
        else ""
    )
    click.echo(
        f"xbuild: pushed {pushed.uploaded} blob(s) ({pushed.uploaded_bytes / 1e6:.1f} MB), "
        f"{pushed.present} already there, {pushed.mounted} mounted, in {seconds:.1f} s{of}",
        err=True,
    )
    click.echo(pushed.reference)


@click.command("push")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("ref")
@click.option("--insecure", is_flag=True, help="Plain HTTP / unverified TLS for the registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No messages.")
def push_cmd(artifact: Path, ref: str, insecure: bool, as_json: bool, quiet: bool) -> None:
    """Push the ARTIFACT directory to REF (REGISTRY/REPO:TAG) as an OCI artifact; prints REF@DIGEST."""
    start = time.monotonic()
    pushed = publish.push(artifact, ref, insecure, stderr_say(quiet or as_json))
    _report(pushed, time.monotonic() - start, as_json)


@click.command("pull")
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Artifact directory to create (or replace, if it holds an artifact; anything else is refused).",
)
@click.option(
    "--force", is_flag=True, help="Let -o replace a directory that is not an artifact (never a file)."
)
@click.option("--insecure", is_flag=True, help="Plain HTTP / unverified TLS for the registry.")
def pull_cmd(ref: str, output: Path, force: bool, insecure: bool) -> None:
    """Pull the VM artifact REF into a directory; prints the directory."""
    click.echo(publish.pull(ref, output, insecure, force=force))


@click.command("push")
@click.argument("ref")
@click.option("--key", help="Key (or its prefix) of the cached kernel to push [default: the newest].")
@click.option("--insecure", is_flag=True, help="Plain HTTP / unverified TLS for the registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def kernel_push_cmd(ref: str, key: str | None, insecure: bool, as_json: bool) -> None:
    """Push a cached kernel to REF as an OCI artifact (use it with `--kernel oci://REF`)."""
    kernels = [k for k in kern.list_kernels() if k.key.startswith(key or "")]
    if not kernels:
        raise PublishError(
            f"no cached kernel matches key {key!r}; see `xbuild kernel list`"
            if key
            else "no kernel in the cache; build one with `xbuild kernel build`"
        )
    if key and len(kernels) > 1:
        raise PublishError(f"{len(kernels)} cached kernels match key {key!r}; give more of it")
    start = time.monotonic()
    pushed = publish.push_kernel(kernels[0], ref, insecure, stderr_say(as_json))
    _report(pushed, time.monotonic() - start, as_json)
