"""Multi-platform images (issue 18.1, 18.4): a linux/amd64 + linux/arm64 image built into one artifact per
platform, pushed as ONE OCI index of VM images, pulled per platform; the refusals around it.

The source is a real multi-platform image in the test registry (tests/fixtures/registry.py): the busybox
image (amd64, the host's static busybox) and an arm64 image holding a static aarch64 program compiled here
with the arm64 init's compiler (aarch64-linux-musl-gcc), both pushed with skopeo and tied by an OCI index.
No kernel is paired (`--kernel none`): the arm64 boot is tests/test_arm64.py's. Everything runs the real
CLI in a sandbox (tests/fixtures/hostile.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from builder import publish
from builder.elf import parse
from builder.init import compiler
from builder.oci import referrers
from builder.oci.manifest import OCI_INDEX, OCI_MANIFEST
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.fixtures.images import (
    BUSYBOX_CONFIG,
    busybox_members,
    dir,
    file,
    make_busybox_image,
    write_oci_image,
)
from tests.fixtures.registry import Registry

HELLO_C = r"""#include <stdio.h>
#include <sys/utsname.h>
int main(int argc, char **argv) {
    struct utsname u;
    uname(&u);
    printf("hello from %s, %d args\n", u.machine, argc - 1);
    return 3;
}
"""
PLATFORMS = ("linux/amd64", "linux/arm64")


def arm64_program(source: str, work: Path) -> bytes:
    """`source` compiled static for arm64 with the compiler the arm64 init uses."""
    (work / "p.c").write_text(source)
    subprocess.run(
        [compiler("arm64"), "-static", "-Os", "-s", "-o", str(work / "p"), str(work / "p.c")], check=True
    )
    return (work / "p").read_bytes()


def arm64_members(program: bytes) -> list[Any]:
    return [
        dir("bin/"),
        file("bin/hello", program, mode=0o755),
        dir("etc/"),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        file("etc/group", b"root:x:0:\n"),
    ]


def _digest(registry: Registry, repo: str, tag: str) -> tuple[str, int]:
    raw, _ = registry.manifest(repo, tag)
    return "sha256:" + hashlib.sha256(raw).hexdigest(), len(raw)


def _entry(digest: str, size: int, arch: str, media_type: str = OCI_MANIFEST) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": digest,
        "size": size,
        "platform": {"os": "linux", "architecture": arch},
    }


@pytest.fixture(scope="module")
def source(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The multi-platform source image in the registry: {"ref": its index, "linux/amd64": manifest digest,
    "linux/arm64": manifest digest}."""
    work = tmp_path_factory.mktemp("multi")
    layout = work / "oci"
    make_busybox_image(layout, "amd64")
    hello = arm64_program(HELLO_C, work)
    write_oci_image(
        layout,
        "arm64",
        [arm64_members(hello)],
        {"Entrypoint": ["/bin/hello"]},
        image_config={"architecture": "arm64"},
    )
    entries, out = [], {}
    for arch in ("amd64", "arm64"):
        registry.push(layout, arch, f"src/multi:{arch}")
        digest, size = _digest(registry, "src/multi", arch)
        entries.append(_entry(digest, size, arch))
        out[f"linux/{arch}"] = digest
    registry.put_manifest(
        "src/multi", "latest", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX
    )
    return {"ref": f"{registry.host}/src/multi:latest", **out}


def _manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "manifest.json").read_text())


def _initrd_file(artifact: Path, name: str) -> bytes:
    """One file of the artifact's initrd, read with the real zstd and cpio."""
    zstd = subprocess.run(["zstd", "-dc", str(artifact / "initrd.img")], capture_output=True, check=True)
    r = subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", name], input=zstd.stdout, capture_output=True, check=True
    )
    return r.stdout


def _files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def multi(
    source: dict[str, str], registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """(-o DIR, pushed REF) of `xbuild SOURCE --platform linux/amd64,linux/arm64 --push REF`, run once."""
    box = Sandbox(tmp_path_factory.mktemp("multi-build") / "sandbox")
    for d in (box.home, box.tmp, box.cache, box.root / "work"):
        d.mkdir(parents=True)
    out, vm = box.root / "work" / "multi", f"{registry.host}/vm/multi:1"
    r = box.xbuild(
        source["ref"], "--platform", ",".join(PLATFORMS), "--kernel", "none", "-o", str(out), "--push", vm
    )
    assert r.returncode == 0, r.stderr
    return out, vm


def test_multi_platform_build_push_pull(
    source: dict[str, str], multi: tuple[Path, str], registry: Registry, sandbox: Sandbox
) -> None:
    """One command builds both platforms, each artifact from its platform's manifest with its platform's
    init; --push pushes ONE index whose entries are the VM images (each with its platform, SBOM and
    provenance attached to it); `xbuild push DIR --sign` pushes the same index and signs it; pull takes the
    host's platform, or --platform's (checking the index's signature), and refuses one the index lacks."""
    out, vm = multi
    assert sorted(p.name for p in out.iterdir()) == ["linux-amd64", "linux-arm64"]
    for platform, machine in zip(PLATFORMS, ("EM_X86_64", "EM_AARCH64"), strict=True):
        art = out / platform.replace("/", "-")
        m = _manifest(art)
        assert m["source"]["platform"] == platform and m["source"]["manifest_digest"] == source[platform]
        assert parse(_initrd_file(art, ".xbuild/init")).machine == machine
    assert parse(_initrd_file(out / "linux-arm64", "bin/hello")).machine == "EM_AARCH64"

    raw, media_type = registry.manifest("vm/multi", "1")
    index = json.loads(raw)
    assert media_type == OCI_INDEX and index["artifactType"] == publish.VM_ARTIFACT
    assert [e["platform"] for e in index["manifests"]] == [
        {"os": "linux", "architecture": a} for a in ("amd64", "arm64")
    ]
    with publish._repository(publish.target(vm), False, push=False) as repo:
        for e, platform in zip(index["manifests"], PLATFORMS, strict=True):
            assert e["artifactType"] == publish.VM_ARTIFACT and e["mediaType"] == OCI_MANIFEST
            documents = [publish.document_type(f.name) for f in (out / platform.replace("/", "-")).iterdir()]
            attached = [x.artifact_type for x in referrers.list_referrers(repo, e["digest"])]
            assert len(attached) == 2 and sorted(attached) == sorted(t for t in documents if t), attached

    # `xbuild push DIR --sign` of the same -o DIR: the same index, byte for byte, its digest signed; a pull
    # of one platform checks that signature (the index digest pins every platform's VM image)
    key = sandbox.root / "key.pem"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True
    )
    subprocess.run(
        ["openssl", "ec", "-in", str(key), "-pubout", "-out", f"{key}.pub"], check=True, capture_output=True
    )
    again = sandbox.xbuild("push", str(out), f"{registry.host}/vm/multi:signed", "--sign", str(key))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{registry.host}/vm/multi:signed@sha256:{hashlib.sha256(raw).hexdigest()}"
    signed = sandbox.root / "work" / "pulled-signed"
    pull = (
        "pull",
        f"{registry.host}/vm/multi:signed",
        "--platform",
        "linux/arm64",
        "--verify-key",
        f"{key}.pub",
    )
    r = sandbox.xbuild(*pull, "-o", str(signed))
    assert r.returncode == 0, r.stderr
    assert _files(signed) == _files(out / "linux-arm64")

    host = sandbox.root / "work" / "pulled-host"
    assert sandbox.xbuild("pull", vm, "-o", str(host)).returncode == 0
    assert _files(host) == _files(out / "linux-amd64")  # this host is amd64
    arm = sandbox.root / "work" / "pulled-arm64"
    r = sandbox.xbuild("pull", vm, "--platform", "linux/arm64", "-o", str(arm))
    assert r.returncode == 0, r.stderr
    assert _files(arm) == _files(out / "linux-arm64")
    before = sandbox.snapshot()
    r = sandbox.xbuild("pull", vm, "--platform", "linux/s390x", "-o", str(sandbox.out))
    assert_refused(r, 2, "no manifest for platform linux/s390x (has: linux/amd64, linux/arm64)")
    assert sandbox.changes(before) == []
    # `xbuild run REF --platform P` picks from the index the same way; a directory takes no platform
    r = sandbox.xbuild("run", vm, "--platform", "linux/s390x")
    assert_refused(r, 2, "no manifest for platform linux/s390x (has: linux/amd64, linux/arm64)")
    r = sandbox.xbuild("run", str(arm), "--platform", "linux/arm64")
    assert_refused(r, 2, "is a directory: --platform picks a registry VM image or an image to build")


@pytest.mark.parametrize(
    ("platforms", "needle"),
    [
        ("linux/s390x", "--platform linux/s390x: xbuild builds linux/amd64, linux/arm64 guests only"),
        (
            "linux/amd64,linux/arm/v7",
            "--platform linux/arm/v7: xbuild builds linux/amd64, linux/arm64 guests only",
        ),
        ("linux/arm64,linux/arm64", "linux/arm64 is named twice"),
        ("linux/amd64,linux/arm64 --xen-type pv", "--xen-type pv: Xen on arm64 runs pvh guests only"),
    ],
)
def test_unserved_platforms_refused(
    source: dict[str, str], sandbox: Sandbox, platforms: str, needle: str
) -> None:
    """A platform xbuild has no init and kernel for is refused before anything is pulled or written."""
    before = sandbox.snapshot()
    args = ("--platform", *platforms.split(" "), "-o", str(sandbox.out))
    assert_refused(sandbox.xbuild(source["ref"], *args), 2, needle)
    assert sandbox.changes(before) == []


def test_several_platforms_never_write_into_an_artifact(
    source: dict[str, str], multi: tuple[Path, str], sandbox: Sandbox
) -> None:
    """-o naming an artifact directory is refused for a build of several platforms (it would nest theirs
    inside it), before anything is pulled or written."""
    art = sandbox.root / "work" / "one"
    shutil.copytree(multi[0] / "linux-amd64", art)
    before = sandbox.snapshot()
    r = sandbox.xbuild(source["ref"], "--platform", ",".join(PLATFORMS), "--kernel", "none", "-o", str(art))
    assert_refused(r, 2, f"-o {art}: holds an artifact")
    assert sandbox.changes(before) == []


@pytest.mark.parametrize("minimize", ["auto", "none"])
def test_config_architecture_lies(sandbox: Sandbox, tmp_path: Path, minimize: str) -> None:
    """An image whose config says one architecture while its entrypoint is a program of another is refused
    at build time (exit 2), both ways and in every minimize mode: never an arm64 init and kernel around
    amd64 binaries, or the reverse."""
    layout = tmp_path / "oci"
    write_oci_image(
        layout,
        "amd64-says-arm64",
        [busybox_members()],
        BUSYBOX_CONFIG,
        image_config={"architecture": "arm64"},
    )
    program = arm64_program(HELLO_C, tmp_path)
    write_oci_image(layout, "arm64-says-amd64", [arm64_members(program)], {"Entrypoint": ["/bin/hello"]})
    cases = [
        (
            "amd64-says-arm64",
            "linux/arm64",
            "/bin/sh is an EM_X86_64 program, but the image says linux/arm64",
        ),
        (
            "arm64-says-amd64",
            "linux/amd64",
            "/bin/hello is an EM_AARCH64 program, but the image says linux/amd64",
        ),
    ]
    before = sandbox.snapshot()
    for tag, platform, needle in cases:
        args = (
            "-q",
            "--platform",
            platform,
            "--kernel",
            "none",
            "--minimize",
            minimize,
            "-o",
            str(sandbox.out),
        )
        assert_refused(sandbox.xbuild(f"oci:{layout}:{tag}", *args), 2, needle)
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []


def test_hostile_vm_indexes(multi: tuple[Path, str], registry: Registry, sandbox: Sandbox) -> None:
    """Indexes of VM images a registry may serve: an entry whose platform lies about its VM image, 10,000
    entries, an index nested in an index: each pull is one line, exit 2, nothing written."""
    _, vm = multi
    raw, _ = registry.manifest("vm/multi", "1")
    amd64, arm64 = json.loads(raw)["manifests"]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX}
    registry.put_manifest(
        "vm/multi", "liar", index | {"manifests": [amd64 | {"platform": arm64["platform"]}]}, OCI_INDEX
    )
    many = [amd64 | {"platform": {"os": "linux", "architecture": f"x{i}"}} for i in range(10_000)]
    registry.put_manifest("vm/multi", "many", index | {"manifests": [*many, arm64]}, OCI_INDEX)
    inner, size = _digest(registry, "vm/multi", "1")
    nested = [_entry(inner, size, "arm64", OCI_INDEX)]
    registry.put_manifest("vm/multi", "nested", index | {"manifests": nested}, OCI_INDEX)
    cases = [
        ("liar", "vm/multi:liar: the VM image is for linux/amd64, not linux/arm64", ""),
        ("many", "index lists 10001 manifests (more than 256)", ""),
        ("nested", "index nesting too deep", ""),
    ]
    before = sandbox.snapshot()
    for tag, needle, more in cases:
        ref = vm.rsplit(":", 1)[0] + f":{tag}"
        r = sandbox.xbuild("pull", ref, "--platform", "linux/arm64", "-o", str(sandbox.out))
        assert_refused(r, 2, needle, *([more] if more else []))
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []
