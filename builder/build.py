"""The build: reference → image → tree → initramfs (+ kernel) → artifact directory.

`build()` runs the stages in order and writes the artifact into a temp directory that is renamed
into place only when everything succeeded, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__, reference, source
from .artifact import INITRD, SCHEMA, Artifact, write_manifest
from .cache import atomic_dir
from .cpio import DEFAULT_COMPRESSION, pack
from .errors import BadInput
from .flatten import flatten
from .image import Image, Platform

Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class BuildOptions:
    output: Path | None = None
    compression: str = DEFAULT_COMPRESSION
    level: int | None = None
    epoch: int | None = None              # None: SOURCE_DATE_EPOCH, else the image's created time
    platform: Platform = Platform()
    insecure: bool = False
    progress: Progress | None = field(default=None, compare=False)
    log: Callable[[str], None] = field(default=lambda msg: None, compare=False)


def default_output(ref: reference.ImageRef) -> Path:
    return Path("out") / ref.short_name


def source_date_epoch(image: Image, given: int | None) -> int | None:
    """The clamp for mtimes: explicit, else $SOURCE_DATE_EPOCH, else the image's created time."""
    if given is not None:
        return given
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise BadInput(f"SOURCE_DATE_EPOCH={env!r}: not a number of seconds")
        return int(env)
    if image.created:
        text = re.sub(r"(\.\d{6})\d+", r"\1", image.created)
        try:
            return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return None
    return None


def build(ref_text: str, opts: BuildOptions = BuildOptions()) -> Artifact:
    """Build the artifact for `ref_text` and return it."""
    ref = reference.parse(ref_text)
    if ref.transport == "docker" and not ref.explicit:
        from .source import daemon

        if daemon.find_local(ref, opts.platform):
            ref = dataclasses.replace(ref, transport="docker-daemon")
            opts.log(f"using {daemon.daemon_name(ref)} from the local Docker daemon")
        else:
            opts.log(f"pulling {ref.docker_name} from its registry")
    image = source.load(ref, source.SourceOptions(opts.platform, opts.insecure, opts.progress))
    opts.log(f"image {ref} ({image.manifest_digest[:19]}, {len(image.layers)} layers, {image.platform})")
    progress = opts.progress("layers", sum(layer.size for layer in image.layers)) if opts.progress else None
    flat = flatten(image, progress)
    epoch = source_date_epoch(image, opts.epoch)
    out = opts.output or default_output(ref)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"output {out}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise BadInput(f"output {out}: directory {out.parent} is not writable")
    with atomic_dir(out) as tmp:
        packed = pack(flat.tree, tmp / INITRD, opts.compression, opts.level, epoch)
        manifest = _manifest(ref, image, epoch, {
            "file": INITRD, "sha256": packed.sha256, "size": packed.size,
            "uncompressed_size": packed.uncompressed_size, "compression": packed.compression,
            "level": packed.level, "entries": packed.entries,
        })
        write_manifest(tmp, manifest)
    return Artifact(out, manifest)


def _manifest(ref: reference.ImageRef, image: Image, epoch: int | None,
              initrd: dict[str, Any]) -> dict[str, Any]:
    cfg = asdict(image.config)
    cfg["labels"] = dict(image.config.labels)
    return {
        "schema": SCHEMA,
        "tool": {"name": "xbuild", "version": __version__},
        "source": {
            "reference": str(ref),
            "manifest_digest": image.manifest_digest,
            "config_digest": image.config_digest,
            "platform": str(image.platform),
            "created": image.created,
            "layers": [{"digest": x.digest, "size": x.size, "media_type": x.media_type, "diff_id": x.diff_id}
                       for x in image.layers],
        },
        "image_config": cfg,
        "source_date_epoch": epoch,
        "initrd": initrd,
    }
