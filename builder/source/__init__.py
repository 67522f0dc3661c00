"""Sources: turn an ImageRef into an Image, whichever transport it names."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SourceError
from ..image import Image, Platform
from ..options import Progress
from ..reference import ImageRef


@dataclass(frozen=True)
class SourceOptions:
    platform: Platform = Platform()
    insecure: bool = False  # plain HTTP for any registry
    progress: Progress | None = None


def load(ref: ImageRef, options: SourceOptions = SourceOptions()) -> Image:
    """The Image `ref` names, its manifest and config verified; layers are opened lazily."""
    if ref.transport in ("oci", "oci-archive", "docker-archive"):
        from . import layout

        return layout.load(ref, options.platform)
    if ref.transport == "docker":
        from . import registry

        return registry.load(ref, options)
    if ref.transport == "docker-daemon":
        from . import daemon

        return daemon.load(ref, options)
    raise SourceError(f"{ref}: the {ref.transport} transport is not supported yet")
