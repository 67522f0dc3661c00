"""Push and pull of VM artifacts and kernels against a real docker-registry (distribution 2.8)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner

from builder import publish
from builder.artifact import (
    CMDLINE,
    DISK,
    INITRD,
    KERNEL,
    MANIFEST,
    PROVENANCE,
    XEN_CFG,
    open_artifact,
    xen_config,
)
from builder.build import BuildOptions, build
from builder.cache import cache_dir, file_sha256
from builder.errors import ArtifactError, PublishError, RegistryUnavailable
from builder.kernel import Kernel, list_kernels, verify_cached
from builder.kernel import cached as kernel_cached
from builder.oci.client import Body
from builder.oci.repository import Repository
from builder.publish_cli import kernel_push_cmd, pull_cmd, push_cmd
from builder.reference import parse
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.fixtures.images import OciImage, make_busybox_image
from tests.fixtures.registry import Registry, RegistryProxy, TokenIssuer, free_port

EPOCH = 1_700_000_000


def _artifact(image_ref: str, out: Path) -> Path:
    """A complete artifact directory: built initrd + manifest, and a stand-in kernel, cmdline, xen.cfg."""
    build(image_ref, BuildOptions(output=out, epoch=EPOCH, kernel=None))
    (out / KERNEL).write_bytes(hashlib.sha256(b"kernel").digest() * 40000)  # 1.28 MB, deterministic
    (out / CMDLINE).write_text("console=hvc0 quiet\n")
    (out / XEN_CFG).write_text(xen_config("busybox", "console=hvc0 quiet", 128))
    return out


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact per module, built with a cache of its own; tests get copies."""
    work = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XBUILD_CACHE", str(work / "cache"))
        return _artifact(make_busybox_image(work / "busybox-oci").ref, work / "art")


@pytest.fixture
def artifact(built: Path, tmp_path: Path, xbuild_cache: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "art"))


def test_round_trip(artifact: Path, registry: Registry, tmp_path: Path, xbuild_cache: Path) -> None:
    ref = f"{registry.host}/vm/busybox:rt"
    t0 = time.monotonic()
    pushed = publish.push(artifact, ref)
    t1 = time.monotonic()
    assert pushed.reference == f"{ref}@{pushed.digest}" and pushed.uploaded == 7
    dest = tmp_path / "pulled"
    assert publish.pull(ref, dest) == dest
    t2 = time.monotonic()
    assert _digests(dest) == _digests(artifact)
    print(f"push {t1 - t0:.3f} s, pull {t2 - t1:.3f} s")
    # pulling by digest into the same directory replaces it, from the blob cache; a file of the user's
    # there makes it not an artifact: refused, unless forced
    (dest / "stale").write_text("x")
    with pytest.raises(ArtifactError, match=r"not an xbuild artifact \(it holds stale\)"):
        publish.pull(pushed.reference, dest)
    assert (dest / "stale").read_text() == "x"
    publish.pull(pushed.reference, dest, force=True)
    assert _digests(dest) == _digests(artifact)
    publish.pull(pushed.reference, dest)
    assert _digests(dest) == _digests(artifact)


def test_manifest_is_an_oci_artifact(artifact: Path, registry: Registry) -> None:
    pushed = publish.push(artifact, f"{registry.host}/vm/busybox:shape")
    raw, media_type = registry.manifest("vm/busybox", "shape")
    assert media_type == publish.OCI_MANIFEST
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed.digest
    doc = json.loads(raw)
    assert set(doc) == {"schemaVersion", "mediaType", "artifactType", "config", "layers", "annotations"}
    assert (doc["schemaVersion"], doc["mediaType"], doc["artifactType"]) == (
        2,
        publish.OCI_MANIFEST,
        publish.VM_ARTIFACT,
    )
    assert doc["config"]["mediaType"] == publish.VM_CONFIG
    files = _digests(artifact)
    assert doc["config"]["digest"] == "sha256:" + files["manifest.json"]
    titles = [x["annotations"][publish.TITLE] for x in doc["layers"]]
    assert titles == ["kernel", "initrd.img", "cmdline", "xen.cfg", PROVENANCE, "sbom.cdx.json"]
    assert [x["mediaType"] for x in doc["layers"]] == [
        "application/vnd.xbuild.vm.kernel.v1",
        "application/vnd.xbuild.vm.initrd.v1+zstd",
        "application/vnd.xbuild.vm.cmdline.v1",
        "application/vnd.xbuild.vm.xen-cfg.v1",
        publish.VM_OTHER_FILE,
        publish.VM_OTHER_FILE,
    ]
    for d in [doc["config"], *doc["layers"]]:
        assert set(d) <= {"mediaType", "digest", "size", "annotations"} and isinstance(d["size"], int)
        blob = httpx.get(f"{registry.url}/v2/vm/busybox/blobs/{d['digest']}", follow_redirects=True).content
        assert (len(blob), "sha256:" + hashlib.sha256(blob).hexdigest()) == (d["size"], d["digest"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert doc["annotations"] == {
        "org.opencontainers.image.created": "2023-11-14T22:13:20Z",
        "org.opencontainers.image.base.digest": manifest["source"]["manifest_digest"],
        "org.opencontainers.image.base.name": manifest["source"]["reference"],
        "io.xbuild.tool.version": manifest["tool"]["version"],
    }
    inspect = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/vm/busybox:shape"],
        capture_output=True,
        check=True,
    )
    assert inspect.stdout == raw


def test_push_is_reproducible_skips_and_mounts(artifact: Path, registry: Registry, tmp_path: Path) -> None:
    first = publish.push(artifact, f"{registry.host}/vm/repro:a")
    source_ref = json.loads((artifact / "manifest.json").read_text())["source"]["reference"]
    again = publish.push(_artifact(source_ref, tmp_path / "rebuilt"), f"{registry.host}/vm/repro:b")
    assert again.digest == first.digest
    assert (again.uploaded, again.present, again.mounted) == (0, 7, 0)
    other = publish.push(artifact, f"{registry.host}/elsewhere/repro:a")
    assert (other.digest, other.uploaded, other.mounted) == (first.digest, 0, 7)


def test_failed_push_leaves_tag(artifact: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = f"{registry.host}/vm/half:t"
    before = publish.push(artifact, ref)
    (artifact / KERNEL).write_bytes(b"another kernel")
    real = Repository.ensure_blob

    def refuse_kernel(self: Repository, digest: str, size: int, content: Body, name: str) -> str:
        if name == KERNEL:
            raise PublishError(f"{ref}: the registry refused upload of kernel: too large (HTTP 413)")
        return real(self, digest, size, content, name)

    monkeypatch.setattr(Repository, "ensure_blob", refuse_kernel)
    with pytest.raises(PublishError, match="413"):
        publish.push(artifact, ref)
    assert "sha256:" + hashlib.sha256(registry.manifest("vm/half", "t")[0]).hexdigest() == before.digest


def _docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, creds: str) -> None:
    d = tmp_path / "docker-config"
    d.mkdir()
    entry = {"auth": base64.b64encode(creds.encode()).decode()}
    (d / "config.json").write_text(json.dumps({"auths": {host: entry}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))


def test_push_needs_credentials(
    artifact: Path, registry_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "ci", "s3cret"], check=True, capture_output=True)
    reg = registry_factory(auth={"htpasswd": {"realm": "xbuild-test", "path": str(htpasswd)}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    with pytest.raises(PublishError, match=r"access denied \(HTTP 401.*no credentials for 127\.0\.0\.1") as e:
        publish.push(artifact, f"{reg.host}/vm/locked:v1")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    _docker_config(tmp_path, monkeypatch, reg.host, "ci:wrong")
    with pytest.raises(PublishError, match="the credentials were refused"):
        publish.push(artifact, f"{reg.host}/vm/locked:v1")
    (tmp_path / "docker-config" / "config.json").unlink()
    (tmp_path / "docker-config").rmdir()
    _docker_config(tmp_path, monkeypatch, reg.host, "ci:s3cret")
    pushed = publish.push(artifact, f"{reg.host}/vm/locked:v1")
    dest = publish.pull(f"{reg.host}/vm/locked:v1", tmp_path / "pulled")
    assert _digests(dest) == _digests(artifact) and pushed.uploaded == 7


def test_push_to_read_only_registry(artifact: Path, tmp_path: Path) -> None:
    work = tmp_path / "ro"
    work.mkdir()
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(work / "data")},
            "maintenance": {"readonly": {"enabled": True}},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    (work / "config.yml").write_text(json.dumps(config))
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(work / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        with pytest.raises(PublishError, match="read-only") as e:
            publish.push(artifact, f"127.0.0.1:{port}/vm/ro:v1")
        assert "\n" not in str(e.value)
    finally:
        proc.terminate()
        proc.wait(10)


def test_pull_rejects_other_things(
    artifact: Path, registry: Registry, tmp_path: Path, busybox_image: OciImage
) -> None:
    registry.push(busybox_image.layout, busybox_image.name, "plain/busybox:1")
    dest = tmp_path / "dest"
    with pytest.raises(PublishError, match=r"not an xbuild VM image artifact \(it is a container image\)"):
        publish.pull(f"{registry.host}/plain/busybox:1", dest)
    with pytest.raises(PublishError, match="no-such:tag: manifest unknown"):
        publish.pull(f"{registry.host}/plain/no-such:tag", dest)
    (tmp_path / "not-an-artifact").mkdir()
    (tmp_path / "not-an-artifact" / "precious").write_text("keep me")
    publish.push(artifact, f"{registry.host}/vm/busybox:x")
    with pytest.raises(ArtifactError, match=r"not an xbuild artifact \(it holds precious\)"):
        publish.pull(f"{registry.host}/vm/busybox:x", tmp_path / "not-an-artifact")
    assert not dest.exists() and (tmp_path / "not-an-artifact" / "precious").read_text() == "keep me"


def test_pull_verifies_digests(
    artifact: Path, registry: Registry, tmp_path: Path, xbuild_cache: Path
) -> None:
    pushed = publish.push(artifact, f"{registry.host}/vm/corrupt:v1")
    layers = json.loads(registry.manifest("vm/corrupt", "v1")[0])["layers"]
    initrd = next(x for x in layers if x["annotations"][publish.TITLE] == "initrd.img")
    blob = registry.blob_file(initrd["digest"])
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    try:
        with pytest.raises(PublishError, match="initrd.img: digest mismatch") as e:
            publish.pull(pushed.reference, tmp_path / "dest")
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
        # nothing half-written beside the destination
        assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "xbuild-cache"]
    finally:
        data[100] ^= 0xFF
        blob.write_bytes(bytes(data))


def _fake_kernel(key: str) -> Kernel:
    d = cache_dir("kernels") / key
    d.mkdir()
    (d / "vmlinux").write_bytes(b"\x7fELF" + os.urandom(200_000))
    (d / "bzImage").write_bytes(os.urandom(100_000))
    (d / "config").write_text("CONFIG_64BIT=y\n")
    k = Kernel(key, d / "vmlinux", "elf", ("base", "xen"), "6.1.0", 200_004, d / "bzImage")
    (d / "kernel.json").write_text(
        json.dumps(
            {
                "key": key,
                "path": str(k.path),
                "fmt": "elf",
                "fragments": ["base", "xen"],
                "release": "6.1.0",
                "size": 200_004,
                "bzimage": str(k.bzimage),
            }
        )
    )
    return k


def test_kernel_push_pull(
    registry: Registry, xbuild_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = _fake_kernel("ab" * 32)
    before = _digests(kernel.path.parent)
    pushed = publish.push_kernel(kernel, f"{registry.host}/kernels/xen:6.1")
    doc = json.loads(registry.manifest("kernels/xen", "6.1")[0])
    assert doc["artifactType"] == publish.KERNEL_ARTIFACT
    assert doc["config"]["mediaType"] == publish.KERNEL_CONFIG
    assert doc["layers"][0]["mediaType"] == "application/vnd.xbuild.kernel.elf.v1"
    with pytest.raises(PublishError, match=r"not an xbuild VM image artifact \(it is an xbuild kernel\)"):
        publish.pull(pushed.reference, tmp_path / "vm")
    monkeypatch.setenv("XBUILD_CACHE", str(tmp_path / "other-runner-cache"))
    path = publish.pull_kernel(f"oci://{registry.host}/kernels/xen:6.1")
    pulled = _digests(path.parent)
    # push recorded the sha256 of each file in kernel.json (the cache record, checked on use): pulled as is
    assert path.name == "vmlinux" and pulled == _digests(kernel.path.parent)
    assert pulled.pop("kernel.json") != before.pop("kernel.json") and pulled == before
    assert json.loads((path.parent / "kernel.json").read_text())["sha256"] == pulled
    assert [k.key for k in list_kernels()] == [kernel.key]


def test_cli_push_pull(artifact: Path, registry: Registry, tmp_path: Path) -> None:
    group = click.Group(commands={"push": push_cmd, "pull": pull_cmd})
    runner = CliRunner()
    done = runner.invoke(group, ["push", str(artifact), f"{registry.host}/vm/cli:v1"])
    assert done.exit_code == 0, done.output
    reference = done.stdout.strip().splitlines()[-1]
    assert reference.startswith(f"{registry.host}/vm/cli:v1@sha256:")
    done = runner.invoke(group, ["pull", reference, "-o", str(tmp_path / "out")])
    assert done.exit_code == 0 and done.stdout.strip() == str(tmp_path / "out")
    done = runner.invoke(group, ["push", str(artifact), f"{registry.host}/vm/cli:v1", "--json"])
    assert json.loads(done.stdout)["present"] == 7


def test_explicit_docker_prefix() -> None:
    assert parse("docker://myapp:dev").explicit and not parse("myapp:dev").explicit
    assert parse("docker://myapp:dev") == parse("myapp:dev")  # `explicit` does not take part in equality


def test_cli_kernel_push(registry: Registry, xbuild_cache: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(kernel_push_cmd, [f"{registry.host}/kernels/cli:1"])
    assert isinstance(done.exception, PublishError) and "no kernel in the cache" in str(done.exception)
    kernel = _fake_kernel("cd" * 32)
    _fake_kernel("ce" * 32)
    done = runner.invoke(kernel_push_cmd, [f"{registry.host}/kernels/cli:1", "--key", "c"])
    assert isinstance(done.exception, PublishError) and "2 cached kernels match" in str(done.exception)
    done = runner.invoke(kernel_push_cmd, [f"{registry.host}/kernels/cli:1", "--key", "cd", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["uploaded"] == 4 and kernel.key.startswith("cd")


def test_push_retries_transient_failures(
    artifact: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XBUILD_REGISTRY_RETRY_DELAY", "0.01")
    proxy = RegistryProxy(registry.url, fail=2, fail_status=503)
    try:
        pushed = publish.push(artifact, f"{proxy.host}/vm/flaky:v1")
        first = proxy.requests[0]
        assert first[0] == "HEAD" and proxy.requests[:3] == [first] * 3  # two 503s, then answered
        assert pushed.uploaded == 7
        proxy.fail = 100
        with pytest.raises(RegistryUnavailable, match=r"failing \(HTTP 503\) after 4 tries") as e:
            publish.pull(f"{proxy.host}/vm/flaky:v1", tmp_path / "dest")
        assert e.value.exit_code == 2 and not (tmp_path / "dest").exists()
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "status, fail, message",
    [
        (403, 1, r"access denied \(HTTP 403\); no credentials for 127\.0\.0\.1"),
        (413, 2, r"refused upload of manifest\.json: too large \(HTTP 413\)"),
    ],
)
def test_push_refused(artifact: Path, registry: Registry, status: int, fail: int, message: str) -> None:
    proxy = RegistryProxy(registry.url, fail=fail, fail_status=status)
    try:
        with pytest.raises(PublishError, match=message) as e:
            publish.push(artifact, f"{proxy.host}/vm/refused:v1")
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    finally:
        proxy.close()
    assert httpx.get(f"{registry.url}/v2/vm/refused/tags/list").status_code == 404  # no tag was written


def test_push_with_bearer_tokens(
    artifact: Path, registry_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry with token auth: anonymous tokens only pull; bob's (password or refresh token) push."""
    issuer = TokenIssuer(tmp_path / "issuer", {"bob": "hunter2"}, {"refresh-1": "bob"})
    try:
        reg = registry_factory(auth=issuer.auth_config)
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
        with pytest.raises(PublishError, match=r"access denied \(HTTP 401.*no credentials"):
            publish.push(artifact, f"{reg.host}/tok/vm:v1")
        _docker_config(tmp_path, monkeypatch, reg.host, "bob:hunter2")
        pushed = publish.push(artifact, f"{reg.host}/tok/vm:v1")
        assert issuer.requests[-1][1]["scope"] == "repository:tok/vm:pull,push"
        d = tmp_path / "refresh"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"auths": {reg.host: {"identitytoken": "refresh-1"}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(d))
        again = publish.push(artifact, f"{reg.host}/tok/vm:v2")
        assert issuer.requests[-1][0] == "POST" and again.digest == pushed.digest and again.present == 7
        assert _digests(publish.pull(f"{reg.host}/tok/vm:v2", tmp_path / "pulled")) == _digests(artifact)
        other = publish.push(artifact, f"{reg.host}/tok/other:v1")  # cross-repository mounts
        assert (other.digest, other.mounted) == (pushed.digest, 7)
    finally:
        issuer.close()


# ------------------------------------------------------------------------------ artifacts with a root disk

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
needs_mkfs = pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs mkfs.ext4 (e2fsprogs)")


def _with_disk(art: Path, work: Path, fmt: str = "raw") -> Path:
    """`art` made a `--format disk` artifact: a real 16 MiB ext4 disk.img (mkfs.ext4 -d of a small tree;
    fixture construction, not how xbuild writes disks) and manifest.json's disk section."""
    tree = work / "disk-tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("disk\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "payload").write_bytes(os.urandom(256 << 10))  # incompressible
    (tree / "bin" / "text").write_bytes(b"xbuild disk layer\n" * 20000)
    raw = work / "disk.raw"
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-U",
            "d15c0000-0000-4000-8000-000000000001",
            "-d",
            str(tree),
            str(raw),
            "16M",
        ],
        check=True,
        capture_output=True,
    )
    if fmt == "qcow2":
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(art / DISK)], check=True, capture_output=True
        )
    else:
        raw.rename(art / DISK)
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["disk"] = {
        "file": DISK,
        "format": fmt,
        "mode": "rw",
        "size": 16 << 20,
        "file_size": (art / DISK).stat().st_size,
        "sha256": file_sha256(art / DISK),
        "uuid": "d15c0000-0000-4000-8000-000000000001",
        "content_bytes": (256 << 10) + 360005,
    }
    (art / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert open_artifact(art).disk == art / DISK
    return art


@pytest.fixture
def disk_artifact(artifact: Path, tmp_path: Path) -> Path:
    return _with_disk(artifact, tmp_path)


@needs_mkfs
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_disk_round_trip(
    fmt: str,
    artifact: Path,
    registry: Registry,
    tmp_path: Path,
    xbuild_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    art = _with_disk(artifact, tmp_path, fmt)
    ref = f"{registry.host}/vm/disk-{fmt}:v1"
    logged: list[str] = []
    pushed = publish.push(art, ref, log=logged.append)
    file_size = (art / DISK).stat().st_size
    assert pushed.uploaded == 8 and pushed.disk is not None
    assert pushed.disk == {
        "file": DISK,
        "media_type": publish.DISK_TYPES[fmt],
        "file_size": file_size,
        "blob_size": pushed.disk["blob_size"],
    }
    assert any(
        line.startswith(f"uploaded {DISK} (") and line.endswith(f"zstd of {file_size / 1e6:.1f} MB)")
        for line in logged
    ), logged
    doc = json.loads(registry.manifest(f"vm/disk-{fmt}", "v1")[0])
    assert [x["annotations"][publish.TITLE] for x in doc["layers"]] == [
        "kernel",
        "initrd.img",
        "cmdline",
        "xen.cfg",
        DISK,
        PROVENANCE,
        "sbom.cdx.json",
    ]
    layer = doc["layers"][_disk_at(doc)]
    assert layer["mediaType"] == f"application/vnd.xbuild.vm.disk.{fmt}.v1+zstd"
    blob = registry.blob_file(layer["digest"]).read_bytes()
    assert blob[:4] == ZSTD_MAGIC and len(blob) == layer["size"] == pushed.disk["blob_size"]
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
    assert len(blob) < file_size / (10 if fmt == "raw" else 2)  # qcow2 is already 1.3 MB, not 16 MiB
    print(f"{fmt}: {file_size} bytes → {len(blob)} bytes zstd")

    dest = tmp_path / "pulled"
    publish.pull(ref, dest)
    assert _digests(dest) == _digests(art)
    assert open_artifact(dest).disk == dest / DISK
    if fmt == "raw":  # holes for the zero blocks: less allocated than the file's size
        assert (dest / DISK).stat().st_blocks * 512 < file_size / 2
    # `reuse` (what `xbuild run REF` does with its cache): the same artifact is not written again...
    before = (dest / DISK).stat()
    assert publish.pull(ref, dest, reuse=True) == dest
    after = (dest / DISK).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # ... unless a file of the kept copy changed (a flipped bit in the disk, then in the initrd): pulled again
    for name in (DISK, INITRD):
        with open(dest / name, "r+b") as f:
            f.seek(1024)
            byte = f.read(1)
            f.seek(1024)
            f.write(bytes([byte[0] ^ 1]))
        assert publish.pull(ref, dest, reuse=True) == dest
        assert _digests(dest) == _digests(art)
    # ... but a plain pull replaces it
    publish.pull(ref, dest)
    assert (dest / DISK).stat().st_ino != before.st_ino and _digests(dest) == _digests(art)

    # the same directory again: the same manifest, nothing uploaded, the disk not compressed again
    logged.clear()
    again = publish.push(art, f"{registry.host}/vm/disk-{fmt}:v2", log=logged.append)
    assert (again.digest, again.uploaded, again.present) == (pushed.digest, 0, 8)
    assert not any(line.startswith("compressing") for line in logged)
    # from a fresh cache on a one-CPU machine (compressed again, single-threaded): the same blob
    monkeypatch.setenv("XBUILD_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    runner = CliRunner()
    done = runner.invoke(push_cmd, [str(art), f"{registry.host}/vm/disk-{fmt}-2:v1", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert (result["digest"], result["disk"]) == (pushed.digest, pushed.disk)
    # and what was pulled pushes to the same digest
    assert publish.push(dest, f"{registry.host}/vm/disk-{fmt}:v3").digest == pushed.digest


@needs_mkfs
def test_disk_push_refuses_a_changed_disk(
    disk_artifact: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = publish.push(disk_artifact, f"{registry.host}/vm/changed:v1")
    with open(disk_artifact / DISK, "r+b") as f:  # what an rw guest started by `xl create` would do
        f.seek(8 << 20)
        f.write(b"written in place")
    for cache in ("xbuild-cache", "fresh-cache"):  # the disk known to the cache, then compressed anew
        monkeypatch.setenv("XBUILD_CACHE", str(tmp_path / cache))
        with pytest.raises(
            PublishError,
            match=r"disk\.img: does not match the sha256 in manifest\.json "
            r"\(changed since the build\?",
        ) as e:
            publish.push(disk_artifact, f"{registry.host}/vm/changed:v2")
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not [p for p in (tmp_path / "fresh-cache").rglob("*") if p.is_file()]  # no blob of it kept
    # v1 and its referrers index (the SBOM and provenance push attached to it): nothing of the refused push
    tags = httpx.get(f"{registry.url}/v2/vm/changed/tags/list").json()["tags"]
    assert sorted(tags) == sorted(["v1", f"sha256-{v1.digest[7:]}"])


def _upload(registry: Registry, repo: str, path: Path, media_type: str, title: str | None) -> dict:
    """Upload a file as a blob of `repo`; its descriptor."""
    blob = publish.Blob.of(path, media_type, title)
    with publish._repository(publish.target(f"{registry.host}/{repo}:x"), False, push=True) as session:
        session.ensure_blob(blob.digest, blob.size, blob.path, title or "config")
    return blob.descriptor()


@needs_mkfs
@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"sha256": "0" * 64},
            r"disk\.img does not match the sha256 in manifest\.json \(expected 0{64}, got ",
        ),
        ({"file_size": 1 << 20}, r"disk\.img is larger than the 1048576 bytes manifest\.json records"),
        ("not zstd", r"disk\.img: corrupt zstd data"),
        ("truncated", r"disk\.img does not match the sha256 in manifest\.json"),
        ("corrupt blob", r"disk\.img: digest mismatch"),
        ("no disk section", r"malformed artifact \(a disk layer but no disk section in manifest\.json\)"),
        (
            "unknown type",
            r"disk\.img: unsupported layer type 'application/vnd\.xbuild\.vm\.disk\.raw\.v2\+xz'",
        ),
    ],
)
def test_disk_pull_verifies(
    change: dict | str,
    message: str,
    disk_artifact: Path,
    registry: Registry,
    tmp_path: Path,
    xbuild_cache: Path,
) -> None:
    """A disk that does not unpack to what manifest.json records: one line, exit 2, nothing written; an
    artifact pulled earlier into the same directory stays as it was."""
    pushed = publish.push(disk_artifact, f"{registry.host}/vm/bad:good")
    dest = publish.pull(pushed.reference, tmp_path / "dest")
    before = _digests(dest)
    doc = json.loads(registry.manifest("vm/bad", "good")[0])
    layer = doc["layers"][_disk_at(doc)]
    blob_file = registry.blob_file(layer["digest"])
    saved = blob_file.read_bytes()
    work = tmp_path / "craft"
    work.mkdir()
    manifest = json.loads((disk_artifact / MANIFEST).read_text())
    if isinstance(change, dict):
        (work / MANIFEST).write_text(json.dumps(manifest | {"disk": manifest["disk"] | change}))
        doc["config"] = _upload(registry, "vm/bad", work / MANIFEST, publish.VM_CONFIG, None)
    elif change in ("not zstd", "truncated"):
        (work / DISK).write_bytes(b"not zstd" * 100 if change == "not zstd" else saved[: len(saved) // 2])
        doc["layers"][_disk_at(doc)] = _upload(registry, "vm/bad", work / DISK, layer["mediaType"], DISK)
    elif change == "corrupt blob":
        publish.blob_path(layer["digest"]).unlink()  # from the registry again, not from the cache
        blob_file.write_bytes(saved[:100] + bytes([saved[100] ^ 0xFF]) + saved[101:])
    elif change == "no disk section":
        del manifest["disk"]
        (work / MANIFEST).write_text(json.dumps(manifest))
        doc["config"] = _upload(registry, "vm/bad", work / MANIFEST, publish.VM_CONFIG, None)
    else:
        doc["layers"][_disk_at(doc)]["mediaType"] = "application/vnd.xbuild.vm.disk.raw.v2+xz"
    registry.put_manifest("vm/bad", "bad", doc, publish.OCI_MANIFEST)
    try:
        for target in (tmp_path / "new", dest):
            with pytest.raises(PublishError, match=message) as e:
                publish.pull(f"{registry.host}/vm/bad:bad", target)
            assert e.value.exit_code == 2 and "\n" not in str(e.value)
    finally:
        blob_file.write_bytes(saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "craft", "dest", "disk-tree", "xbuild-cache"]
    assert _digests(dest) == before


@needs_mkfs
def test_disk_pushed_as_a_plain_file_still_pulls(
    disk_artifact: Path, registry: Registry, tmp_path: Path, xbuild_cache: Path
) -> None:
    """A disk artifact pushed before disk layers were compressed: disk.img as is, still checked."""
    publish.push(disk_artifact, f"{registry.host}/vm/plain:v1")
    doc = json.loads(registry.manifest("vm/plain", "v1")[0])
    doc["layers"][_disk_at(doc)] = _upload(
        registry, "vm/plain", disk_artifact / DISK, publish.VM_OTHER_FILE, DISK
    )
    registry.put_manifest("vm/plain", "old", doc, publish.OCI_MANIFEST)
    dest = publish.pull(f"{registry.host}/vm/plain:old", tmp_path / "dest")
    assert _digests(dest) == _digests(disk_artifact)


# ---- cached blobs used by a pull are checked as they are read; a corrupt one heals -----------------------


def _disk_at(doc: dict[str, Any]) -> int:
    """The index of the disk layer in a VM image manifest (the attestation files follow it)."""
    return next(i for i, x in enumerate(doc["layers"]) if x["annotations"][publish.TITLE] == DISK)


def _blob_of(registry: Registry, repo: str, victim: str) -> str:
    """The digest of the artifact's config ("config") or of its layer titled `victim`."""
    doc = json.loads(registry.manifest(repo, "v1")[0])
    if victim == "config":
        return doc["config"]["digest"]
    return next(x["digest"] for x in doc["layers"] if x["annotations"][publish.TITLE] == victim)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("victim", ["config", INITRD, DISK])
def test_corrupt_cached_blob_heals_on_pull(
    victim: str, reuse: bool, disk_artifact: Path, registry: Registry, tmp_path: Path, xbuild_cache: Path
) -> None:
    """A flipped bit in a cached blob is never copied into a pull: the blob is removed and fetched again."""
    pushed = publish.push(disk_artifact, f"{registry.host}/vm/heal:v1")
    want = _digests(publish.pull(pushed.reference, tmp_path / "first"))
    digest = _blob_of(registry, "vm/heal", victim)
    blob = cache_dir("blobs", "sha256") / digest[7:]
    _flip(blob)
    assert _digests(publish.pull(pushed.reference, tmp_path / "second", reuse=reuse)) == want
    assert file_sha256(blob) == digest[7:]


@pytest.mark.parametrize("victim", ["config", INITRD, DISK])
def test_corrupt_cached_blob_the_registry_lost_names_it(
    victim: str, disk_artifact: Path, registry_factory, sandbox: Sandbox
) -> None:
    reg = registry_factory()
    pushed = publish.push(disk_artifact, f"{reg.host}/vm/gone:v1")
    r = sandbox.xbuild("pull", pushed.reference, "-o", str(sandbox.root / "work" / "first"))
    assert r.returncode == 0, r.stderr
    digest = _blob_of(reg, "vm/gone", victim)
    blob = sandbox.cache / "blobs" / "sha256" / digest[7:]
    _flip(blob)
    reg.blob_file(digest).unlink()  # the registry no longer has it (the manifest is still there)
    before = sandbox.snapshot()
    r = sandbox.xbuild("pull", pushed.reference, "-o", str(sandbox.out))
    assert_refused(r, 1, str(blob), "corrupt cache entry (removed)", "fetching it again failed")
    assert sandbox.changes(before) == []
    assert sandbox.stale_temps() == []
    assert not blob.exists()


def test_pulled_kernel_never_stands_in_for_a_built_one(
    registry: Registry, xbuild_cache: Path, tmp_path: Path
) -> None:
    """A kernel artifact whose kernel.json claims a local kernel's key lands in a namespace of its own."""
    built_kernel = _fake_kernel("ef" * 32)
    evil = _fake_kernel("01" * 32)
    meta = json.loads((evil.path.parent / "kernel.json").read_text())
    (evil.path.parent / "kernel.json").write_text(json.dumps(meta | {"key": built_kernel.key}))
    pushed = publish.push_kernel(evil, f"{registry.host}/kernels/evil:1")
    shutil.rmtree(evil.path.parent)
    good = _digests(built_kernel.path.parent)
    path = publish.pull_kernel(f"oci://{registry.host}/kernels/evil:1")
    assert path.parent == cache_dir("kernels") / f"oci-{pushed.digest[7:]}"
    assert _digests(built_kernel.path.parent) == good
    assert kernel_cached(built_kernel.path.parent) == built_kernel
    assert sorted(k.path for k in list_kernels()) == sorted([path, built_kernel.path])
    assert dict(verify_cached()) == {path.parent: None, built_kernel.path.parent: None}
