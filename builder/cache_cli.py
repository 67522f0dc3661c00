"""`xbuild cache du|verify|prune`: the cache ($XBUILD_CACHE) for users and CI runners.

Thin: the work is builder/cache.py's (sizes, entries, temps, LRU pruning), builder/blobs.py's,
builder/init.py's and builder/kernel.py's (digests), builder/artifact.py's (pulled artifacts).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from . import cache, kernel
from .artifact import open_artifact
from .blobs import verify_store
from .errors import ArtifactError, CacheError
from .init import verify_cached


@click.group("cache")
def cache_cmd() -> None:
    """Show, check and trim the cache ($XBUILD_CACHE, default ~/.cache/xbuild)."""


@cache_cmd.command("du")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def du_cmd(as_json: bool) -> None:
    """Bytes on disk per kind of entry (blobs, diffs, init, kernels, pulled, xenrig...)."""
    root = cache.cache_root(collect=False)
    kinds: dict[str, dict[str, int]] = defaultdict(lambda: {"entries": 0, "bytes": 0})
    for e in cache.entries(root):
        kinds[e.kind]["entries"] += 1
        kinds[e.kind]["bytes"] += e.size
    temps = list(cache.stale_temps(root, age=0))
    kinds["temps"] = {"entries": len(temps), "bytes": sum(cache.disk_usage(t) for t in temps)}
    total = cache.disk_usage(root)
    if as_json:
        click.echo(
            json.dumps({"root": str(root), "kinds": dict(sorted(kinds.items())), "total": total}, indent=2)
        )
        return
    for kind, k in sorted(kinds.items()):
        click.echo(f"{kind:<12} {k['entries']:>6} entries  {_mb(k['bytes'])}")
    click.echo(f"{'total':<12} {'':>14}  {_mb(total)}  {root}")


@cache_cmd.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def verify_cmd(as_json: bool) -> None:
    """Re-hash every entry (blobs, diffs, the compiled init, kernels, pulled artifacts) against its name or
    record; remove the bad ones and exit 1 naming them."""
    checked, bad = 0, []
    for path, why in [*verify_store(), *verify_cached(), *kernel.verify_cached(), *_verify_pulled()]:
        checked += 1
        if why:
            bad.append({"path": str(path), "problem": why})
    if as_json:
        click.echo(json.dumps({"root": str(cache.cache_root()), "checked": checked, "bad": bad}, indent=2))
    else:
        for b in bad:
            click.echo(f"removed {b['path']}: {b['problem']}")
        click.echo(f"checked {checked} entries, {len(bad)} bad")
    if bad:
        raise CacheError(
            f"{len(bad)} corrupt cache entr{'y' if len(bad) == 1 else 'ies'} removed: "
            + ", ".join(b["path"] for b in bad)
        )


@cache_cmd.command("prune")
@click.option(
    "--max-size",
    metavar="SIZE",
    help="Also remove least recently used entries until the cache takes at most SIZE (e.g. 10G).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def prune_cmd(max_size: str | None, as_json: bool) -> None:
    """Remove temp files left by killed runs (older than an hour, not being written) and, with --max-size,
    least recently used entries; an entry a running xbuild holds is left in place."""
    limit = cache.parse_size(max_size, "--max-size") if max_size else None
    r = cache.prune(cache.cache_root(collect=False), limit)
    report: dict[str, Any] = {
        "temps": [str(p) for p in r.temps],
        "removed": [{"path": str(e.path), "kind": e.kind, "bytes": e.size} for e in r.removed],
        "in_use": [str(e.path) for e in r.in_use],
        "size": r.size,
        "max_size": limit,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for p in r.temps:
        click.echo(f"removed temp {p}")
    for e in r.removed:
        click.echo(f"removed {e.kind} {e.path.name} ({_mb(e.size)})")
    for e in r.in_use:
        click.echo(f"kept {e.kind} {e.path.name}: in use by a running xbuild")
    click.echo(f"cache now {_mb(r.size)}" + (f" (max {_mb(limit)})" if limit is not None else ""))


def _verify_pulled() -> Iterator[tuple[Path, str | None]]:
    """Check every pulled VM artifact (`pulled/<key>/`): a valid artifact (open_artifact: its manifest, file
    names and recorded sizes) whose initrd and root disk hash to the sha256 its manifest.json records; a
    bad one is removed (the next `xbuild run` pulls it again)."""
    pulled = cache.cache_root() / "pulled"
    for d in sorted(pulled.iterdir()) if pulled.is_dir() else []:
        if cache.is_temp(d.name):
            continue
        why = None
        try:
            m = open_artifact(d).manifest
        except ArtifactError as e:
            why = str(e)
        else:
            recorded = [(m.initrd.file, m.initrd.sha256)] + ([(m.disk.file, m.disk.sha256)] if m.disk else [])
            for name, want in recorded:
                actual = cache.file_sha256(d / name)
                if actual != want:
                    why = (
                        f"{d / name}: content hashes to sha256:{actual[:12]}…, "
                        f"manifest.json records {want[:12]}…"
                    )
                    break
        if why:
            cache.remove_entry(d)
        yield d, why


def _mb(n: int) -> str:
    return f"{n / 1e6:10.2f} MB"
