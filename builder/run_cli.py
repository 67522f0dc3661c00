"""`xbuild run`: boot an artifact (a directory, a pushed VM image, or an image built first) and
exit with its entrypoint's status."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import click

from .artifact import Artifact, open_artifact
from .build import BuildOptions, build
from .cache import cache_dir
from .errors import BadInput, PublishError, RunError
from .image import Platform
from .options import MEMORY_MB, NESTED_XEN_TYPE, Accel, Hypervisor, Say, XenType, choices, stderr_say
from .publish_cli import platform_option, verify_options
from .run.console import RunResult


def is_dom0() -> bool:
    try:
        return "control_d" in Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False


def _port(text: str) -> tuple[int, int]:
    host, sep, guest = text.partition(":")
    try:
        pair = (int(host), int(guest if sep else host))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected HOST:GUEST port numbers") from None
    if not all(0 < p < 65536 for p in pair):
        raise click.BadParameter(f"{text!r}: ports are 1-65535")
    return pair


def _key(name: str, platform: Platform | None) -> str:
    """The cache entry (`pulled/`, `built/`) of `name` for `platform` (None: the host's)."""
    return hashlib.sha256((name if platform is None else f"{name} {platform}").encode()).hexdigest()[:16]


def pull_cached(target: str, insecure: bool, platform: Platform | None = None) -> Artifact:
    """The VM image REF `target` (from an index: `platform`'s, None the host's) pulled into the cache
    (`pulled/<key>`, reused while every file is intact); PublishError when it is not an xbuild VM image."""
    from .publish import pull

    dest = cache_dir("pulled") / _key(target, platform)
    return open_artifact(pull(target, dest, insecure, reuse=True, platform=platform))


def resolve_artifact(
    target: str,
    insecure: bool,
    log: Say,
    verify_key: Path | None = None,
    policy: Path | None = None,
    platform: Platform | None = None,
) -> Artifact:
    """A directory as is; a registry REF pulled when it is an xbuild VM image, else built like `xbuild`.
    With `verify_key` or `policy`: only a registry VM image `sign.admit` admits (a signature verifies),
    pulled by the digest verified; anything else refused before anything is written. `platform` (None:
    the host's) picks the VM image from a multi-platform index, or the image to build; a directory is what
    it is (refused with a platform)."""
    path = Path(target)
    if platform is not None and path.is_dir():
        raise BadInput(f"{target} is a directory: --platform picks a registry VM image or an image to build")
    if verify_key is not None or policy is not None:
        from .publish import pull
        from .publish import target as registry_ref
        from .sign import admit

        if path.is_dir():
            raise BadInput(f"{target}: signatures are checked on a VM image in a registry, not a directory")
        pinned = admit(registry_ref(target), verify_key, policy, insecure, log)
        dest = cache_dir("pulled") / _key(str(pinned.docker_name), platform)
        pulled = pull(pinned, dest, insecure, reuse=True, platform=platform)
        log(f"pulled the VM image {pinned.docker_name}")
        return open_artifact(pulled)
    if path.is_dir():
        return open_artifact(path)
    from . import reference

    ref = reference.parse(target)
    if ref.transport == "docker":
        try:
            art = pull_cached(target, insecure, platform)
            log(f"pulled the VM image {target}")
            return art
        except PublishError as e:
            if "not an xbuild" not in str(e):
                raise
    log(f"building {target} first")
    opts = BuildOptions(output=cache_dir("built") / _key(target, platform), insecure=insecure, log=log)
    return build(target, replace(opts, platform=platform) if platform else opts)


@click.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("target", metavar="ARTIFACT")
@click.argument("args", nargs=-1, metavar="[-- ARGS...]")
@click.option(
    "--hypervisor",
    type=click.Choice(choices(Hypervisor)),
    default=Hypervisor.AUTO.value,
    show_default=True,
    help="auto: xl on a Xen dom0, else QEMU.",
)
@click.option(
    "-p",
    "--publish",
    "ports",
    multiple=True,
    metavar="HOST:GUEST",
    help="Forward 127.0.0.1:HOST to the guest's GUEST port (QEMU user networking).",
)
@click.option(
    "-e", "--env", "envs", multiple=True, metavar="KEY=VALUE", help="Set a variable for the program."
)
@click.option(
    "--memory", type=click.IntRange(*MEMORY_MB), metavar="MB", help="Guest memory [the artifact's]."
)
@click.option("--timeout", type=float, metavar="S", help="Stop the guest (gracefully) after S seconds.")
@click.option(
    "--xen-type",
    type=click.Choice(choices(XenType)),
    help=f"Xen guest type [the artifact's; {NESTED_XEN_TYPE} nested, pvh on arm64].",
)
@click.option(
    "--accel",
    type=click.Choice(choices(Accel)),
    default=Accel.AUTO.value,
    show_default=True,
    help="QEMU accelerator; auto uses KVM only where a probe boot proved it works.",
)
@click.option("--icount", is_flag=True, help="QEMU: deterministic guest time (-icount), for boot benchmarks.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry when pulling.")
@platform_option
@verify_options("Run a registry VM image")
@click.option("--json", "as_json", is_flag=True, help="Console to stderr; a JSON result on stdout.")
def run_cmd(
    target: str,
    args: tuple[str, ...],
    hypervisor: str,
    ports: tuple[str, ...],
    envs: tuple[str, ...],
    memory: int | None,
    timeout: float | None,
    xen_type: str | None,
    accel: str,
    icount: bool,
    insecure: bool,
    verify_key: Path | None,
    verify_policy: Path | None,
    platform: str | None,
    as_json: bool,
) -> None:
    """Boot ARTIFACT, stream its console, exit with the entrypoint's status.

    ARTIFACT is an artifact directory, a VM image pushed with `xbuild push`, or any image reference
    (built first). Words after `--` replace the image's Cmd.
    """
    log = stderr_say()
    forwards = [_port(p) for p in ports]
    for e in envs:
        if "=" not in e or e.startswith("="):
            raise BadInput(f"--env {e!r}: expected KEY=VALUE")
    kernel_args = [f"xbuild.env={e}" for e in envs]
    want = Platform.parse(platform) if platform else None
    art = resolve_artifact(target, insecure, log, verify_key, verify_policy, want).bootable()
    if hypervisor == Hypervisor.AUTO:
        hypervisor = Hypervisor.XEN if is_dom0() else Hypervisor.QEMU
    console = sys.stderr.buffer if as_json else sys.stdout.buffer
    check_memory(art, memory)
    memory = memory or art.manifest.guest.memory_mb
    result = _boot(
        art,
        hypervisor,
        forwards,
        memory,
        timeout,
        list(args),
        kernel_args,
        console,
        accel,
        icount,
        xen_type,
        log,
    )
    health = health_state(art, result)
    report = {
        "hypervisor": hypervisor,
        "exit_status": result.exit_status,
        "signal": result.signal,
        "boot_ms": result.boot_ms,
        "launch_to_exec_s": result.launch_to_exec_s,
        "error": result.error,
        "health": health,
        "phases": result.phases.to_json(),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        if result.boot_us is not None:
            launch = f", {result.launch_to_exec_s:.2f} s from launch" if result.launch_to_exec_s else ""
            log(f"booted to exec in {result.boot_ms:.0f} ms guest time{launch} ({hypervisor})")
            log(f"phases (host s since launch; guest boot clock): {result.phases.summary()}")
        if health != "none":
            log(f"health: {health} (last state of the image's HEALTHCHECK)")
    if result.fatal:
        raise RunError(f"the guest cannot run: {result.fatal} (at {memory} MB{_min_hint(art)})")
    if result.exit_status is None:
        raise RunError(f"the guest ended without an exit status{': ' + result.error if result.error else ''}")
    sys.exit(result.exit_status)


def check_memory(art: Artifact, memory: int | None) -> None:
    """BadInput (exit 2) when the guest would get less memory than the artifact's minimum
    (builder/memory.py): `memory` (--memory) when given, else the artifact's own."""
    need = art.manifest.guest.min_memory_mb
    given = memory or art.manifest.guest.memory_mb
    if need is not None and given < need:
        where = f"--memory {memory}" if memory else f"the artifact's guest.memory_mb {given}"
        raise BadInput(
            f"{where}: this artifact needs at least {need} MB (kernel, initrd, decompressor and the "
            "unpacked initramfs at once, and a NIC's share; less fails to unpack)"
        )


def _min_hint(art: Artifact) -> str:
    need = art.manifest.guest.min_memory_mb
    return f"; the artifact's minimum is {need} MB" if need else ""


def health_state(art: Artifact, result: RunResult) -> str:
    """none (the artifact has no health probe), starting (no probe decided yet), healthy or unhealthy
    (the last state the init reported on the console)."""
    if art.manifest.guest.health is None:
        return "none"
    return result.health or "starting"


def _boot(
    art: Artifact,
    hypervisor: str,
    ports: list[tuple[int, int]],
    memory: int,
    timeout: float | None,
    args: list[str],
    kernel_args: list[str],
    console: BinaryIO | None,
    accel: str,
    icount: bool,
    xen_type: str | None,
    log: Say,
) -> RunResult:
    if hypervisor == Hypervisor.QEMU:
        from .run import qemu

        return qemu.run(
            art,
            ports=ports,
            memory_mb=memory,
            timeout=timeout,
            extra_args=args,
            console=console,
            accel=accel,
            icount=icount,
            kernel_args=kernel_args,
        )
    from .run import xen

    if hypervisor == Hypervisor.XEN_NESTED:
        return xen.run_nested(
            art,
            xen_type,
            memory,
            timeout,
            args,
            console,
            ports=ports,
            kernel_args=kernel_args,
            progress=log,
        )
    if ports:
        raise BadInput("-p with --hypervisor xen: forward ports with the dom0's own bridge/vif set-up")
    return xen.run_xl(art, xen_type, memory, timeout, args, console, kernel_args)
