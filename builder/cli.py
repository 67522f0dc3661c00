"""The command line: thin. Parses options, calls the stages, renders progress or --json.

`xbuild IMAGE` is short for `xbuild build IMAGE`. Exit codes: 0 ok, 1 failure, 2 bad input.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from . import __version__, reference
from .artifact import Artifact, Manifest
from .build import BuildOptions, build, default_output
from .buildcache import ENV as CACHE_ENV
from .buildcache import BuildCache
from .cache import parse_size
from .cache_cli import cache_cmd
from .compression import CODECS, COMPRESSIONS, ZSTD_DEFAULT_LEVEL
from .errors import BadInput, SourceError, XbuildError
from .host import apt_line, check, missing_packages
from .image import Healthcheck, Platform
from .kernel_cli import kernel
from .options import (
    DEFAULT_BRIDGE,
    DEFAULT_MEMORY_MB,
    DEFAULT_XEN_TYPE,
    MEMORY_MB,
    VERIFY_HYPERVISORS,
    DiskFormat,
    DiskMode,
    Hypervisor,
    MinimizeMode,
    NetworkMode,
    OutputFormat,
    Progress,
    Say,
    XenType,
    choices,
    stderr_say,
)
from .publish_cli import kernel_push_cmd, pull_cmd, push_cmd, sign_cmd, verify_cmd
from .recipes import Recipe, load_recipe
from .rig_cli import rig_cmd
from .run_cli import run_cmd
from .sbom_cli import sbom_cmd
from .verify import plan, skip_reason, verify_artifact


class _DefaultBuild(click.Group):
    """A group where an unknown first word is an image: `xbuild nginx` runs `xbuild build nginx`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((a for a in args if not a.startswith("-")), None)
        if (
            first is not None
            and first not in self.commands
            and args
            and args[0] not in ("--help", "-h", "--version")
        ):
            args = ["build", *args]
        return super().parse_args(ctx, args)


def _progress(enabled: bool) -> Progress | None:
    """A tqdm progress factory when stderr is a terminal, else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def factory(label: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total or None, desc=label, unit="B", unit_scale=True, leave=False, file=sys.stderr)
        update: Callable[[int], None] = bar.update
        return update

    return factory


def _compression(value: str) -> tuple[str, int | None]:
    name, _, level = value.partition(":")
    if name not in COMPRESSIONS or (level and not level.lstrip("-").isdigit()):
        raise click.BadParameter(f"{value!r}: expected one of {', '.join(COMPRESSIONS)}, optionally :LEVEL")
    try:
        return name, CODECS[name].level(int(level)) if level else None
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: {e}") from None


@click.group(cls=_DefaultBuild, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xbuild")
def main() -> None:
    """Turn a Docker/OCI image into a bootable Xen guest (kernel + initramfs + xl config).

    \b
    xbuild IMAGE [OPTIONS]       same as `xbuild build IMAGE`
    IMAGE: nginx, nginx:1.25, repo@sha256:…, localhost:5000/team/app:v1,
           docker://REF, oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REPO:TAG]
    """


@main.command("build")
@click.argument("image")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Artifact directory [./out/NAME]; an earlier artifact there is replaced, anything else is refused.",
)
@click.option(
    "--force", is_flag=True, help="Let -o replace a directory that is not an artifact (never a file)."
)
@click.option(
    "--compression",
    default="zstd",
    show_default=True,
    metavar="NAME[:LEVEL]",
    help=f"initrd compression: {', '.join(COMPRESSIONS)}; zstd defaults to level {ZSTD_DEFAULT_LEVEL} "
    "(zstd:19 is the size-first mode: smaller, several times slower to build).",
)
@click.option(
    "--platform",
    default=str(Platform.host()),
    show_default=True,
    metavar="OS/ARCH[,OS/ARCH...]",
    help="Platform(s) to build, each taken from the image's manifest list: linux/amd64, linux/arm64. "
    "Several: one artifact each, in -o DIR/OS-ARCH/, and --push pushes one OCI index of them.",
)
@click.option(
    "--insecure", is_flag=True, help="Talk plain HTTP to the registry (localhost and 127.0.0.0/8 always do)."
)
@click.option(
    "--minimize",
    type=click.Choice(choices(MinimizeMode)),
    default=MinimizeMode.AUTO.value,
    show_default=True,
    help="Keep only what the entrypoint needs (auto: static analysis; trace: also run it).",
)
@click.option("--recipe", metavar="NAME|FILE", help="Recipe to apply [matched by repository name].")
@click.option(
    "--kernel",
    "kernel_opt",
    default="default",
    show_default=True,
    metavar="default|PATH|oci://REF|none",
    help="Kernel to pair: the cached trimmed one (built once), a file, a pushed kernel, or none.",
)
@click.option(
    "--memory",
    type=click.IntRange(*MEMORY_MB),
    metavar="MB",
    help=f"Guest memory in xen.cfg [recipe's or {DEFAULT_MEMORY_MB}].",
)
@click.option(
    "--xen-type",
    type=click.Choice(choices(XenType)),
    default=DEFAULT_XEN_TYPE.value,
    show_default=True,
    help="Guest type written to xen.cfg.",
)
@click.option(
    "--network",
    type=click.Choice(choices(NetworkMode)),
    default=NetworkMode.AUTO.value,
    show_default=True,
    help="xen.cfg's vif on dom0's bridge: auto = when the image exposes ports; none = no vif.",
)
@click.option(
    "--bridge",
    metavar="NAME",
    help=f"dom0's bridge for xen.cfg's vif [recipe's or {DEFAULT_BRIDGE}].",
)
@click.option(
    "--ip",
    metavar="ADDR/PREFIX[:GATEWAY]",
    help="The guest's static IPv4 address in xen.cfg [DHCP on the bridge's network: ip=dhcp].",
)
@click.option("--hostname", help="Guest hostname [the image's short name].")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(choices(OutputFormat)),
    default=OutputFormat.INITRAMFS.value,
    show_default=True,
    help="Where the files go: the initramfs (in guest RAM) or an ext4 root disk (disk.img).",
)
@click.option(
    "--disk-format", type=click.Choice(choices(DiskFormat)), help=f"Disk image format [{DiskFormat.RAW}]."
)
@click.option("--disk-size", metavar="auto|N[KMG]", help="Disk size [auto: the files + 25% + 32 MiB].")
@click.option(
    "--disk-mode",
    type=click.Choice(choices(DiskMode)),
    help=f"The guest mounts its disk rw or ro [{DiskMode.RW}].",
)
@click.option(
    "--max-layer-size",
    metavar="SIZE",
    help="Refuse a layer whose tar expands past SIZE (e.g. 64G) [$XBUILD_MAX_LAYER_SIZE or 16G].",
)
@click.option(
    "--verify/--no-verify",
    default=None,
    help="Boot the result under QEMU and check the recipe's smoke test and the image's HEALTHCHECK "
    "[on when it has one of them; --verify without them: the entrypoint must exit 0].",
)
@click.option(
    "--verify-on",
    type=click.Choice(choices(VERIFY_HYPERVISORS)),
    help="Verify under this hypervisor instead (implies --verify; xen-nested: the nested Xen rig).",
)
@click.option(
    "--health-cmd",
    metavar="CMD",
    help="Health probe, run with /bin/sh -c (the image's Shell) [the image's HEALTHCHECK].",
)
@click.option("--health-interval", metavar="DURATION", help="Time between probes, e.g. 30s, 1m30s [30s].")
@click.option("--health-timeout", metavar="DURATION", help="A probe running longer is killed [30s].")
@click.option(
    "--health-start-period",
    metavar="DURATION",
    help="Failures inside it do not count until the first success [0s].",
)
@click.option(
    "--health-start-interval", metavar="DURATION", help="Time between probes in the start period [5s]."
)
@click.option(
    "--health-retries",
    type=click.IntRange(0),
    metavar="N",
    help="Consecutive failures that make the guest unhealthy [3].",
)
@click.option("--no-healthcheck", is_flag=True, help="Disable the image's HEALTHCHECK.")
@click.option("--push", "push_ref", metavar="REF", help="Push the artifact to an OCI registry when built.")
@click.option(
    "--cache",
    "cache_repo",
    metavar="REGISTRY/REPO",
    envvar=CACHE_ENV,
    help="Registry build cache: take the kernel, init and artifact from REPO:<product>-<key> when there, "
    f"push what was built [${CACHE_ENV}].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the artifact manifest as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or messages.")
def build_cmd(
    image: str,
    output: Path | None,
    force: bool,
    compression: str,
    platform: str,
    insecure: bool,
    minimize: str,
    recipe: str | None,
    kernel_opt: str,
    memory: int | None,
    xen_type: str,
    network: str,
    bridge: str | None,
    ip: str | None,
    hostname: str | None,
    fmt: str,
    disk_format: str | None,
    disk_size: str | None,
    disk_mode: str | None,
    max_layer_size: str | None,
    verify: bool | None,
    verify_on: str | None,
    health_cmd: str | None,
    health_interval: str | None,
    health_timeout: str | None,
    health_start_period: str | None,
    health_start_interval: str | None,
    health_retries: int | None,
    no_healthcheck: bool,
    push_ref: str | None,
    cache_repo: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Build IMAGE into an artifact directory, then verify it when it knows how (see --verify)."""
    comp, level = _compression(compression)
    if verify is False and verify_on:
        raise BadInput("--no-verify conflicts with --verify-on")
    healthcheck = _healthcheck(
        health_cmd,
        health_interval,
        health_timeout,
        health_start_period,
        health_start_interval,
        health_retries,
        no_healthcheck,
    )
    if fmt != OutputFormat.DISK:
        given = [
            n
            for n, v in (
                ("--disk-format", disk_format),
                ("--disk-size", disk_size),
                ("--disk-mode", disk_mode),
            )
            if v is not None
        ]
        if given:
            raise BadInput(f"{given[0]} needs --format disk")
    silent = quiet or as_json
    say = stderr_say(silent)
    own_recipe = load_recipe(recipe) if recipe else None  # loaded once: the build and the verify use it
    platforms = _platforms(platform)
    opts = BuildOptions(
        output=output,
        force=force,
        compression=comp,
        level=level,
        platform=platforms[0],
        insecure=insecure,
        minimize=MinimizeMode(minimize),
        recipe=own_recipe,
        kernel=None if kernel_opt == "none" else kernel_opt,
        memory_mb=memory,
        xen_type=XenType(xen_type),
        network=NetworkMode(network),
        bridge=bridge,
        ip=ip,
        hostname=hostname,
        format=OutputFormat(fmt),
        disk_format=DiskFormat(disk_format or DiskFormat.RAW),
        disk_size=_disk_size(disk_size),
        disk_mode=DiskMode(disk_mode or DiskMode.RW),
        max_layer_size=parse_size(max_layer_size, "--max-layer-size") if max_layer_size else None,
        healthcheck=healthcheck,
        progress=_progress(not silent),
        cache=BuildCache(cache_repo, insecure, say),
        log=say,
    )
    if len(platforms) > 1:  # every platform's options checked before anything is built
        top = output or default_output(reference.parse(image))
        if (top / "manifest.json").exists():
            raise BadInput(
                f"-o {top}: holds an artifact; a build of several platforms writes DIR/OS-ARCH/ ones"
            )
        runs = [
            dataclasses.replace(
                opts, platform=p, output=top / platform_dir(p), cache=BuildCache(cache_repo, insecure, say)
            )
            for p in platforms
        ]
    else:
        runs = [opts]
    arts = []
    for one in runs:
        if len(runs) > 1:
            say(f"building {image} for {one.platform}")
        arts.append(_build_one(image, one, verify, verify_on, own_recipe, say))
    if push_ref:
        from .publish import push, push_index

        if len(arts) > 1:
            say(f"pushed {push_index([a.path for a in arts], push_ref, insecure, say).reference}")
        else:
            say(f"pushed {push(arts[0].path, push_ref, insecure, say).reference}")
    docs = {}
    for one, art in zip(runs, arts, strict=True):
        assert one.cache is not None
        docs[str(one.platform)] = art.manifest.to_json() | {"products": one.cache.to_json()}
        if not quiet and not as_json:
            _summary(art.path, art.manifest)
    if as_json:  # one platform: its manifest; several: {"platforms": {platform: manifest}}
        doc = next(iter(docs.values())) if len(docs) == 1 else {"platforms": docs}
        click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _platforms(text: str) -> list[Platform]:
    """The --platform list (comma-separated), each parsed once; BadInput for one named twice."""
    platforms = [Platform.parse(p.strip()) for p in text.split(",")]
    for p in platforms:
        if platforms.count(p) > 1:
            raise BadInput(f"--platform {text}: {p} is named twice")
    return platforms


def platform_dir(p: Platform) -> str:
    """The directory of platform `p`'s artifact in a multi-platform build's -o DIR: `linux-arm64`."""
    return str(p).replace("/", "-")


def _build_one(
    image: str,
    opts: BuildOptions,
    verify: bool | None,
    verify_on: str | None,
    own_recipe: Recipe | None,
    say: Say,
) -> Artifact:
    """One platform's build, then its verify and its push to the build cache (build_cmd's doc)."""
    assert opts.cache is not None
    art = build(image, opts)
    pulled = opts.cache.pulled("artifact")
    unverified = None  # why an artifact with checks to run was not verified
    if verify or verify_on:
        say(verify_artifact(art, say, verify_on or Hypervisor.QEMU, own_recipe))
    elif checks := plan(art, own_recipe):
        reason = "--no-verify" if verify is False else None if pulled else skip_reason(art)
        if pulled:
            say("verify: skipped, the artifact is from the registry cache, verified before it was pushed")
        elif reason:
            unverified = reason
            if verify is None:
                say(f"verify: skipped, {reason}; it would check {' and '.join(checks)}")
        else:
            say(verify_artifact(art, say, given=own_recipe))
    if not pulled and opts.cache.enabled:
        if unverified:  # the cache holds verified artifacts only: a hit skips the verify boot
            say(f"cache: the artifact is not pushed: it was not verified ({unverified})")
        else:
            opts.cache.push_artifact(art, say)
    for product in opts.cache.products:
        say(product.line())
    return art


main.add_command(push_cmd)
main.add_command(pull_cmd)
main.add_command(sign_cmd)
main.add_command(verify_cmd)
main.add_command(run_cmd)
main.add_command(sbom_cmd)
main.add_command(cache_cmd)
main.add_command(rig_cmd)
kernel.add_command(kernel_push_cmd)
main.add_command(kernel)


@main.command("rebuild")
@click.argument("target", metavar="ARTIFACT|REF")
@click.option(
    "--recipe", help="The recipe file, for an artifact built with --recipe FILE (checked by sha256)."
)
@click.option("--insecure", is_flag=True, help="Plain HTTP / unverified TLS for the registries.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages; the per-file lines still print.")
def rebuild_cmd(target: str, recipe: str | None, insecure: bool, quiet: bool) -> None:
    """Build ARTIFACT (a directory) or REF (a pulled VM image) again from its provenance and compare every
    file: exit 0 when all match, 1 on a mismatch, 2 when a recorded input cannot be had."""
    from .rebuild import rebuild

    say = stderr_say(quiet)
    result = rebuild(target, recipe, insecure, say)
    for f in result.files:
        click.echo(f.line())
    bad = sum(not f.match for f in result.files)
    say(
        f"rebuild: {bad} of {len(result.files)} files differ"
        if bad
        else f"rebuild: all {len(result.files)} files match (build key {result.inputs.key()})"
    )
    sys.exit(1 if bad else 0)


@main.command("explain")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("path")
def explain_cmd(artifact: Path, path: str) -> None:
    """Say why PATH is in the ARTIFACT's guest, or why minimize dropped it."""
    from .artifact import open_artifact
    from .explain import explain

    click.echo(explain(open_artifact(artifact).manifest.minimize, path))


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1000, "µs": 1000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def parse_duration(text: str, flag: str) -> int:
    """A Go duration (docker run's --health-* values: 30s, 1m30s, 1.5h, 250ms, 0) in nanoseconds."""
    if text == "0":
        return 0
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNIT_NS[m.group(2)])
        pos = m.end()
    if pos != len(text) or not text:
        raise BadInput(f"{flag} {text!r}: expected a duration like 30s, 1m30s or 500ms")
    return total


def _healthcheck(
    cmd: str | None,
    interval: str | None,
    timeout: str | None,
    start_period: str | None,
    start_interval: str | None,
    retries: int | None,
    none: bool,
) -> Healthcheck | None:
    """docker run's --health-* / --no-healthcheck as a Healthcheck to merge over the image's (None: none
    given)."""
    given = [
        f
        for f, v in (
            ("--health-cmd", cmd),
            ("--health-interval", interval),
            ("--health-timeout", timeout),
            ("--health-start-period", start_period),
            ("--health-start-interval", start_interval),
            ("--health-retries", retries),
        )
        if v is not None
    ]
    if none:
        if given:
            raise BadInput(f"--no-healthcheck conflicts with {given[0]}")
        return Healthcheck(("NONE",))
    if not given:
        return None
    if cmd == "":
        raise BadInput("--health-cmd: an empty command")
    ns = {
        f: parse_duration(v, f) if v is not None else 0
        for f, v in (
            ("--health-interval", interval),
            ("--health-timeout", timeout),
            ("--health-start-period", start_period),
            ("--health-start-interval", start_interval),
        )
    }
    try:
        return Healthcheck(
            ("CMD-SHELL", cmd) if cmd else (),
            ns["--health-interval"],
            ns["--health-timeout"],
            ns["--health-start-period"],
            ns["--health-start-interval"],
            retries or 0,
        )
    except SourceError as e:
        raise BadInput(f"--health-* options: {e}") from None


def _disk_size(text: str | None) -> int | None:
    """`--disk-size`: auto (None) or bytes with an optional K, M, G or T suffix (powers of 1024)."""
    if text is None or text == "auto":
        return None
    return parse_size(text, "--disk-size")


def _summary(path: Path, m: Manifest) -> None:
    i = m.initrd
    click.echo(
        f"{path}/initrd.img  {i.size / 1e6:.2f} MB {i.compression} "
        f"({i.uncompressed_size / 1e6:.1f} MB, {i.entries} entries)  sha256:{i.sha256[:12]}"
    )
    if d := m.disk:
        click.echo(
            f"{path}/disk.img    {d.size / 1e6:.1f} MB {d.format} ext4, mounted {d.mode} "
            f"({(d.content_bytes or 0) / 1e6:.1f} MB of files)  sha256:{d.sha256[:12]}"
        )
    if k := m.kernel:
        click.echo(
            f"{path}/kernel      {k.size / 1e6:.2f} MB {k.format}"
            + (f" {k.release} ({'+'.join(k.fragments or ())})" if k.release is not None else "")
        )
        click.echo(f"{path}/xen.cfg     xl create {path}/xen.cfg   (or: xbuild run {path})")
    if s := m.sbom:
        click.echo(
            f"{path}/sbom.cdx.json {s.format}, {s.components} components, {s.files} files  (xbuild sbom)"
        )


_stopped_by = signal.SIGINT


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: the atomic writers remove their temps and nothing partial is left."""
    global _stopped_by
    _stopped_by = signal.Signals(signum)
    raise KeyboardInterrupt


def run() -> None:
    """Entry point: run the CLI, turning XbuildError into one line and its exit code; SIGINT and SIGTERM
    into `xbuild: interrupted (SIGNAME)` and 128 + the signal's number, with nothing partial left. A signal
    the parent left ignored stays ignored (Python does so for SIGINT: a shell's background job)."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        main(standalone_mode=False)
    except XbuildError as e:
        click.echo(f"xbuild: error: {e}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns KeyboardInterrupt into Abort
        click.echo(f"xbuild: interrupted ({_stopped_by.name})", err=True)
        sys.exit(128 + _stopped_by)
    except click.ClickException as e:
        e.show()
        sys.exit(2)


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_cmd(as_json: bool) -> None:
    """Check the host's tools for every feature; print the apt line for what is missing.

    Exit 0 when everything but the optional (a dom0's `xl`) is there, else 1.
    """
    checks = check()
    missing = missing_packages(checks)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "checks": [
                        {
                            "name": c.need.name,
                            "package": c.need.package,
                            "feature": c.need.feature,
                            "found": c.found,
                            "optional": c.need.optional,
                        }
                        for c in checks
                    ],
                    "missing_packages": missing,
                },
                indent=2,
            )
        )
    else:
        for c in checks:
            state = "ok" if c.found else ("absent" if c.need.optional else "MISSING")
            click.echo(f"{state:8} {c.need.name:20} {c.need.feature:40} {c.found or c.need.package}")
        click.echo(apt_line(missing) if missing else "everything xbuild uses is installed")
    sys.exit(1 if missing else 0)
