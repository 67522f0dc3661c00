"""The registry source (`docker://`): an image of a registry repository, through `oci.repository`.

A tag is resolved with one `HEAD` of its manifest (`Docker-Content-Digest`); manifests, configs and layers
are fetched by digest, verified and kept in the blob cache, so a warm load costs that one request and a
load pinned by a cached digest costs none. Layers are downloaded only when `Layer.open()` is called.
Plain HTTP is used for loopback registries and with `insecure`; HTTPS otherwise, with no fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO

from ..blobs import blob_path, present
from ..errors import SourceError
from ..image import Image
from ..oci.manifest import Descriptor, build_image, descriptor
from ..oci.repository import Repository
from ..reference import ImageRef
from . import SourceOptions


def load(ref: ImageRef, options: SourceOptions) -> Image:
    """The Image `ref` names in its registry, resolved to `options.platform`; layers download lazily."""
    if not ref.registry or not ref.repository:
        raise SourceError(f"{ref}: not a registry reference")
    what = str(ref)
    repo = Repository(
        ref.registry,
        ref.repository,
        what=what,
        insecure=options.insecure,
        no_credentials_hint="; the image may not exist or need a login",
    )

    def opener(desc: Descriptor) -> Callable[[], IO[bytes]]:
        def open_layer() -> IO[bytes]:
            path = blob_path(desc.digest)
            if not present(path):
                progress = options.progress
                advance = progress(f"layer {desc.digest[:19]}", desc.size) if progress else None
                with repo:
                    repo.blob(desc, f"layer {desc.digest}", advance)
            return open(path, "rb")

        return open_layer

    with repo:
        manifest = repo.manifest(ref, options.platform)
        config_raw = repo.config(descriptor(manifest.doc.get("config"), f"{what} config"), "config")
        return build_image(ref, manifest.digest, manifest.doc, config_raw, opener, what, options.platform)
