"""`--cache REPO`: the registry build cache shared by runners (builder/buildcache.py), through the real CLI
against the real test registry. Each "runner" is a sandbox with a cache of its own; hostile registry answers
are in the `hostile` tests below (tests/fixtures/hostile.py's assertions)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from builder.oci.manifest import ACCEPT
from tests.fixtures.hostile import XBUILD, Sandbox
from tests.fixtures.hostile_registry import FaultRegistry, fixed
from tests.fixtures.images import OciImage, make_busybox_image
from tests.fixtures.registry import Registry, TokenIssuer

REPO = "fleet/cache"


def runner(root: Path) -> Sandbox:
    """A runner: a sandbox of its own (HOME, TMPDIR, $XBUILD_CACHE, work/)."""
    box = Sandbox(root)
    for d in (box.home, box.tmp, box.cache, box.root / "work"):
        d.mkdir(parents=True)
    return box


PRODUCT = re.compile(
    r"^xbuild: (kernel|init|artifact)(?: ([0-9a-f]{12}))?: (built|local cache|registry cache) in [\d.]+ s"
    r"(?:, pushed to (\S+)| \((\S+)\))?$"
)


def build(box: Sandbox, image: OciImage, cache: str, *args: str) -> tuple[dict[str, Any], str]:
    """`xbuild IMAGE --cache CACHE --kernel none` in `box`, exit 0 asserted: (manifest.json and, as
    `products`, the product lines of stderr {name, origin, pushed, pulled}; stderr)."""
    out = box.root / "work" / f"out-{len(list((box.root / 'work').glob('out-*')))}"
    r = box.xbuild(image.ref, "-o", str(out), "--cache", cache, "--kernel", "none", *args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    doc = json.loads((out / "manifest.json").read_text())
    lines = [m for line in r.stderr.splitlines() if (m := PRODUCT.match(line))]
    doc["products"] = [{"name": m[1], "origin": m[3], "pushed": m[4], "pulled": m[5]} for m in lines]
    return doc, r.stderr


def origins(doc: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["origin"] for p in doc["products"]}


def artifact_key(doc: dict[str, Any]) -> str:
    ref = next(p["pushed"] or p["pulled"] for p in doc["products"] if p["name"] == "artifact")
    return str(ref.split(":artifact-")[1][:64])


@pytest.fixture
def image(tmp_path: Path) -> OciImage:
    return make_busybox_image(tmp_path / "busybox-oci")


def test_second_runner_takes_the_artifact_and_the_init_from_the_registry(
    registry: Registry, image: OciImage, tmp_path: Path
) -> None:
    cache = f"{registry.host}/{REPO}"
    one, two = runner(tmp_path / "one"), runner(tmp_path / "two")
    first, err = build(one, image, cache)
    assert origins(first) == {"init": "built", "artifact": "built"}
    pushed = {p["name"]: p["pushed"] for p in first["products"]}
    key = artifact_key(first)
    assert pushed["artifact"].startswith(f"{cache}:artifact-{key}@sha256:")
    assert err.count("cache: ") == 2  # one notice per entry not there (artifact, init): never more
    assert "manifest unknown" in err
    # the second runner: the whole artifact from the registry, the same bytes, nothing built
    second, err = build(two, image, cache)
    assert origins(second) == {"artifact": "registry cache"}
    assert second["initrd"] == first["initrd"]
    assert "cache: " not in err
    assert not (two.cache / "init").exists() or not any((two.cache / "init").iterdir())
    # another artifact key (another compression): the init from the registry, the artifact built
    third, _ = build(two, image, cache, "--compression", "gzip")
    assert origins(third) == {"init": "registry cache", "artifact": "built"}
    # and, without --cache, the second runner's own cache now
    r = two.xbuild(
        image.ref, "-o", str(two.root / "work" / "local"), "--kernel", "none", "--compression", "lz4"
    )
    assert r.returncode == 0, r.stderr
    assert "init " in r.stderr and ": local cache in" not in r.stderr  # the pulled init is not a local build
    assert "artifact " in r.stderr and ": built in" in r.stderr


def test_cache_repo_from_the_environment(registry: Registry, image: OciImage, tmp_path: Path) -> None:
    box = runner(tmp_path / "box")
    out = box.root / "work" / "out"
    r = box.xbuild(
        image.ref,
        "-o",
        str(out),
        "--kernel",
        "none",
        env=box.env(XBUILD_CACHE_REPO=f"{registry.host}/env/cache"),
    )
    assert r.returncode == 0, r.stderr
    assert f"pushed to {registry.host}/env/cache:artifact-" in r.stderr


def test_a_kernel_from_the_registry_cache(
    registry: Registry, image: OciImage, tmp_path: Path, default_kernel_path: Path
) -> None:
    """The host's default kernel pushed as REPO:kernel-<key> (as a first runner would have): a runner with
    an empty cache pulls it (kernels/oci-<digest>/), never compiling one."""
    key = default_kernel_path.parent.name
    cache = f"{registry.host}/kernel/cache"  # a repository of its own: no other test's init entry
    host = subprocess.run(
        [*XBUILD, "kernel", "push", f"{cache}:kernel-{key}", "--key", key],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert host.returncode == 0, host.stderr
    box = runner(tmp_path / "box")
    out = box.root / "work" / "out"
    r = box.xbuild(image.ref, "-o", str(out), "--cache", cache, "--no-verify", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert origins(doc) == {"init": "built", "artifact": "built", "kernel": "registry cache"}
    assert doc["kernel"]["key"] == key
    assert (out / "kernel").read_bytes() == default_kernel_path.read_bytes()
    assert [d.name[:4] for d in (box.cache / "kernels").iterdir()] == ["oci-"]


def test_read_only_without_push_rights(registry_factory: Any, image: OciImage, tmp_path: Path) -> None:
    """A token registry that gives anonymous users pull only: the lookups work, the first push is refused
    (one notice), nothing else is pushed, the build succeeds."""
    issuer = TokenIssuer(tmp_path / "issuer", {"ci": "secret"})
    try:
        reg = registry_factory(auth=issuer.auth_config)
        box = runner(tmp_path / "box")
        doc, err = build(box, image, f"{reg.host}/{REPO}")
    finally:
        issuer.close()
    assert origins(doc) == {"init": "built", "artifact": "built"}
    assert [line for line in err.splitlines() if "read-only" in line] == [
        next(line for line in err.splitlines() if "no push rights" in line)
    ]
    assert all(p["pushed"] is None for p in doc["products"])
    assert "pushed" not in err
    assert "pushing" not in err


def test_an_unreachable_cache_is_one_notice(image: OciImage, tmp_path: Path) -> None:
    from tests.fixtures.registry import free_port

    box = runner(tmp_path / "box")
    doc, err = build(box, image, f"127.0.0.1:{free_port()}/{REPO}")
    assert origins(doc) == {"init": "built", "artifact": "built"}
    notices = [line for line in err.splitlines() if line.startswith("xbuild: cache: ")]
    assert len(notices) == 1, err  # asked once; not asked again for the init nor for the pushes


def test_two_runners_build_the_same_key_at_once(registry: Registry, image: OciImage, tmp_path: Path) -> None:
    """Two CLI builds of one key started together against one registry: both succeed, and the tag ends on
    one valid entry that a third runner pulls and that matches both builds."""
    cache = f"{registry.host}/concurrent/cache"
    boxes = [runner(tmp_path / f"r{i}") for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                *XBUILD,
                image.ref,
                "-o",
                str(b.root / "work" / "out"),
                "--cache",
                cache,
                "--kernel",
                "none",
                "--json",
            ],
            cwd=b.root / "work",
            env=b.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for b in boxes
    ]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for _, err, code in results:
        assert code == 0, err
    docs = [json.loads(out) for out, _, _ in results]
    assert docs[0]["initrd"] == docs[1]["initrd"]
    third = runner(tmp_path / "third")
    doc, _ = build(third, image, cache)
    assert origins(doc) == {"artifact": "registry cache"}
    assert doc["initrd"] == docs[0]["initrd"]
    key = artifact_key(doc)
    assert doc["products"][0]["pulled"] == f"{cache}:artifact-{key}"
    assert tag_digest_of(registry, "concurrent/cache", f"artifact-{key}").startswith("sha256:")


def tag_digest_of(reg: Registry, repo: str, tag: str) -> str:
    r = httpx.head(f"{reg.url}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
    r.raise_for_status()
    return r.headers["Docker-Content-Digest"]


def test_bad_cache_reference_is_refused(image: OciImage, tmp_path: Path) -> None:
    from tests.fixtures.hostile import assert_refused

    box = runner(tmp_path / "box")
    r = box.xbuild(image.ref, "-o", str(box.out), "--cache", "127.0.0.1:5000/repo:tag", "--kernel", "none")
    assert_refused(r, 2, "--cache 127.0.0.1:5000/repo:tag")


# ---- hostile cache entries ------------------------------------------------------------------------------


def _entry(registry: Registry, image: OciImage, tmp_path: Path, cache: str) -> tuple[dict[str, Any], str]:
    """A good first runner's build (pushing its entries); (its JSON, the artifact key)."""
    doc, _ = build(runner(tmp_path / "first"), image, cache)
    return doc, artifact_key(doc)


def test_hostile_entry_whose_blob_does_not_match(
    registry: Registry, image: OciImage, tmp_path: Path, sandbox: Sandbox
) -> None:
    """The tag's manifest names an initrd blob whose bytes the registry changed: notice, build, and the
    local cache holds only verified blobs (the next good build gives the same initrd)."""
    cache = f"{registry.host}/hostile/blob"
    first, key = _entry(registry, image, tmp_path, cache)
    good = sandbox.good_build(image.ref)
    raw, _ = registry.manifest("hostile/blob", f"artifact-{key}")
    initrd = next(
        layer
        for layer in json.loads(raw)["layers"]
        if layer["annotations"]["org.opencontainers.image.title"] == "initrd.img"
    )
    blob = registry.blob_file(initrd["digest"])
    original = blob.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    try:  # the registry is the session's: other tests push and pull this same content-addressed blob
        doc, err = build(sandbox, image, cache)
    finally:
        blob.write_bytes(original)
    assert origins(doc)["artifact"] == "built"
    assert doc["initrd"] == first["initrd"]
    assert len([line for line in err.splitlines() if "cache: " in line and "artifact-" in line]) == 1
    assert not (sandbox.cache / "blobs" / "sha256" / initrd["digest"][7:]).exists()
    assert sandbox.stale_temps() == []
    assert sandbox.good_build(image.ref) == good


def test_hostile_huge_manifest(registry: Registry, image: OciImage, tmp_path: Path, sandbox: Sandbox) -> None:
    """A registry that answers the cache tag with a 64 MiB manifest: refused unread past its cap, notice,
    build."""
    proxy = FaultRegistry(registry.url)
    try:
        huge = b"{" + b" " * (64 << 20) + b"}"
        proxy.fault(
            r"^(GET|HEAD) /v2/hostile/huge/manifests/artifact-",
            fixed(huge, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}),
        )
        good = sandbox.good_build(image.ref)
        doc, err = build(sandbox, image, f"{proxy.host}/hostile/huge")
        assert proxy.most_sent(r"manifests/artifact-") < (64 << 20)
    finally:
        proxy.close()
    assert origins(doc) == {"init": "local cache", "artifact": "built"}  # the init: good_build's
    assert len([line for line in err.splitlines() if "artifact-" in line and "cache: " in line]) == 1
    assert sandbox.stale_temps() == []
    assert sandbox.good_build(image.ref) == good


def test_hostile_kernel_entry_that_is_not_a_kernel(
    registry: Registry, image: OciImage, tmp_path: Path, sandbox: Sandbox, default_kernel_path: Path
) -> None:
    """REPO:kernel-<key> holds a well-formed kernel artifact whose vmlinux is not a kernel: notice, and the
    kernel is built (here: the build is refused at once, `bison` being off the PATH, so the test does not
    compile one); nothing enters the kernel cache."""
    key = default_kernel_path.parent.name
    fake = tmp_path / "fake" / key
    fake.mkdir(parents=True)
    (fake / "vmlinux").write_bytes(b"\x7fELF not a kernel" * 1000)
    meta = {
        "key": key,
        "path": str(fake / "vmlinux"),
        "fmt": "elf",
        "fragments": ["base"],
        "release": "6.1",
        "size": 17000,
        "bzimage": str(fake / "bzImage"),
    }
    (fake / "kernel.json").write_text(json.dumps(meta))
    cache = f"{registry.host}/hostile/kernel"
    from builder import publish
    from builder.kernel import write_record

    write_record(fake, meta)
    publish._push(  # what a hostile runner with push rights pushes: the kernel artifact format, a bad file
        publish.target(f"{cache}:kernel-{key}"),
        publish.KERNEL_KIND,
        publish.Blob.of(fake / "kernel.json", publish.KERNEL_CONFIG),
        [publish.Blob.of(fake / "vmlinux", publish.KERNEL_FILE_TYPES["vmlinux"], "vmlinux")],
        {},
        False,
        lambda msg: None,
    )
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in os.environ["PATH"].split(":"):
        for tool in Path(d).glob("*") if Path(d).is_dir() else ():
            if tool.name != "bison" and not (bindir / tool.name).exists():
                (bindir / tool.name).symlink_to(tool)
    env = sandbox.env(PATH=str(bindir))
    r = sandbox.xbuild(image.ref, "-o", str(sandbox.out), "--cache", cache, "--no-verify", env=env)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    notice = [line for line in lines if "cache: " in line and "kernel-" in line]
    assert len(notice) == 1 and "building the kernel" in notice[0], r.stderr
    assert "bison" in lines[-1]  # it went on to build the kernel
    kernels = sandbox.cache / "kernels"
    assert not kernels.exists() or [p.name for p in kernels.iterdir() if not p.name.endswith(".log")] == []
