"""`xbuild push`, `xbuild pull` and `xbuild kernel push`: artifacts and kernels to and from OCI registries."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import kernel as kern
from . import publish, sign
from .errors import PublishError
from .image import Platform
from .options import stderr_say

F = TypeVar("F", bound=Callable[..., Any])


def verify_options(what: str) -> Callable[[F], F]:
    """`--verify-key PUB` and `--verify-policy FILE`, the same on every command that takes a registry VM
    image (`pull`, `run`): `what` starts their help ("Pull", "Run")."""

    def add(f: F) -> F:
        f = click.option(
            "--verify-policy",
            type=click.Path(path_type=Path, dir_okay=False),
            metavar="FILE",
            help=f"{what} only if this JSON policy admits it (public keys per repository pattern).",
        )(f)
        return click.option(
            "--verify-key",
            type=click.Path(path_type=Path, dir_okay=False),
            metavar="PUB",
            help=f"{what} only if a signature verifies with this public key (PEM); uses the digest verified.",
        )(f)

    return add


def platform_option(f: F) -> F:
    """`--platform OS/ARCH`, the same on every command that takes a registry VM image (`pull`, `run`)."""
    return click.option(
        "--platform",
        metavar="OS/ARCH",
        help="The platform's VM image when REF is a multi-platform index [this host's]; it must be built "
        "for it.",
    )(f)


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
@click.option(
    "--sign",
    "key",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="KEY",
    help="Sign the pushed image with this private key (PEM, ECDSA P-256 or Ed25519).",
)
def push_cmd(artifact: Path, ref: str, insecure: bool, as_json: bool, quiet: bool, key: Path | None) -> None:
    """Push the ARTIFACT directory to REF (REGISTRY/REPO:TAG) as an OCI artifact; prints REF@DIGEST.
    Its SBOM and provenance documents are attached as OCI referrers; `--sign` attaches a signature too.
    The -o DIR of a build of several platforms is pushed as one OCI index of its artifacts."""
    start = time.monotonic()
    say = stderr_say(quiet or as_json)
    if key is not None:
        sign.load_private_key(key)  # a bad key is refused before anything is pushed
    platforms = publish.platform_dirs(artifact)  # a build of several platforms' -o DIR: one index of them
    pushed = (
        publish.push_index(platforms, ref, insecure, say)
        if platforms
        else publish.push(artifact, ref, insecure, say)
    )
    if key is not None:
        pinned = dataclasses.replace(publish.target(ref), digest=pushed.digest)
        sign.sign(pinned, key, insecure, say)
    _report(pushed, time.monotonic() - start, as_json)


@click.command("sign")
@click.argument("ref")
@click.option(
    "--key",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    metavar="KEY",
    help="Private key (PEM, ECDSA P-256 or Ed25519; an encrypted one's password in $XBUILD_KEY_PASSWORD).",
)
@click.option("--insecure", is_flag=True, help="Plain HTTP / unverified TLS for the registry.")
def sign_cmd(ref: str, key: Path, insecure: bool) -> None:
    """Sign the image REF (tag or digest) in its registry: a Sigstore bundle attached as an OCI referrer;
    prints REF@DIGEST of what was signed."""
    r = publish.target(ref)
    signed = sign.sign(r, key, insecure, stderr_say())
    click.echo(f"{dataclasses.replace(r, tag=None, digest=signed.subject).docker_name}")


@click.command("verify")
@click.argument("ref")
@click.option(
    "--key",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    metavar="PUB",
    help="Public key (PEM) a signature must verify with.",
)
@click.option("--insecure", is_flag=True, help="Plain HTTP / unverified TLS for the registry.")
def verify_cmd(ref: str, key: Path, insecure: bool) -> None:
    """Check that the image REF carries a signature by KEY's private key; prints REF@DIGEST verified
    (exit 2 and one line saying why when it does not)."""
    r = publish.target(ref)
    click.echo(sign.verified(r, [key], insecure, stderr_say()).docker_name)


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
@platform_option
@verify_options("Pull")
def pull_cmd(
    ref: str,
    output: Path,
    force: bool,
    insecure: bool,
    platform: str | None,
    verify_key: Path | None,
    verify_policy: Path | None,
) -> None:
    """Pull the VM artifact REF (or, from a multi-platform index, the one for --platform) into a directory;
    prints the directory."""
    want = Platform.parse(platform) if platform else None
    r = sign.admit(publish.target(ref), verify_key, verify_policy, insecure, stderr_say())
    click.echo(publish.pull(r, output, insecure, force=force, platform=want))


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
