"""The cache is untrusted input: every entry is checked when used and heals from its source, or the build
fails with one line naming the file; stale temps are collected; a layer cannot expand without limit; a
full disk is one line, exit 1, nothing partial. `xbuild cache du|verify|prune` for users and CI.

Every case runs the real CLI in a `sandbox` (tests/fixtures/hostile.py); registry cases use the real
docker-registry; disk-full cases mount a small tmpfs (root only).
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.hostile import XBUILD, Sandbox, assert_refused
from tests.fixtures.images import LAYER_MEDIA_TYPES, OciImage, make_busybox_image, write_blob
from tests.fixtures.registry import Registry
from tests.test_daemon import myapp  # noqa: F401  (the fixture: myapp:dev in the test dockerd)

HOUR = 3600


# ---- helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def image(sandbox: Sandbox) -> OciImage:
    """A one-layer busybox image in an OCI layout inside the sandbox (outside its cache)."""
    return make_busybox_image(sandbox.root / "layout")


def flip(path: Path, at: int | None = None) -> None:
    """Flip one bit of `path` (in the middle unless `at` is given)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x10
    path.write_bytes(bytes(data))


def entries(sandbox: Sandbox, kind: str) -> list[Path]:
    d = sandbox.cache / kind / "sha256"
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def the_diff(sandbox: Sandbox) -> Path:
    (diff,) = entries(sandbox, "diffs")
    return diff


def init_entry(sandbox: Sandbox) -> Path:
    (entry,) = (sandbox.cache / "init").iterdir()
    return entry


def build(
    sandbox: Sandbox, ref: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    out = sandbox.root / "work" / "out"
    return sandbox.xbuild(ref, "-o", str(out), "--kernel", "none", "-q", *args, env=env)


def pushed(registry: Registry, image: OciImage, repo: str) -> str:
    """Push `image` to `registry` as `repo:v1`; the reference pinned by digest."""
    registry.push(image.layout, image.name, f"{repo}:v1")
    digest = "sha256:" + hashlib.sha256(registry.manifest(repo, "v1")[0]).hexdigest()
    return f"docker://{registry.host}/{repo}@{digest}"


def registry_blobs(sandbox: Sandbox, ref: str) -> dict[str, Path]:
    """manifest, config and layer blob paths in the cache of a registry image."""
    digest = ref.rsplit("@", 1)[1]
    manifest = json.loads((sandbox.cache / "blobs/sha256" / digest[7:]).read_text())
    return {
        "manifest": sandbox.cache / "blobs/sha256" / digest[7:],
        "config": sandbox.cache / "blobs/sha256" / manifest["config"]["digest"][7:],
        "layer": sandbox.cache / "blobs/sha256" / manifest["layers"][0]["digest"][7:],
    }


@contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `where` (created), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def peak_rss(
    sandbox: Sandbox, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI under /usr/bin/time -v: (its result, its peak RSS in bytes)."""
    if not Path("/usr/bin/time").exists():
        pytest.skip("/usr/bin/time is needed (apt-get install time)")
    report = sandbox.root / "time.txt"
    r = subprocess.run(
        ["/usr/bin/time", "-v", "-o", str(report), *XBUILD, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=sandbox.root / "work",
        env=env or sandbox.env(),
        stdin=subprocess.DEVNULL,
    )
    kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
    report.unlink()
    assert kb, report
    return r, int(kb.group(1)) * 1024


class _Tee(io.RawIOBase):
    """Hash what goes to `out` (the raw tar, for the diff_id)."""

    def __init__(self, out: Any):
        self.out, self.hash = out, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.hash.update(b)
        return self.out.write(b)


class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


@functools.cache
def bomb(size: int) -> tuple[bytes, str]:
    """(gzip blob, diff_id) of a layer holding /zeros, `size` zero bytes: ≈1000× smaller than its tar."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        tee = _Tee(gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            ti = tarfile.TarInfo("zeros")
            ti.size, ti.mode, ti.mtime = size, 0o644, 1_700_000_000
            tar.addfile(ti, io.BufferedReader(_Zeros(size), 1 << 20))
    return buf.getvalue(), "sha256:" + tee.hash.hexdigest()


def add_bomb_layer(image: OciImage, size: int) -> int:
    """Append the `bomb(size)` layer to `image`; return its blob's size."""
    blob, diff_id = bomb(size)
    layout = image.layout
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / mdesc["digest"][7:]).read_text())
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_text())
    config["rootfs"]["diff_ids"].append(diff_id)
    config["history"].append(config["history"][0])
    manifest["config"] = write_blob(layout, json.dumps(config).encode(), manifest["config"]["mediaType"])
    manifest["layers"].append(write_blob(layout, blob, LAYER_MEDIA_TYPES["gzip"]))
    new = write_blob(layout, json.dumps(manifest).encode(), mdesc["mediaType"])
    index["manifests"] = [dict(new, annotations=mdesc["annotations"])]
    (layout / "index.json").write_text(json.dumps(index))
    return len(blob)


def killed_writer(sandbox: Sandbox, digest: str) -> tuple[subprocess.Popen[bytes], Callable[[], Path]]:
    """A process storing blob `digest` from its stdin (the download path: blobs.store_blob), stuck after
    1.5 MiB; and a function that waits for its temp file in the cache and returns it."""
    code = (
        "import sys; from builder.blobs import store_blob; "
        f"store_blob(sys.stdin.buffer, {digest!r}, 'download')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        env=sandbox.env(),
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdin
    proc.stdin.write(b"x" * (3 << 19))
    proc.stdin.flush()

    def temp() -> Path:
        for _ in range(200):
            found = [p for p in (sandbox.cache / "blobs/sha256").glob(".*") if p.stat().st_size >= 1 << 20]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError("the writer left no temp")

    return proc, temp


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# ---- corrupt entries heal, from an OCI layout ----------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "flip-header", "truncate", "empty", "directory"])
def test_damaged_diff_heals(sandbox: Sandbox, image: OciImage, damage: str) -> None:
    good = sandbox.good_build(image.ref)
    diff = the_diff(sandbox)
    if damage == "flip":
        flip(diff)
    elif damage == "flip-header":
        flip(diff, at=100)  # inside the first member's name: a clean-looking, different tar
    elif damage == "truncate":
        os.truncate(diff, diff.stat().st_size // 3)
    elif damage == "empty":
        os.truncate(diff, 0)
    else:
        diff.unlink()
        (diff / "sub").mkdir(parents=True)
    before = sandbox.snapshot()
    assert sandbox.good_build(image.ref) == good
    assert diff.is_file() and hashlib.sha256(diff.read_bytes()).hexdigest() == diff.name
    assert [c for c in sandbox.changes(before) if "good-" not in c] == []
    assert sandbox.stale_temps() == []


def test_diff_symlinked_outside_is_replaced_not_followed(sandbox: Sandbox, image: OciImage) -> None:
    good = sandbox.good_build(image.ref)
    diff = the_diff(sandbox)
    outside = sandbox.root / "work" / "precious"
    precious = diff.read_bytes()[:1000]
    outside.write_bytes(precious)
    diff.unlink()
    diff.symlink_to(outside)
    assert sandbox.good_build(image.ref) == good
    assert not diff.is_symlink() and outside.read_bytes() == precious


@pytest.mark.parametrize("damage", ["flip", "directory", "symlink", "sum a directory"])
def test_damaged_compiled_init_is_rebuilt(sandbox: Sandbox, image: OciImage, damage: str) -> None:
    good = sandbox.good_build(image.ref)
    binary = init_entry(sandbox) / "init"
    if damage == "flip":
        flip(binary)
    elif damage == "directory":
        binary.unlink()
        binary.mkdir()
    elif damage == "sum a directory":
        (binary.parent / "init.sha256").unlink()
        (binary.parent / "init.sha256" / "x").mkdir(parents=True)
    else:
        target = sandbox.root / "work" / "not-an-init"
        target.write_bytes(b"#!/bin/sh\n")
        binary.unlink()
        binary.symlink_to(target)
    assert sandbox.good_build(image.ref) == good
    assert binary.is_file() and not binary.is_symlink()
    recorded = (binary.parent / "init.sha256").read_text().strip()
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == recorded
    if damage == "symlink":
        assert (sandbox.root / "work" / "not-an-init").read_bytes() == b"#!/bin/sh\n"


def test_diff_replaced_after_flatten_does_not_reach_the_initrd(
    sandbox: Sandbox, image: OciImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pack reads the inode flatten verified (held by fd), not whatever is at the path by then."""
    from builder.build import BuildOptions
    from builder.build import build as run_build
    from builder.flatten import flatten

    good = sandbox.good_build(image.ref)
    monkeypatch.setenv("XBUILD_CACHE", str(sandbox.cache))
    import builder.build as build_module

    real = build_module.flatten

    def flatten_then_swap(img: Any, *a: Any) -> Any:
        flat = real(img, *a)
        diff = the_diff(sandbox)
        bad = diff.with_name(".evil")
        bad.write_bytes(diff.read_bytes().replace(b"root:x:0:0", b"evil:x:0:0"))
        os.replace(bad, diff)  # a different file at the path, after verification
        return flat

    assert flatten is real
    monkeypatch.setattr(build_module, "flatten", flatten_then_swap)
    art = run_build(image.ref, BuildOptions(output=sandbox.root / "work" / "swapped", kernel=None))
    assert art.manifest.initrd.sha256 == good


def test_diff_written_in_place_after_flatten_fails_the_build(
    sandbox: Sandbox, image: OciImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verified inode itself written to between flatten and pack: the build fails, no output."""
    from builder.build import BuildOptions
    from builder.build import build as run_build
    from builder.errors import CacheError

    sandbox.good_build(image.ref)
    monkeypatch.setenv("XBUILD_CACHE", str(sandbox.cache))
    import builder.build as build_module

    real = build_module.flatten

    def flatten_then_write(img: Any, *a: Any) -> Any:
        flat = real(img, *a)
        diff = the_diff(sandbox)
        data = diff.read_bytes()
        with open(diff, "r+b") as f:
            f.seek(data.index(b"root:x:0:0"))
            f.write(b"evil")
        return flat

    monkeypatch.setattr(build_module, "flatten", flatten_then_write)
    out = sandbox.root / "work" / "written"
    with pytest.raises(CacheError, match="modified in place during the build"):
        run_build(image.ref, BuildOptions(output=out, kernel=None))
    assert not out.exists() and not list(out.parent.glob(".written.*"))


# ---- corrupt entries heal from the registry, or fail naming the file when it is gone ------------------


@pytest.mark.parametrize("kind", ["manifest", "config", "layer"])
def test_corrupt_registry_blob_is_fetched_again(
    sandbox: Sandbox, image: OciImage, registry: Registry, kind: str
) -> None:
    ref = pushed(registry, image, f"cache/heal-{kind}")
    good = sandbox.good_build(ref)
    blob = registry_blobs(sandbox, ref)[kind]
    flip(blob)
    if kind == "layer":
        the_diff(sandbox).unlink()  # so the layer blob is read again
    assert sandbox.good_build(ref) == good
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@pytest.mark.parametrize("kind", ["manifest", "config", "layer", "diff+layer"])
def test_corrupt_entry_with_its_registry_gone_names_the_file(
    sandbox: Sandbox, image: OciImage, registry_factory: Callable[..., Registry], kind: str
) -> None:
    reg = registry_factory()
    ref = pushed(reg, image, "cache/gone")
    good = sandbox.good_build(ref)
    reg.stop()
    assert sandbox.good_build(ref) == good  # pinned by digest: a warm build needs no registry
    blobs = registry_blobs(sandbox, ref)
    victim = blobs[kind.split("+")[-1]]
    flip(victim)
    if kind == "layer":
        the_diff(sandbox).unlink()
    elif kind == "diff+layer":
        flip(the_diff(sandbox))
    before = sandbox.snapshot()
    r = build(sandbox, ref)
    assert_refused(r, 1, str(victim), "corrupt cache entry (removed)", "fetching it again failed")
    assert sandbox.changes(before) == []
    assert sandbox.stale_temps() == []
    assert not victim.exists()


def test_corrupt_layer_blob_is_not_a_corrupt_image(
    sandbox: Sandbox, image: OciImage, registry: Registry
) -> None:
    """A flipped bit in a cached layer blob used to be reported (exit 2) on every build."""
    ref = pushed(registry, image, "cache/layer-again")
    good = sandbox.good_build(ref)
    layer = registry_blobs(sandbox, ref)["layer"]
    for _ in range(2):
        flip(layer, at=layer.stat().st_size - 4)  # the gzip trailer (CRC): data decodes, CRC fails
        the_diff(sandbox).unlink()
        assert sandbox.good_build(ref) == good


# ---- stale temps ---------------------------------------------------------------------------------------


def test_killed_download_temp_is_collected(sandbox: Sandbox, image: OciImage) -> None:
    good = sandbox.good_build(image.ref)
    proc, temp = killed_writer(sandbox, "sha256:" + "ab" * 32)
    left = temp()
    proc.kill()
    proc.wait()
    assert left.exists()
    assert sandbox.good_build(image.ref) == good  # young: could be a writer that is just slow
    assert left.exists()
    age(left, 2 * HOUR)
    assert sandbox.good_build(image.ref) == good  # old and unlocked: collected on cache use
    assert not left.exists() and sandbox.stale_temps() == []


def test_prune_never_removes_a_temp_being_written(sandbox: Sandbox) -> None:
    proc, temp = killed_writer(sandbox, "sha256:" + "cd" * 32)
    try:
        writing = temp()
        age(writing, 5 * HOUR)  # old, but its writer is alive and holds the flock
        r = sandbox.xbuild("cache", "prune", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["temps"] == [] and writing.exists()
    finally:
        proc.kill()
        proc.wait()
    r = sandbox.xbuild("cache", "prune", "--json")
    assert json.loads(r.stdout)["temps"] == [str(writing)] and not writing.exists()


# ---- xbuild cache verify | du | prune ------------------------------------------------------------------


def test_verify_finds_and_removes_every_corruption(
    sandbox: Sandbox, image: OciImage, registry: Registry
) -> None:
    ref = pushed(registry, image, "cache/verify")
    good = sandbox.good_build(ref)
    r = sandbox.xbuild("cache", "verify")
    assert r.returncode == 0 and "0 bad" in r.stdout, r.stdout + r.stderr
    blobs = registry_blobs(sandbox, ref)
    flip(blobs["config"])
    os.truncate(blobs["layer"], 10)
    diff = the_diff(sandbox)
    flip(diff)
    flip(init_entry(sandbox) / "init")
    stray = sandbox.cache / "blobs/sha256" / ("0" * 64)
    stray.mkdir()
    r = sandbox.xbuild("cache", "verify", "--json")
    line = assert_refused(r, 1, "5 corrupt cache entries removed")
    bad = {b["path"] for b in json.loads(r.stdout)["bad"]}
    assert bad == {
        str(blobs["config"]),
        str(blobs["layer"]),
        str(diff),
        str(init_entry_path(line)),
        str(stray),
    }
    for p in bad:
        assert p in line and not Path(p).exists()
    r = sandbox.xbuild("cache", "verify")
    assert r.returncode == 0, r.stderr
    assert sandbox.good_build(ref) == good


def init_entry_path(line: str) -> Path:
    (path,) = re.findall(r"\S*/init/[0-9a-f]{64}", line)
    return Path(path)


def test_du_reports_each_kind(sandbox: Sandbox, image: OciImage, registry: Registry) -> None:
    ref = pushed(registry, image, "cache/du")
    sandbox.good_build(ref)
    r = sandbox.xbuild("cache", "du", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["kinds"]["blobs"]["entries"] == 3 and report["kinds"]["diffs"]["entries"] == 1
    assert report["kinds"]["init"]["entries"] == 1
    diff = the_diff(sandbox)
    assert report["kinds"]["diffs"]["bytes"] == diff.stat().st_blocks * 512
    assert report["total"] >= sum(k["bytes"] for k in report["kinds"].values())
    text = sandbox.xbuild("cache", "du").stdout
    assert re.search(r"^diffs\s+1 entries", text, re.M) and "total" in text


def test_prune_max_size_removes_least_recently_used_but_not_held(sandbox: Sandbox, image: OciImage) -> None:
    good = sandbox.good_build(image.ref)
    old = the_diff(sandbox)
    age(old, 10 * HOUR)
    age(init_entry(sandbox), 5 * HOUR)
    # a running build holds the diff (shared flock, as blobs.open_diff does): prune leaves it
    fd = os.open(old, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        r = sandbox.xbuild("cache", "prune", "--max-size", "1K", "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["in_use"] == [str(old)] and old.exists()
        assert str(init_entry_path_from(report)) in {e["path"] for e in report["removed"]}
    finally:
        os.close(fd)
    r = sandbox.xbuild("cache", "prune", "--max-size", "1K", "--json")
    assert str(old) in {e["path"] for e in json.loads(r.stdout)["removed"]} and not old.exists()
    assert sandbox.good_build(image.ref) == good


def init_entry_path_from(report: dict[str, Any]) -> str:
    (path,) = [e["path"] for e in report["removed"] if e["kind"] == "init"]
    return path


def test_prune_max_size_stops_once_under(sandbox: Sandbox, image: OciImage, registry: Registry) -> None:
    ref = pushed(registry, image, "cache/prune")
    sandbox.good_build(ref)
    blobs = registry_blobs(sandbox, ref)
    for i, p in enumerate([blobs["layer"], blobs["config"], blobs["manifest"]]):
        age(p, (10 - i) * HOUR)  # the layer blob is the least recently used
    total = json.loads(sandbox.xbuild("cache", "du", "--json").stdout)["total"]
    limit = total - 4096  # removing the layer blob alone is enough
    r = sandbox.xbuild("cache", "prune", "--max-size", str(limit), "--json")
    removed = [e["path"] for e in json.loads(r.stdout)["removed"]]
    assert removed == [str(blobs["layer"])], r.stdout
    assert blobs["config"].exists() and the_diff(sandbox).exists()


def test_bad_sizes_are_one_line(sandbox: Sandbox, image: OciImage) -> None:
    assert_refused(sandbox.xbuild("cache", "prune", "--max-size", "lots"), 2, "--max-size 'lots'")
    assert_refused(build(sandbox, image.ref, "--max-layer-size", "0"), 2, "--max-layer-size '0'")
    env = sandbox.env(XBUILD_MAX_LAYER_SIZE="big")
    assert_refused(build(sandbox, image.ref, env=env), 2, "XBUILD_MAX_LAYER_SIZE 'big'")


# ---- a layer that expands 1000x -------------------------------------------------------------------------


def test_layer_over_the_cap_is_refused_with_nothing_cached(sandbox: Sandbox, image: OciImage) -> None:
    blob_size = add_bomb_layer(image, 256 << 20)  # 256 MiB of zeros in ~256 KB
    assert blob_size * 1000 < 260 << 20
    before = sandbox.snapshot()
    r, rss = peak_rss(
        sandbox, image.ref, "-o", str(sandbox.out), "--kernel", "none", "-q", "--max-layer-size", "64M"
    )
    assert_refused(r, 2, "expands past the 64 MiB layer size cap", "--max-layer-size")
    assert rss < 150 << 20, rss
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []
    assert len(entries(sandbox, "diffs")) == 1  # the busybox layer's only
    assert sum(p.stat().st_size for p in sandbox.cache.rglob("*") if p.is_file()) < 16 << 20
    env = sandbox.env(XBUILD_MAX_LAYER_SIZE="128M")  # the environment sets it too
    assert_refused(build(sandbox, image.ref, env=env), 2, "past the 128 MiB layer size cap")


def test_layer_under_a_raised_cap_is_accepted(sandbox: Sandbox, image: OciImage) -> None:
    add_bomb_layer(image, 256 << 20)
    r, rss = peak_rss(
        sandbox, image.ref, "-o", str(sandbox.out), "--kernel", "none", "-q", "--max-layer-size", "1G"
    )
    assert r.returncode == 0, r.stderr
    assert rss < 150 << 20, rss
    assert len(entries(sandbox, "diffs")) == 2


# ---- a full disk -----------------------------------------------------------------------------------------


def test_full_cache_disk_is_one_line(sandbox: Sandbox, image: OciImage) -> None:
    before = sandbox.snapshot()
    with tmpfs(sandbox.cache, 512 << 10):  # the busybox diff is ~2 MB
        r = build(sandbox, image.ref)
        assert_refused(r, 1, f"no space left on {sandbox.cache}", "diffs/sha256")
        assert sandbox.stale_temps() == []
        assert entries(sandbox, "diffs") == []
    assert sandbox.changes(before) == []


def test_full_cache_disk_at_the_compiled_init(sandbox: Sandbox, image: OciImage) -> None:
    sandbox.good_build(image.ref)
    diff_size = the_diff(sandbox).stat().st_size
    shutil.rmtree(sandbox.cache)
    before = sandbox.snapshot()
    with tmpfs(sandbox.cache, diff_size + (16 << 10)):  # the diff fits, the ~60 KB init does not
        r = build(sandbox, image.ref)
        assert_refused(r, 1, f"no space left on {sandbox.cache}", "/init")
        assert sandbox.stale_temps() == []
        assert not any((sandbox.cache / "init").rglob("init"))
    assert sandbox.changes(before) == []


@pytest.mark.parametrize("room", ["none", "initrd only"])
def test_full_output_disk_leaves_nothing(sandbox: Sandbox, image: OciImage, room: str) -> None:
    sandbox.good_build(image.ref)
    initrd = next((sandbox.root / "work").glob("good-*/initrd.img")).stat().st_size
    size = 64 << 10 if room == "none" else (initrd + 4095) // 4096 * 4096  # then the SBOM fails
    full = sandbox.root / "work" / "full"
    with tmpfs(full, size):
        before = sandbox.snapshot()
        r = sandbox.xbuild(image.ref, "-o", str(full / "out"), "--kernel", "none", "-q")
        line = assert_refused(r, 1, f"no space left on {full}")
        # the initrd, or then the next file the build writes, the SBOM (written in the artifact's temp
        # directory: the final path named)
        assert line.endswith(
            f"(writing {full / 'out' / 'initrd.img'})"
            if room == "none"
            else f"(writing {full / 'out' / 'sbom.cdx.json'})"
        ), line
        assert sandbox.changes(before) == [] and list(full.iterdir()) == []


def test_sandbox_cache_is_left_clean_after_signals(sandbox: Sandbox, image: OciImage) -> None:
    """A build killed while it writes a diff leaves a temp that `cache prune` collects once old."""
    add_bomb_layer(image, 256 << 20)
    proc = subprocess.Popen(
        [*XBUILD, image.ref, "-o", str(sandbox.out), "--kernel", "none", "-q"],
        cwd=sandbox.root / "work",
        env=sandbox.env(),
        stderr=subprocess.PIPE,
    )
    for _ in range(400):
        if (
            any((sandbox.cache / "diffs/sha256").glob(".*"))
            if (sandbox.cache / "diffs/sha256").is_dir()
            else False
        ):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    temps = list((sandbox.cache / "diffs/sha256").glob(".*"))
    for t in temps:
        age(t, 2 * HOUR)
    r = sandbox.xbuild("cache", "prune", "--json")
    assert sorted(json.loads(r.stdout)["temps"]) == sorted(map(str, temps))
    assert sandbox.stale_temps() == []


# ---- kernels in the cache -------------------------------------------------------------------------------
# A real kernel entry (the warmed default kernel) is *copied* into the sandbox cache: nothing here builds a
# kernel or touches the shared cache; a rebuild is made to fail at once with a source tree that is no kernel.


def real_kernel() -> Path:
    """The directory of a built kernel in the shared cache (read only here), or skip."""
    kernels = Path(os.environ.get("XBUILD_CACHE") or Path.home() / ".cache/xbuild") / "kernels"
    found = sorted(
        d for d in kernels.glob("*") if (d / "kernel.json").is_file() and (d / "vmlinux").is_file()
    )
    if not found:
        pytest.skip("needs a built kernel in the cache (the warmed default kernel)")
    return found[0]


def kernel_copy(sandbox: Sandbox, key: str, record: bool = False) -> Path:
    """A copy of the real kernel entry at kernels/`key` of the sandbox cache, as an xbuild older than the
    record left it (no sha256 in kernel.json) unless `record`."""
    d = shutil.copytree(real_kernel(), sandbox.cache / "kernels" / key)
    meta = json.loads((d / "kernel.json").read_text())
    meta.pop("sha256", None)
    (d / "kernel.json").write_text(json.dumps(meta | {"key": key}))
    if record:
        r = sandbox.xbuild("cache", "verify")
        assert r.returncode == 0, r.stderr
    return d


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kernel_entry_without_record_is_recorded_then_checked_by_verify(sandbox: Sandbox) -> None:
    d = kernel_copy(sandbox, "a" * 64)
    r = sandbox.xbuild("cache", "verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["bad"] == [], r.stdout + r.stderr
    record = json.loads((d / "kernel.json").read_text())["sha256"]
    assert record == {p.name: sha(p) for p in d.iterdir() if p.name != "kernel.json"}
    flip(d / "vmlinux")
    r = sandbox.xbuild("cache", "verify", "--json")
    line = assert_refused(r, 1, "1 corrupt cache entry removed", str(d))
    (bad,) = json.loads(r.stdout)["bad"]
    assert bad["path"] == str(d) and f"{d}/vmlinux: content hashes to" in bad["problem"], line
    assert not d.exists()


@pytest.mark.parametrize("damage", ["flipped", "missing", "directory", "kernel.json"])
def test_damaged_kernel_entry_that_cannot_be_rebuilt_is_named(sandbox: Sandbox, damage: str) -> None:
    from builder import kernel

    src = sandbox.root / "not-a-kernel-tree"  # `make tinyconfig` fails in it at once
    src.mkdir()
    (src / "README").write_text("not a kernel\n")
    texts = {name: kernel.fragment_path(name).read_text() for name in kernel.DEFAULT_FRAGMENTS}
    key = kernel.cache_key(src, texts, kernel._toolchain())
    d = kernel_copy(sandbox, key)
    r = sandbox.xbuild("kernel", "build", "--source", str(src), "--json")  # used as is, recorded
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(d / "vmlinux") and "sha256" in (d / "kernel.json").read_text()
    named = d / ("kernel.json" if damage == "kernel.json" else "vmlinux")
    if damage == "flipped":
        flip(named)
    elif damage == "missing":
        named.unlink()
    elif damage == "directory":
        named.unlink()
        named.mkdir()
    else:
        named.write_text("{")
    r = sandbox.xbuild("kernel", "build", "--source", str(src), "--json")
    assert_refused(
        r, 1, str(named), "corrupt cache entry (removed); building it again failed: kernel build failed"
    )
    assert not d.exists()


def test_flipped_bit_in_a_pulled_kernel_heals(sandbox: Sandbox, image: OciImage, registry: Registry) -> None:
    pusher = sandbox.root / "pusher-cache"
    shutil.copytree(real_kernel(), pusher / "kernels" / real_kernel().name)
    original = sha(pusher / "kernels" / real_kernel().name / "vmlinux")
    ref = f"{registry.host}/kernels/heal:1"
    r = sandbox.xbuild("kernel", "push", ref, env=sandbox.env(XBUILD_CACHE=str(pusher)))
    assert r.returncode == 0, r.stderr

    def build_with_kernel() -> str:
        r = sandbox.xbuild(image.ref, "-o", str(sandbox.out), "--kernel", f"oci://{ref}", "-q")
        assert r.returncode == 0, r.stderr
        return sha(sandbox.out / "kernel")

    assert build_with_kernel() == original
    (d,) = (sandbox.cache / "kernels").glob("oci-*")  # its own namespace, never kernels/<key>
    assert not (sandbox.cache / "kernels" / real_kernel().name).exists()
    assert json.loads((d / "kernel.json").read_text())["sha256"]["vmlinux"] == original
    flip(d / "vmlinux")
    assert build_with_kernel() == original and sha(d / "vmlinux") == original
    blob = sandbox.cache / "blobs/sha256" / original  # the layer is the file as is
    flip(blob)
    flip(d / "vmlinux")
    assert build_with_kernel() == original and sha(d / "vmlinux") == original and sha(blob) == original


def test_prune_keeps_a_kernel_dir_a_running_build_holds(sandbox: Sandbox) -> None:
    d = kernel_copy(sandbox, "b" * 64, record=True)
    age(d, 10 * HOUR)
    # a process using the kernel as a build does (kernel.cached: a shared flock on the dir, held)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from builder import kernel; "
            f"kernel.cached(Path({str(d)!r})); print('held', flush=True); sys.stdin.read()",
        ],
        env=sandbox.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        r = sandbox.xbuild("cache", "prune", "--max-size", "1K", "--json")
        assert r.returncode == 0, r.stderr
        assert str(d) in json.loads(r.stdout)["in_use"] and (d / "vmlinux").is_file()
    finally:
        holder.communicate("")
    r = sandbox.xbuild("cache", "prune", "--max-size", "1K", "--json")
    assert str(d) in {e["path"] for e in json.loads(r.stdout)["removed"]} and not d.exists()


def test_verify_checks_pulled_artifacts(sandbox: Sandbox, image: OciImage) -> None:
    sandbox.good_build(image.ref)
    pulled = sandbox.cache / "pulled" / "0123456789abcdef"
    shutil.copytree(next((sandbox.root / "work").glob("good-*")), pulled)  # what `pull` writes there
    r = sandbox.xbuild("cache", "verify")
    assert r.returncode == 0, r.stderr
    flip(pulled / "initrd.img")
    r = sandbox.xbuild("cache", "verify", "--json")
    assert_refused(r, 1, "1 corrupt cache entry removed", str(pulled))
    (bad,) = json.loads(r.stdout)["bad"]
    assert f"{pulled}/initrd.img: content hashes to" in bad["problem"] and not pulled.exists()


# ---- the docker-daemon source ---------------------------------------------------------------------------


@pytest.mark.usefixtures("myapp")
def test_corrupt_daemon_config_heals(sandbox: Sandbox, dockerd: Any) -> None:
    env = sandbox.env(DOCKER_HOST=dockerd.host)
    ref = "docker-daemon:myapp:dev"
    r = sandbox.xbuild(ref, "-o", str(sandbox.out), "--kernel", "none", "-q", env=env)
    assert r.returncode == 0, r.stderr
    good = sha(sandbox.out / "initrd.img")
    config = (
        sandbox.cache
        / "blobs/sha256"
        / dockerd.docker("image", "inspect", "-f", "{{.Id}}", "myapp:dev").strip()[7:]
    )
    for damage in ("flip", "directory"):
        if damage == "flip":
            flip(config)
        else:
            config.unlink()
            config.mkdir()
        r = sandbox.xbuild(ref, "-o", str(sandbox.out), "--kernel", "none", "-q", env=env)
        assert r.returncode == 0, r.stderr
        assert sha(sandbox.out / "initrd.img") == good and sha(config) == config.name


@pytest.mark.usefixtures("myapp")
def test_full_cache_disk_during_docker_save_is_one_line(sandbox: Sandbox, dockerd: Any) -> None:
    before = sandbox.snapshot()
    with tmpfs(sandbox.cache, 1 << 20):  # myapp's 3 MiB layer is spooled from `docker save`
        r = sandbox.xbuild(
            "docker-daemon:myapp:dev",
            "-o",
            str(sandbox.out),
            "--kernel",
            "none",
            "-q",
            env=sandbox.env(DOCKER_HOST=dockerd.host),
        )
        assert_refused(r, 1, f"no space left on {sandbox.cache}", f"(writing {sandbox.cache}/tmp/")
        assert sandbox.stale_temps() == []
    assert sandbox.changes(before) == []


# ---- publish ------------------------------------------------------------------------------------------


def test_full_cache_disk_while_push_compresses_the_disk(
    sandbox: Sandbox, image: OciImage, registry: Registry
) -> None:
    art = sandbox.root / "work" / "disk-art"
    r = sandbox.xbuild(image.ref, "-o", str(art), "--kernel", "none", "--format", "disk", "-q")
    if r.returncode != 0 and "mkfs" in r.stderr:
        pytest.skip(r.stderr)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(sandbox.cache)
    before = sandbox.snapshot()
    with tmpfs(sandbox.cache, 16 << 10):
        r = sandbox.xbuild("push", str(art), f"{registry.host}/cache/full-disk:1", "-q")
        want = json.loads((art / "manifest.json").read_text())["disk"]["sha256"]
        assert_refused(
            r,
            1,
            f"no space left on {sandbox.cache}",
            f"(writing {sandbox.cache}/blobs/sha256/zstd-of-{want})",
        )
        assert list(sandbox.cache.rglob(".*")) == []  # (TMPDIR holds the disk build's guestfs cache)
    assert sandbox.changes(before) == []


def test_prune_leaves_the_warm_rigs_state_alone(sandbox: Sandbox) -> None:
    """The warm rig's state under the cache (`rig-run`, when neither $XBUILD_RIG nor $XDG_RUNTIME_DIR is
    set) is a running process's: `cache prune --max-size` and the temp collection never touch it, old
    temp-named files in its share included; `cache du` does not list it."""
    state = sandbox.cache / "rig-run"
    (state / "share" / "jobs").mkdir(parents=True)
    (state / "state.json").write_text("{}")
    job = state / "share" / "jobs" / ".xbuild-job.1"
    job.write_bytes(b"x" * 4096)
    for p in (state / "state.json", job):
        age(p, 10 * HOUR)
    r = sandbox.xbuild("cache", "prune", "--max-size", "1K", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert not any("rig-run" in p for p in report["temps"] + [e["path"] for e in report["removed"]])
    assert (state / "state.json").exists() and job.exists()
    du = sandbox.xbuild("cache", "du", "--json")
    assert "rig-run" not in du.stdout, du.stdout


def test_one_builder_makes_a_second_process_wait_for_the_first(tmp_path: Path) -> None:
    """Two processes building one entry (two CI jobs on one host needing the same kernel): the second blocks
    in one_builder until the first leaves it and says that it waits; the lock file goes with its holder. A
    killed holder frees the lock, and the file it leaves is a temp by name, never an entry of the cache."""
    from builder.cache import entries, is_temp, one_builder

    final = tmp_path / "kernels" / ("a" * 64)
    holder = (
        "import sys, time; from pathlib import Path; from builder.cache import one_builder\n"
        f"with one_builder(Path({str(final)!r}), lambda: None):\n"
        "    print('held', flush=True); time.sleep(float(sys.argv[1]))\n"
    )
    first = subprocess.Popen([sys.executable, "-c", holder, "2"], stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None and first.stdout.readline() == "held\n"
    said: list[float] = []
    start = time.monotonic()
    with one_builder(final, lambda: said.append(time.monotonic())):
        got = time.monotonic()  # the first holds it for 2 s
    assert len(said) == 1 and said[0] - start < 1 and got - start > 1.5
    assert first.wait() == 0
    assert list((tmp_path / "kernels").iterdir()) == []  # the holder removes the lock file as it leaves
    killed = subprocess.Popen([sys.executable, "-c", holder, "60"], stdout=subprocess.PIPE, text=True)
    assert killed.stdout is not None and killed.stdout.readline() == "held\n"
    killed.kill()
    killed.wait()
    (left,) = (tmp_path / "kernels").iterdir()  # a killed holder's: a temp by name, never an entry
    assert is_temp(left.name) and entries(tmp_path) == []
    outside = tmp_path / "outside"
    left.unlink()
    left.symlink_to(outside)  # planted: never followed, replaced
    with one_builder(final, lambda: None):
        assert not outside.exists() and not left.is_symlink()
    start = time.monotonic()
    with one_builder(final, lambda: None):
        assert time.monotonic() - start < 5  # not the 60 s the killed holder meant to keep it
