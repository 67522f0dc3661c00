"""Local sources: an OCI layout, the same layout as an oci-archive, and a `docker save` archive load alike."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from builder.errors import SourceError
from builder.flatten import flatten
from builder.image import Image
from builder.reference import parse
from builder.source import load
from tests.fixtures.images import OciImage, make_busybox_image, make_whiteout_image, tree_signature

pytestmark = pytest.mark.usefixtures("xbuild_cache")


def oci_archive(layout: Path, out: Path, prefix: str = "") -> Path:
    """`layout` as an (uncompressed) oci-archive tar, member names prefixed with `prefix`."""
    with tarfile.open(out, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=prefix + str(path.relative_to(layout)), recursive=False)
    return out


def docker_archive(images: list[tuple[OciImage, str]], out: Path) -> Path:
    """A `docker save` archive (manifest.json, <config>.json, <n>/layer.tar) of (image, repo tag) pairs."""
    entries = []
    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for image, tag in images:
            blobs = image.layout / "blobs" / "sha256"
            index = json.loads((image.layout / "index.json").read_text())
            desc = next(
                m
                for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == image.name
            )
            manifest = json.loads((blobs / desc["digest"][7:]).read_bytes())
            config_name = manifest["config"]["digest"][7:] + ".json"
            add(config_name, (blobs / config_name[:-5]).read_bytes())
            layers = []
            for layer in manifest["layers"]:
                name = f"{layer['digest'][7:]}/layer.tar"
                add(name, gzip.decompress((blobs / layer["digest"][7:]).read_bytes()))
                layers.append(name)
            entries.append({"Config": config_name, "RepoTags": [tag], "Layers": layers})
        add("manifest.json", json.dumps(entries).encode())
    return out


def summary(image: Image) -> tuple[object, ...]:
    return image.config, image.config_digest, tuple(layer.diff_id for layer in image.layers)


@pytest.fixture
def two_images(tmp_path: Path) -> tuple[OciImage, OciImage]:
    layout = tmp_path / "oci"
    return make_whiteout_image(layout), make_busybox_image(layout)


@pytest.mark.parametrize("transport", ["oci-archive", "oci-archive-dot", "docker-archive"])
def test_transports_load_the_same_image(tmp_path: Path, whiteout_image: OciImage, transport: str) -> None:
    reference = load(parse(whiteout_image.ref))
    if transport == "docker-archive":
        ref = f"docker-archive:{docker_archive([(whiteout_image, 'whiteout:latest')], tmp_path / 'd.tar')}"
    else:
        prefix = "./" if transport.endswith("-dot") else ""
        ref = f"oci-archive:{oci_archive(whiteout_image.layout, tmp_path / 'o.tar', prefix)}:whiteout"
    image = load(parse(ref))
    assert summary(image) == summary(reference)
    assert tree_signature(flatten(image).tree) == tree_signature(flatten(reference).tree)


def test_oci_ref_name_selects_the_image(two_images: tuple[OciImage, OciImage]) -> None:
    whiteout, busybox = two_images
    assert load(parse(busybox.ref)).config.cmd == ("sh",)
    assert load(parse(whiteout.ref)).config.cmd == ("/bin/sh",)


def test_single_image_needs_no_name(whiteout_image: OciImage) -> None:
    assert load(parse(f"oci:{whiteout_image.layout}")).config.cmd == ("/bin/sh",)


def test_docker_archive_tag_selection(tmp_path: Path, two_images: tuple[OciImage, OciImage]) -> None:
    whiteout, busybox = two_images
    archive = docker_archive([(whiteout, "whiteout:latest"), (busybox, "busybox:1.36")], tmp_path / "d.tar")
    assert load(parse(f"docker-archive:{archive}:busybox:1.36")).config.cmd == ("sh",)
    assert load(parse(f"docker-archive:{archive}:whiteout")).config.cmd == ("/bin/sh",)
    with pytest.raises(SourceError, match="holds 2 images"):
        load(parse(f"docker-archive:{archive}"))
    with pytest.raises(SourceError, match="no image tagged 'nope'"):
        load(parse(f"docker-archive:{archive}:nope"))


def test_errors(tmp_path: Path, two_images: tuple[OciImage, OciImage]) -> None:
    layout = two_images[0].layout
    cases = {
        f"oci:{tmp_path}/missing": "not an OCI image layout",
        f"oci:{layout}:nope": "no image tagged 'nope' (has: busybox, whiteout)",
        f"oci:{layout}": "holds 2 images",
        f"oci-archive:{tmp_path}/missing.tar": "no such archive",
        f"docker-archive:{tmp_path}/missing.tar": "no such archive",
    }
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 1024)
    cases[f"oci-archive:{tmp_path}/junk.tar"] = "not an uncompressed tar archive"
    for ref, message in cases.items():
        with pytest.raises(SourceError) as info:
            load(parse(ref))
        assert message in str(info.value) and info.value.exit_code == 2, ref
