"""The artifact directory: what a build writes and what run/push read.

    <dir>/initrd.img     the packed initramfs (with `--format disk`: only the init and its config)
    <dir>/disk.img       with `--format disk`: the root filesystem (ext4, raw or qcow2), mounted by the init
    <dir>/kernel         the guest kernel (when one was paired)
    <dir>/cmdline        the kernel command line, one line
    <dir>/xen.cfg        an xl config with paths relative to the directory
    <dir>/manifest.json  what went in: source image, config, sizes, digests, minimize report
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError

INITRD, KERNEL, CMDLINE, XEN_CFG, MANIFEST = "initrd.img", "kernel", "cmdline", "xen.cfg", "manifest.json"
DISK = "disk.img"
DISK_MODES = ("rw", "ro")   # how the guest mounts its root disk
SCHEMA = "xbuild.artifact.v1"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def initrd(self) -> Path:
        return self.path / INITRD

    @property
    def kernel(self) -> Path:
        return self.path / KERNEL

    @property
    def cmdline(self) -> str:
        p = self.path / CMDLINE
        return p.read_text().strip() if p.exists() else ""

    @property
    def disk(self) -> Path | None:
        """The root disk of a `--format disk` artifact; None for an initramfs-only one."""
        d = self.manifest.get("disk")
        return self.path / d["file"] if isinstance(d, dict) else None

    @property
    def disk_format(self) -> str:
        """raw | qcow2 (meaningful only when `disk` is set)."""
        return str((self.manifest.get("disk") or {}).get("format", "raw"))

    @property
    def disk_mode(self) -> str:
        """ro | rw: how the guest mounts its root disk."""
        return str((self.manifest.get("disk") or {}).get("mode", "rw"))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def open_artifact(path: Path) -> Artifact:
    """Read an artifact directory; ArtifactError naming what is missing or malformed."""
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not an xbuild artifact (no {MANIFEST})") from None
    except ValueError as e:
        raise ArtifactError(f"{mpath}: malformed ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{mpath}: not an xbuild artifact manifest (schema {SCHEMA} expected)")
    if not (path / INITRD).is_file():
        raise ArtifactError(f"{path}: missing {INITRD}")
    art = Artifact(path, manifest)
    disk = manifest.get("disk")
    if disk is not None and not (isinstance(disk, dict) and isinstance(disk.get("file"), str)):
        raise ArtifactError(f"{mpath}: malformed disk section")
    if art.disk is not None and not art.disk.is_file():
        raise ArtifactError(f"{path}: missing {art.disk.name} (the manifest names a root disk)")
    return art


def xen_disk_line(target: str, fmt: str = "raw", access: str = "rw") -> str:
    """The xl `disk` line attaching the root disk as xvda."""
    return f"disk = [ 'format={fmt}, vdev=xvda, access={access}, target={target}' ]"


def xen_config(name: str, extra: str, memory_mb: int, vcpus: int = 1, xen_type: str = "pvh",
               vif: bool = False, disk: tuple[str, str, str] | None = None) -> str:
    """An xl config for the artifact; kernel, ramdisk and disk paths are relative to the directory,
    so `cd DIR && xl create xen.cfg` works wherever the directory was copied.
    `disk` is (target, format, access)."""
    lines = [
        f'name = "{name}"',
        f'type = "{xen_type}"',
        f'kernel = "{KERNEL}"',
        f'ramdisk = "{INITRD}"',
        f'extra = "{extra}"',
        f"memory = {memory_mb}",
        f"vcpus = {vcpus}",
        'on_poweroff = "destroy"',
        'on_reboot = "destroy"',
        'on_crash = "destroy"',
    ]
    if disk:
        lines.append(xen_disk_line(*disk))
    if vif:
        lines.append("vif = [ 'bridge=xenbr0' ]")
    return "\n".join(lines) + "\n"
