"""The build: reference → image → tree → minimized tree + init → initramfs (or disk) + kernel → artifact.

With `format=OutputFormat.DISK` the installed tree is written to an ext4 disk image (builder/disk.py) and the
initramfs holds only the init and its config, which tells the init to mount the disk as its root.

`build()` runs the stages in order and writes the artifact into a temp directory that is renamed
into place only when everything succeeded, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from . import __version__, init, provenance, reference, source
from .artifact import (
    CMDLINE,
    DISK,
    HOSTNAME,
    INITRD,
    KERNEL,
    PROVENANCE,
    XEN_CFG,
    Artifact,
    DiskInfo,
    Guest,
    Initrd,
    KernelInfo,
    Manifest,
    Network,
    Source,
    SourceLayer,
    Tool,
    XlDisk,
    cmdline_words,
    network_problem,
    prepare_output,
    write_manifest,
    xen_config,
)
from .blobs import check_unchanged
from .buildcache import BuildCache, Origin, Product, cached_artifact, init_binary, trimmed_kernel
from .cache import atomic_dir, file_sha256
from .compression import DEFAULT_COMPRESSION
from .cpio import pack
from .errors import BadInput, SourceError
from .flatten import flatten
from .guest import CONFIG_PATH, INIT_CMDLINE, ROOT_DEVICES, boot_tree, guest_config, install
from .image import Healthcheck, Image, Platform
from .inputs import BuildInputs, DiskInput, KernelInput
from .memory import MemoryNeed, memory_need
from .minimize import minimize
from .minimize.probe import check_probe_host
from .options import (
    DEFAULT_BRIDGE,
    DEFAULT_MEMORY_MB,
    DEFAULT_XEN_TYPE,
    DISK_MEMORY_MB,
    DiskFormat,
    DiskMode,
    MinimizeMode,
    NetworkMode,
    OutputFormat,
    Progress,
    Say,
    XenType,
    choices,
)
from .provenance import Dependencies
from .recipes import Recipe, load_recipe, recipe_for_ref
from .run.cmdline import with_ip
from .run.qemu import MACHINES
from .text import is_decimal
from .tree import Tree

GUEST_PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))  # what the init and the kernels are built for
XEN_CONSOLE = "console=hvc0"


@dataclass(frozen=True)
class BuildOptions:
    output: Path | None = None
    force: bool = False  # -o may replace a directory that is not an artifact
    compression: str = DEFAULT_COMPRESSION
    level: int | None = None
    epoch: int | None = None  # None: SOURCE_DATE_EPOCH, else the image's created time
    platform: Platform = field(default_factory=Platform)
    insecure: bool = False
    minimize: MinimizeMode = MinimizeMode.AUTO
    recipe: str | Recipe | None = None  # a recipe name or file, or one loaded; None: matched by repository
    kernel: str | None = "default"  # "default", a path, oci://REF, or None for no kernel
    memory_mb: int | None = None  # None: the recipe's, else DEFAULT_MEMORY_MB
    xen_type: XenType = DEFAULT_XEN_TYPE
    hostname: str | None = None  # None: the image's short name
    format: OutputFormat = OutputFormat.INITRAMFS
    disk_format: DiskFormat = DiskFormat.RAW  # with format disk
    disk_size: int | None = None  # bytes; None: auto (builder/disk.py auto_size)
    disk_mode: DiskMode = DiskMode.RW  # with format disk
    max_layer_size: int | None = None  # decompressed bytes per layer; None: blobs.max_layer_size()
    healthcheck: Healthcheck | None = None  # docker run's --health-*/--no-healthcheck over the image's
    pin: str | None = None  # the manifest digest the image must have (a registry is asked for it by digest)
    expect: BuildInputs | None = field(default=None, compare=False)  # build only from exactly these inputs
    network: NetworkMode = NetworkMode.AUTO  # xen.cfg's vif: auto = when the image exposes ports
    bridge: str | None = None  # dom0's bridge for the vif; None: the recipe's, else DEFAULT_BRIDGE
    ip: str | None = None  # the guest's static "ADDR/PREFIX[:GATEWAY]"; None: DHCP (ip=dhcp)
    progress: Progress | None = field(default=None, compare=False)
    cache: BuildCache | None = field(default=None, compare=False)  # --cache REPO and the product records
    log: Say = field(default=lambda msg: None, compare=False)

    def __post_init__(self) -> None:
        """The choices made members of their enums (a caller may pass their values as strings); BadInput
        naming the flag for a value that is none of them."""
        for name, (flag, members) in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices(members):
                raise BadInput(f"{flag} {value}: choose from {', '.join(choices(members))}")
            object.__setattr__(self, name, members(value))
        if (self.platform.os, self.platform.architecture) not in GUEST_PLATFORMS:
            served = ", ".join(f"{o}/{a}" for o, a in GUEST_PLATFORMS)
            raise BadInput(
                f"--platform {self.platform}: xbuild builds {served} guests only (its init and kernel)"
            )
        if self.platform.architecture == "arm64" and self.xen_type != XenType.PVH:  # libxl_arm: PVH only
            raise BadInput(f"--xen-type {self.xen_type}: Xen on arm64 runs pvh guests only")
        if self.bridge is not None and (why := network_problem(self.bridge)):
            raise BadInput(f"--bridge: {why}")
        if self.ip is not None:
            if self.network == NetworkMode.NONE:
                raise BadInput(f"--ip {self.ip}: --network none gives the guest no network")
            address, _, gateway = self.ip.partition(":")
            if why := network_problem(DEFAULT_BRIDGE, address, gateway or None):
                raise BadInput(f"--ip {self.ip}: {why} (expected ADDR/PREFIX[:GATEWAY])")


_CHOICES: dict[str, tuple[str, type[StrEnum]]] = {  # BuildOptions' enum fields and their flags
    "minimize": ("--minimize", MinimizeMode),
    "xen_type": ("--xen-type", XenType),
    "network": ("--network", NetworkMode),
    "format": ("--format", OutputFormat),
    "disk_format": ("--disk-format", DiskFormat),
    "disk_mode": ("--disk-mode", DiskMode),
}


def default_output(ref: reference.ImageRef) -> Path:
    return Path("out") / ref.short_name


def default_hostname(ref: reference.ImageRef) -> str:
    """The image's short name made a valid hostname (artifact.HOSTNAME): other characters become '-',
    at most 63, starting with a letter or digit; `xbuild` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", ref.short_name).lstrip("_.-")[:63]
    return name or "xbuild"


def source_date_epoch(image: Image, given: int | None) -> int | None:
    """The clamp for mtimes: explicit, else $SOURCE_DATE_EPOCH, else the image's created time."""
    if given is not None:
        return given
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not is_decimal(env):
            raise BadInput(f"SOURCE_DATE_EPOCH={env!r}: not a number of seconds")
        return int(env)
    if image.created:
        text = re.sub(r"(\.\d{6})\d+", r"\1", image.created)
        try:
            return int(datetime.fromisoformat(text).timestamp())
        except ValueError:
            return None
    return None


def resolve_ref(ref_text: str, opts: BuildOptions) -> reference.ImageRef:
    """Parse the reference; a bare one is looked up in the local Docker daemon first, like `docker run`."""
    ref = reference.parse(ref_text)
    if ref.transport == "docker" and not ref.explicit:
        from .source import daemon

        if daemon.find_local(ref, opts.platform):
            ref = dataclasses.replace(ref, transport="docker-daemon")
            opts.log(f"using {daemon.daemon_name(ref)} from the local Docker daemon")
        else:
            opts.log(f"pulling {ref.docker_name} from its registry")
    return ref


def _pinned(ref: reference.ImageRef, pin: str | None) -> reference.ImageRef:
    """`ref` asking a registry or the Docker daemon for the manifest `pin` rather than its tag."""
    return (
        dataclasses.replace(ref, digest=pin) if pin and ref.transport in ("docker", "docker-daemon") else ref
    )


def _recipe(ref: reference.ImageRef, opts: BuildOptions) -> Recipe | None:
    if isinstance(opts.recipe, Recipe):
        return opts.recipe
    return load_recipe(opts.recipe) if opts.recipe else recipe_for_ref(ref)


@dataclass(frozen=True)
class _KernelPlan:
    """What --kernel pairs: its build input, and for a given file its path and format (kernel.verify)."""

    input: KernelInput
    path: Path | None = None  # None: the trimmed kernel, built (or taken from the cache) by `_kernel`
    fmt: str = ""


def _kernel_plan(opts: BuildOptions, recipe: Recipe | None, arch: str) -> _KernelPlan | None:
    """The kernel for `arch` as a build input, nothing built yet: the trimmed kernel's key and fragments, or
    the given file (pulled for oci://, checked by kernel.verify) and its sha256; None for --kernel none."""
    from . import kernel as kern

    if opts.kernel is None:
        return None
    if opts.kernel == "default":
        default = kern.arch_of(arch).fragments
        fragments = default + tuple(
            f for f in (recipe.kernel_fragments if recipe else ()) if f not in default
        )
        return _KernelPlan(KernelInput(key=kern.build_key(fragments, arch=arch), fragments=fragments))
    if opts.kernel.startswith("oci://"):
        from .publish import pull_kernel

        path = pull_kernel(opts.kernel, opts.insecure)
    else:
        path = Path(opts.kernel)
        if not path.is_file():
            raise BadInput(f"--kernel {opts.kernel}: no such file")
    fmt = kern.verify(path, arch=arch).fmt
    return _KernelPlan(KernelInput(source=opts.kernel, sha256=file_sha256(path)), path, fmt)


def _kernel(opts: BuildOptions, plan: _KernelPlan, cache: BuildCache, arch: str) -> tuple[Path, KernelInfo]:
    """The `arch` kernel file to pair and what the manifest says of it (its size filled in once copied)."""
    if plan.path is not None:
        return plan.path, KernelInfo(size=0, format=plan.fmt, source=opts.kernel)
    k = trimmed_kernel(cache, plan.input.fragments or (), arch)
    return k.path, KernelInfo(size=0, format=k.fmt, key=k.key, release=k.release, fragments=k.fragments)


def build(ref_text: str, opts: BuildOptions = BuildOptions()) -> Artifact:
    """Build the artifact for `ref_text` and return it."""
    if opts.hostname is not None and not HOSTNAME.fullmatch(opts.hostname):
        raise BadInput(
            f"--hostname {opts.hostname!r}: letters, digits, '_', '.' and '-', at most 63, "
            "starting with a letter or digit"
        )
    disk = opts.format == OutputFormat.DISK
    if disk:
        from .disk import check_available

        check_available()
    if opts.minimize == MinimizeMode.TRACE:
        check_probe_host(trace=True)  # before any pull: a host that cannot trace is refused
    ref = resolve_ref(ref_text, opts)
    recipe = _recipe(ref, opts)
    out = opts.output or default_output(ref)
    _check_output(out, opts.force)
    image = source.load(
        _pinned(ref, opts.pin), source.SourceOptions(opts.platform, opts.insecure, opts.progress)
    )
    if opts.pin and image.manifest_digest != opts.pin:
        raise SourceError(f"{ref}: the image is {image.manifest_digest}, not {opts.pin}")
    opts.log(f"image {ref} ({image.manifest_digest[:19]}, {len(image.layers)} layers, {image.platform})")
    arch = image.platform.architecture  # the source gave the manifest for opts.platform, checked its config
    hostname = opts.hostname or default_hostname(ref)
    epoch = source_date_epoch(image, opts.epoch)
    memory = opts.memory_mb or _default_memory(recipe, disk)
    flags = cmdline_words(
        " ".join([_kernel_flags(arch), INIT_CMDLINE, *(recipe.cmdline if recipe else ())]),
        "the kernel command line",
    )
    kernel_plan = _kernel_plan(opts, recipe, arch)
    network = _network(opts, recipe, image)
    inputs = BuildInputs(
        source_reference=str(ref),
        source_digest=image.manifest_digest,
        platform=str(image.platform),
        recipe=recipe.name if recipe else None,
        recipe_sha256=recipe.sha256 if recipe else None,
        minimize=opts.minimize.value,
        kernel=kernel_plan.input if kernel_plan else None,
        init_key=init.key(arch),
        xbuild_version=__version__,
        compression=opts.compression,
        level=opts.level,
        format=opts.format.value,
        disk=DiskInput(opts.disk_format.value, opts.disk_mode.value, opts.disk_size) if disk else None,
        memory_mb=memory,
        xen_type=opts.xen_type.value,
        hostname=hostname,
        cmdline=flags,
        healthcheck=opts.healthcheck,
        source_date_epoch=epoch,
        network=network,
    )
    if opts.expect:
        opts.expect.check_same(inputs)
    opts.log(f"build key {inputs.key()}")
    cache = opts.cache or BuildCache(None, log=opts.log)
    if pulled := cached_artifact(cache, inputs.key(), image.manifest_digest, out, opts.force):
        return pulled
    start = time.monotonic()
    progress = opts.progress("layers", sum(layer.size for layer in image.layers)) if opts.progress else None
    flat = flatten(image, progress, opts.max_layer_size)
    # what the guest runs: the image's config with docker run's --health-* merged over its Healthcheck
    config = image.config
    if opts.healthcheck:
        config = dataclasses.replace(config, healthcheck=opts.healthcheck.merged(config.healthcheck))
    gc = guest_config(config, flat.tree, hostname)
    if disk:
        gc = dataclasses.replace(gc, root_devices=ROOT_DEVICES, root_mode=opts.disk_mode)
    tree, report = minimize(flat.tree, config, recipe, opts.minimize, arch)
    if opts.minimize != MinimizeMode.NONE:
        opts.log(report.summary().splitlines()[0])
    init_bin = init_binary(cache, arch)
    install(tree, gc, init_bin)
    kernel = _kernel(opts, kernel_plan, cache, arch) if kernel_plan else None
    guest = Guest.of(gc, memory_mb=memory, xen_type=opts.xen_type, recipe=recipe.name if recipe else None)
    with atomic_dir(out) as tmp:
        disk_section = _write_disk(tree, tmp, opts, epoch) if disk else None
        initramfs = boot_tree(tree) if disk else tree
        packed = pack(
            initramfs,
            tmp / INITRD,
            opts.compression,
            opts.level,
            epoch,
            last=CONFIG_PATH,
        )
        check_unchanged()  # the diffs pack and the disk read from are still the ones flatten verified
        initrd = Initrd(
            sha256=packed.sha256,
            size=packed.size,
            uncompressed_size=packed.uncompressed_size,
            compression=packed.compression,
            level=packed.level,
            entries=packed.entries,
        )
        kernel_info = None
        cmdline = ""
        if kernel:
            shutil.copyfile(kernel[0], tmp / KERNEL)
            kernel_info = dataclasses.replace(kernel[1], size=(tmp / KERNEL).stat().st_size)
            need = memory_need(tmp / KERNEL, tmp / INITRD, packed.compression, initramfs)
            guest = _min_memory(guest, need, opts)
            cmdline = f"console={MACHINES[f'linux/{arch}'].console} {flags}"
            (tmp / CMDLINE).write_text(cmdline + "\n")
            (tmp / XEN_CFG).write_text(
                xen_config(
                    gc.hostname,
                    _xen_extra(flags, network),
                    memory,
                    xen_type=opts.xen_type,
                    disks=(XlDisk(DISK, opts.disk_format, opts.disk_mode),) if disk else (),
                    vif=network.vif if network else None,
                )
            )
        from .sbom import Subject, write_sbom  # cyclonedx takes ~0.3 s to import: only when building

        sbom = write_sbom(
            tmp,
            flat.tree,
            tree,
            Subject(str(ref), image.manifest_digest, __version__, epoch),
            kernel,
            None if disk else packed.digests,  # a disk's initramfs is another tree than `tree`
        )
        opts.log(f"sbom: {sbom.components} components, {sbom.files} files ({sbom.format})")
        manifest = Manifest(
            tool=Tool("xbuild", __version__),
            source=_source(ref, image),
            initrd=initrd,
            guest=guest,
            image_config=_image_config(image),
            source_date_epoch=epoch,
            minimize=report.to_json(),
            disk=disk_section,
            kernel=kernel_info,
            provenance=PROVENANCE,
            network=network,
            sbom=sbom,
        )
        write_manifest(tmp, manifest)
        provenance.write(
            tmp,
            inputs,
            Dependencies(hashlib.sha256(init_bin).hexdigest(), file_sha256(tmp / KERNEL) if kernel else None),
        )
        prepare_output(out, opts.force)  # again: the directory may have changed during the build
    cache.record(Product("artifact", Origin.BUILT, time.monotonic() - start, inputs.key()))
    return Artifact(out, manifest, cmdline)


def _network(opts: BuildOptions, recipe: Recipe | None, image: Image) -> Network | None:
    """xen.cfg's network: with `--network bridge`, or `auto` and an image that exposes ports (or a given
    `--bridge` or `--ip`), a vif on `--bridge`, the recipe's bridge or DEFAULT_BRIDGE, the guest's address
    by DHCP or `--ip`; None (no vif) otherwise."""
    wanted = opts.network == NetworkMode.BRIDGE or bool(opts.bridge or opts.ip or image.config.exposed_ports)
    if opts.network == NetworkMode.NONE or not wanted:
        return None
    address, _, gateway = opts.ip.partition(":") if opts.ip else ("", "", "")
    bridge = opts.bridge or (recipe.bridge if recipe else None) or DEFAULT_BRIDGE
    return Network(bridge, address or None, gateway or None)


def _xen_extra(flags: str, network: Network | None) -> str:
    """xen.cfg's `extra`: Xen's console and the artifact's words; with a network, its `ip=` instead of
    any other (a recipe's) before the init's `--`."""
    extra = f"{XEN_CONSOLE} {flags}"
    return with_ip(extra, network.ip_word) if network else extra


def _min_memory(guest: Guest, need: MemoryNeed, opts: BuildOptions) -> Guest:
    """`guest` with its minimum memory (builder/memory.py), and a warning when it is given less."""
    if guest.memory_mb < need.min_mb:
        opts.log(
            f"warning: guest memory {guest.memory_mb} MB is below this artifact's minimum, {need.min_mb} MB "
            f"({need.summary()}); `xbuild run` refuses less"
        )
    return dataclasses.replace(guest, min_memory_mb=need.min_mb)


def _default_memory(recipe: Recipe | None, disk: bool) -> int:
    """The recipe's memory, else DEFAULT_MEMORY_MB; a disk guest gets at most DISK_MEMORY_MB."""
    memory = recipe.memory if recipe and recipe.memory else DEFAULT_MEMORY_MB
    return min(memory, DISK_MEMORY_MB) if disk else memory


def _write_disk(tree: Tree, tmp: Path, opts: BuildOptions, epoch: int | None) -> DiskInfo:
    """The root disk in the artifact directory and the manifest's `disk` section."""
    from .disk import write_disk

    img = write_disk(tree, tmp / DISK, opts.disk_format, opts.disk_size, epoch, opts.progress)
    return DiskInfo(
        format=img.format,
        mode=opts.disk_mode,
        size=img.size_bytes,
        file_size=img.path.stat().st_size,
        sha256=file_sha256(img.path),
        uuid=img.uuid,
        content_bytes=img.content_bytes,
        fstype="ext4",
        devices=tuple(ROOT_DEVICES),
    )


def _kernel_flags(arch: str) -> str:
    from .kernel import cmdline

    return cmdline(arch)


def _check_output(out: Path, force: bool) -> None:
    """Refuse an `-o` that would destroy data the build did not write (prepare_output) or is unwritable."""
    prepare_output(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"output {out}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise BadInput(f"output {out}: directory {out.parent} is not writable")


def _source(ref: reference.ImageRef, image: Image) -> Source:
    return Source(
        reference=str(ref),
        manifest_digest=image.manifest_digest,
        config_digest=image.config_digest,
        platform=str(image.platform),
        created=image.created,
        layers=tuple(SourceLayer(x.digest, x.size, x.media_type, x.diff_id) for x in image.layers),
    )


def _image_config(image: Image) -> dict[str, object]:
    cfg = asdict(image.config)
    cfg["labels"] = dict(image.config.labels)
    return cfg
