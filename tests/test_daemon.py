"""The docker-daemon source against a real dockerd: `docker build` of a FROM-scratch image, then load it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import docker.models.images
import pytest

from builder import reference, source
from builder.build import BuildOptions, build
from builder.errors import SourceError
from builder.flatten import flatten
from builder.source import daemon
from builder.tree import FILE, read_content
from tests.fixtures.dockerd import Dockerd

BIG = 3 << 20  # a layer above daemon.SMALL, to go through the spooled path


def _static_binary(work: Path) -> Path:
    cc = shutil.which("musl-gcc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("musl-gcc or gcc is needed")
    (work / "hello.c").write_text('#include <unistd.h>\nint main(void){write(1,"hi\\n",3);return 0;}\n')
    out = work / "hello"
    subprocess.run(
        [cc, "-static", "-Os", "-o", str(out), str(work / "hello.c")], check=True, capture_output=True
    )
    return out


@pytest.fixture(scope="module")
def myapp(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """`myapp:dev` in the test daemon: FROM scratch, a static binary and a 3 MiB data file (two layers)."""
    ctx = tmp_path_factory.mktemp("myapp")
    files = {"hello": _static_binary(ctx).read_bytes(), "data/big.bin": os.urandom(BIG)}
    (ctx / "data").mkdir()
    (ctx / "data/big.bin").write_bytes(files["data/big.bin"])
    (ctx / "Dockerfile").write_text(
        'FROM scratch\nCOPY hello /hello\nCOPY data/ /data/\nENTRYPOINT ["/hello"]\n'
    )
    (ctx / "hello.c").unlink()
    dockerd.docker("build", "-q", "-t", "myapp:dev", ".", cwd=ctx)
    return files


@pytest.fixture
def host(dockerd: Dockerd, monkeypatch: pytest.MonkeyPatch, xbuild_cache: Path) -> Dockerd:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    return dockerd


def test_load_streams_save_into_cache(host: Dockerd, myapp: dict[str, bytes], xbuild_cache: Path) -> None:
    image = source.load(reference.parse("docker-daemon:myapp:dev"))
    assert image.config.entrypoint == ("/hello",)
    assert len(image.layers) == 2
    assert all((xbuild_cache / "diffs/sha256" / layer.diff_id[7:]).is_file() for layer in image.layers)
    assert not list((xbuild_cache / "tmp").iterdir())  # spooled members were renamed in, none left
    tree = flatten(image).tree
    found = {
        path.lstrip("/"): hashlib.sha256(read_content(node)).digest()
        for path, node in tree.walk()
        if node.kind == FILE
    }
    assert found == {name: hashlib.sha256(data).digest() for name, data in myapp.items()}


def test_same_manifest_digest_as_docker_archive(
    host: Dockerd, myapp: dict[str, bytes], tmp_path: Path
) -> None:
    archive = tmp_path / "save.tar"
    host.docker("save", "-o", str(archive), "myapp:dev")
    from_daemon = source.load(reference.parse("docker-daemon:myapp:dev"))
    from_archive = source.load(reference.parse(f"docker-archive:{archive}"))
    assert from_daemon.manifest_digest == from_archive.manifest_digest
    assert [x.diff_id for x in from_daemon.layers] == [x.diff_id for x in from_archive.layers]


def test_warm_load_does_not_save(
    host: Dockerd, myapp: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = source.load(reference.parse("docker-daemon:myapp:dev"))

    def no_save(*args: object, **kwargs: object) -> None:
        raise AssertionError("docker save called on a warm cache")

    monkeypatch.setattr(docker.models.images.Image, "save", no_save)
    assert source.load(reference.parse("docker-daemon:myapp:dev")).manifest_digest == first.manifest_digest


def test_find_local(host: Dockerd, myapp: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    assert daemon.find_local(reference.parse("myapp:dev"))
    assert daemon.find_local(reference.parse("docker.io/library/myapp:dev"))
    assert not daemon.find_local(reference.parse("docker://myapp:dev"))  # explicit: registry only
    assert not daemon.find_local(reference.parse("myapp:other"))
    assert not daemon.find_local(reference.parse("myapp:dev"), source.Platform("linux", "arm64"))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{host.root}/nothing.sock")
    assert not daemon.find_local(reference.parse("myapp:dev"))


def test_bare_reference_builds_from_daemon(host: Dockerd, myapp: dict[str, bytes], tmp_path: Path) -> None:
    """What the build does for `xbuild myapp:dev`: found locally, loaded as docker-daemon:, packed."""
    ref = reference.parse("myapp:dev")
    assert ref.transport == "docker" and not ref.explicit and daemon.find_local(ref)
    art = build(
        str(reference.ImageRef("docker-daemon", ref.registry, ref.repository, ref.tag)),
        BuildOptions(output=tmp_path / "out", kernel=None),
    )
    assert art.manifest.source.reference == "docker-daemon:docker.io/library/myapp:dev"
    assert art.initrd.stat().st_size > 0


def test_missing_image_and_no_daemon(
    host: Dockerd, myapp: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SourceError, match="no such image in the Docker daemon") as e:
        source.load(reference.parse("docker-daemon:nothere:1"))
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{host.root}/nothing.sock")
    with pytest.raises(SourceError, match="no Docker daemon answers at unix://") as e:
        source.load(reference.parse("docker-daemon:myapp:dev"))
    assert "\n" not in str(e.value)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_repeated_layer_is_a_symlink_in_save(host: Dockerd, tmp_path: Path) -> None:
    """`docker save` writes a layer whose diff_id it already wrote as a symlink to the first copy."""
    layer = _tar([("blob.bin", os.urandom(BIG))])
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/x"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": ["dupe:1"], "Layers": ["a/layer.tar", "b/layer.tar"]}]
    ).encode()
    archive = tmp_path / "dupe.tar"
    archive.write_bytes(
        _tar(
            [
                ("a/layer.tar", layer),
                ("b/layer.tar", layer),
                (config_name, config),
                ("manifest.json", manifest),
            ]
        )
    )
    host.docker("load", "-q", "-i", str(archive))
    image = source.load(reference.parse("docker-daemon:dupe:1"))
    assert [x.diff_id for x in image.layers] == [diff_id, diff_id]
    assert [x.digest for x in image.layers] == [diff_id, diff_id]
    assert "blob.bin" in {path.lstrip("/") for path, _ in flatten(image).tree.walk()}
