"""`xbuild kernel build|list`: build trimmed guest kernels into the cache and list them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from . import kernel as kern


def _as_json(k: kern.Kernel) -> dict[str, Any]:
    return {f.name: getattr(k, f.name) for f in dataclasses.fields(k)} | {
        "path": str(k.path),
        "bzimage": str(k.bzimage) if k.bzimage else None,
        "fragments": list(k.fragments),
        "patches": list(k.patches),
    }


def _line(k: kern.Kernel) -> str:
    frags = "+".join(k.fragments) + (f" +{len(k.patches)} patch(es)" if k.patches else "")
    size = f"{k.size / 1e6:6.2f} MB"
    return f"{k.key[:12]}  {k.arch:<5} {k.release:<10} {k.fmt:<7} {size}  {frags:<20} {k.path}"


@click.group("kernel")
def kernel() -> None:
    """Trimmed guest kernels (Xen + QEMU; amd64 and arm64), built from kernels/*.config and cached."""


@kernel.command("build")
@click.option(
    "--fragment",
    "fragments",
    multiple=True,
    metavar="NAME",
    help="kernels/[ARCH/]NAME.config or a path to a .config fragment; repeatable [default: "
    + "; ".join(f"{a.name}: {' '.join(a.fragments)}" for a in kern.ARCHES.values())
    + "]",
)
@click.option(
    "--platform",
    default="linux/amd64",
    show_default=True,
    type=click.Choice([f"linux/{a}" for a in kern.ARCHES]),
    help="the guest platform the kernel is for (arm64: cross-compiled with aarch64-linux-gnu-gcc)",
)
@click.option(
    "--source",
    type=click.Path(exists=True, path_type=Path),
    help="kernel source tarball or clean tree [default: newest /usr/src/linux-source-*.tar.*]",
)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON, no progress")
def build_cmd(fragments: tuple[str, ...], platform: str, source: Path | None, as_json: bool) -> None:
    """Build a kernel (or reuse the cached one) and print where it is."""
    arch = platform.removeprefix("linux/")
    if as_json:
        k = kern.build(fragments or None, source, arch=arch)
        click.echo(json.dumps(_as_json(k), indent=2))
        return
    with tqdm(desc="kernel", unit=" files", disable=None) as bar:

        def progress(line: str) -> None:
            if line.startswith("xbuild: "):
                bar.set_postfix_str(line.split()[1] + " " + line.split()[-1])
            elif line.startswith("  ") and line.split()[:1] in (["CC"], ["AS"], ["LD"], ["AR"]):
                bar.update()

        k = kern.build(fragments or None, source, progress, arch=arch)
    click.echo(_line(k))


@kernel.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the kernels as a JSON list")
def list_cmd(as_json: bool) -> None:
    """List the kernels in the cache, newest first."""
    kernels = kern.list_kernels()
    if as_json:
        click.echo(json.dumps([_as_json(k) for k in kernels], indent=2))
    else:
        for k in kernels:
            click.echo(_line(k))
