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

import click
import httpx
import pytest
from click.testing import CliRunner

from builder import publish
from builder.artifact import CMDLINE, KERNEL, XEN_CFG, xen_config
from builder.build import BuildOptions, build
from builder.cache import cache_dir
from builder.errors import PublishError, RegistryUnavailable
from builder.kernel import Kernel, list_kernels
from builder.publish_cli import kernel_push_cmd, pull_cmd, push_cmd
from builder.reference import parse
from tests.fixtures.images import OciImage, make_busybox_image
from tests.fixtures.registry import Registry, RegistryProxy, TokenIssuer, free_port

EPOCH = 1_700_000_000


def _artifact(image_ref: str, out: Path) -> Path:
    """A complete artifact directory: built initrd + manifest, and a stand-in kernel, cmdline, xen.cfg."""
    build(image_ref, BuildOptions(output=out, epoch=EPOCH, kernel=None))
    (out / KERNEL).write_bytes(hashlib.sha256(b"kernel").digest() * 40000)     # 1.28 MB, deterministic
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
    assert pushed.reference == f"{ref}@{pushed.digest}" and pushed.uploaded == 5
    dest = tmp_path / "pulled"
    assert publish.pull(ref, dest) == dest
    t2 = time.monotonic()
    assert _digests(dest) == _digests(artifact)
    print(f"push {t1 - t0:.3f} s, pull {t2 - t1:.3f} s")
    # pulling by digest into the same directory replaces it, from the blob cache
    (dest / "stale").write_text("x")
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
        2, publish.OCI_MANIFEST, publish.VM_ARTIFACT)
    assert doc["config"]["mediaType"] == publish.VM_CONFIG
    files = _digests(artifact)
    assert doc["config"]["digest"] == "sha256:" + files["manifest.json"]
    titles = [x["annotations"][publish.TITLE] for x in doc["layers"]]
    assert titles == ["kernel", "initrd.img", "cmdline", "xen.cfg"]
    assert [x["mediaType"] for x in doc["layers"]] == [
        "application/vnd.xbuild.vm.kernel.v1", "application/vnd.xbuild.vm.initrd.v1+zstd",
        "application/vnd.xbuild.vm.cmdline.v1", "application/vnd.xbuild.vm.xen-cfg.v1"]
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
    inspect = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{registry.host}/vm/busybox:shape"], capture_output=True, check=True)
    assert inspect.stdout == raw


def test_push_is_reproducible_skips_and_mounts(artifact: Path, registry: Registry, tmp_path: Path) -> None:
    first = publish.push(artifact, f"{registry.host}/vm/repro:a")
    source_ref = json.loads((artifact / "manifest.json").read_text())["source"]["reference"]
    again = publish.push(_artifact(source_ref, tmp_path / "rebuilt"), f"{registry.host}/vm/repro:b")
    assert again.digest == first.digest
    assert (again.uploaded, again.present, again.mounted) == (0, 5, 0)
    other = publish.push(artifact, f"{registry.host}/elsewhere/repro:a")
    assert (other.digest, other.uploaded, other.mounted) == (first.digest, 0, 5)


def test_failed_push_leaves_tag(artifact: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = f"{registry.host}/vm/half:t"
    before = publish.push(artifact, ref)
    (artifact / KERNEL).write_bytes(b"another kernel")
    real = publish._Session.ensure_blob

    def refuse_kernel(self: publish._Session, blob: publish.Blob, name: str) -> str:
        if name == KERNEL:
            raise PublishError(f"{ref}: the registry refused upload of kernel: too large (HTTP 413)")
        return real(self, blob, name)

    monkeypatch.setattr(publish._Session, "ensure_blob", refuse_kernel)
    with pytest.raises(PublishError, match="413"):
        publish.push(artifact, ref)
    assert "sha256:" + hashlib.sha256(registry.manifest("vm/half", "t")[0]).hexdigest() == before.digest


def _docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, creds: str) -> None:
    d = tmp_path / "docker-config"
    d.mkdir()
    entry = {"auth": base64.b64encode(creds.encode()).decode()}
    (d / "config.json").write_text(json.dumps({"auths": {host: entry}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))


def test_push_needs_credentials(artifact: Path, registry_factory, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert _digests(dest) == _digests(artifact) and pushed.uploaded == 5


def test_push_to_read_only_registry(artifact: Path, tmp_path: Path) -> None:
    work = tmp_path / "ro"
    work.mkdir()
    port = free_port()
    config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(work / "data")},
                          "maintenance": {"readonly": {"enabled": True}}},
              "http": {"addr": f"127.0.0.1:{port}"}}
    (work / "config.yml").write_text(json.dumps(config))
    proc = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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


def test_pull_rejects_other_things(artifact: Path, registry: Registry, tmp_path: Path,
                                   busybox_image: OciImage) -> None:
    registry.push(busybox_image.layout, busybox_image.name, "plain/busybox:1")
    dest = tmp_path / "dest"
    with pytest.raises(PublishError, match=r"not an xbuild VM image artifact \(it is a container image\)"):
        publish.pull(f"{registry.host}/plain/busybox:1", dest)
    with pytest.raises(PublishError, match="no-such:tag: manifest: not found"):
        publish.pull(f"{registry.host}/plain/no-such:tag", dest)
    (tmp_path / "not-an-artifact").mkdir()
    (tmp_path / "not-an-artifact" / "precious").write_text("keep me")
    publish.push(artifact, f"{registry.host}/vm/busybox:x")
    with pytest.raises(PublishError, match="exists and is not an artifact directory"):
        publish.pull(f"{registry.host}/vm/busybox:x", tmp_path / "not-an-artifact")
    assert not dest.exists() and (tmp_path / "not-an-artifact" / "precious").read_text() == "keep me"


def test_pull_verifies_digests(artifact: Path, registry: Registry, tmp_path: Path,
                               xbuild_cache: Path) -> None:
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
    (d / "kernel.json").write_text(json.dumps({"key": key, "path": str(k.path), "fmt": "elf",
                                               "fragments": ["base", "xen"], "release": "6.1.0",
                                               "size": 200_004, "bzimage": str(k.bzimage)}))
    return k


def test_kernel_push_pull(registry: Registry, xbuild_cache: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert path.name == "vmlinux" and _digests(path.parent) == before
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
    assert json.loads(done.stdout)["present"] == 5


def test_explicit_docker_prefix() -> None:
    assert parse("docker://myapp:dev").explicit and not parse("myapp:dev").explicit
    assert parse("docker://myapp:dev") == parse("myapp:dev")      # `explicit` does not take part in equality


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


def test_push_retries_transient_failures(artifact: Path, registry: Registry, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XBUILD_REGISTRY_RETRY_DELAY", "0.01")
    proxy = RegistryProxy(registry.url, fail=2, fail_status=503)
    try:
        pushed = publish.push(artifact, f"{proxy.host}/vm/flaky:v1")
        first = proxy.requests[0]
        assert first[0] == "HEAD" and proxy.requests[:3] == [first] * 3      # two 503s, then answered
        assert pushed.uploaded == 5
        proxy.fail = 100
        with pytest.raises(RegistryUnavailable, match=r"failing \(HTTP 503\) after 4 tries") as e:
            publish.pull(f"{proxy.host}/vm/flaky:v1", tmp_path / "dest")
        assert e.value.exit_code == 2 and not (tmp_path / "dest").exists()
    finally:
        proxy.close()


@pytest.mark.parametrize("status, fail, message", [
    (403, 1, r"access denied \(HTTP 403\); no credentials for 127\.0\.0\.1"),
    (413, 2, r"refused upload of manifest\.json: too large \(HTTP 413\)"),
])
def test_push_refused(artifact: Path, registry: Registry, status: int, fail: int, message: str) -> None:
    proxy = RegistryProxy(registry.url, fail=fail, fail_status=status)
    try:
        with pytest.raises(PublishError, match=message) as e:
            publish.push(artifact, f"{proxy.host}/vm/refused:v1")
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    finally:
        proxy.close()
    assert httpx.get(f"{registry.url}/v2/vm/refused/tags/list").status_code == 404    # no tag was written


def test_push_with_bearer_tokens(artifact: Path, registry_factory, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
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
        assert issuer.requests[-1][0] == "POST" and again.digest == pushed.digest and again.present == 5
        assert _digests(publish.pull(f"{reg.host}/tok/vm:v2", tmp_path / "pulled")) == _digests(artifact)
        other = publish.push(artifact, f"{reg.host}/tok/other:v1")       # cross-repository mounts
        assert (other.digest, other.mounted) == (pushed.digest, 5)
    finally:
        issuer.close()
