"""A lying, slow or hostile registry: bounded in memory and time, and answered with one line.

A real docker-registry holds a small image and a VM artifact; the fault server
(tests/fixtures/hostile_registry.py) stands in front of it and answers chosen requests with a fault. Every
case runs the real CLI (`xbuild` or `xbuild pull`) in a sandbox with the transfer knobs set low (stall 0.5 s,
deadline 2 s) and asserts: the exit code and exactly one error line, nothing written outside the cache,
no temp file left, and a good build (or pull) afterwards in the same cache gives the same bytes as before.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import resource
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fixtures import hostile_registry as hr
from tests.fixtures.hostile import XBUILD, Sandbox, assert_refused
from tests.fixtures.images import make_busybox_image
from tests.fixtures.registry import Registry

REPO, ARTIFACT_REPO = "hostile/busybox", "hostile/vm"
KNOBS = {"XBUILD_REGISTRY_STALL_TIMEOUT": "0.5", "XBUILD_REGISTRY_DEADLINE": "2"}
MEMORY = 1 << 30  # address-space limit of the CLI in these cases: a bomb decoded whole breaks it
WALL = 40  # no case may take longer (a client that waits for ever fails here)
MANIFEST = r"/manifests/"
BLOB = r"GET /v2/[^ ]*/blobs/sha256:"
CHEAP = ("--minimize", "none", "--compression", "none")  # the cases are about the network: build fast
Fault = hr.FaultRegistry
Served = dict[str, str]


@functools.cache
def bomb(size: int = 1 << 30) -> bytes:
    return hr.gzip_bomb(size)


@pytest.fixture(scope="module")
def served(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The image and the VM artifact in the real registry, and what a good build and pull give."""
    work = tmp_path_factory.mktemp("served")
    image = make_busybox_image(work / "oci")
    registry.push(image.layout, image.name, f"{REPO}:v1")
    box = Sandbox(work / "box")
    for d in (box.home, box.tmp, box.cache, box.root / "work"):
        d.mkdir(parents=True)
    initrd = box.good_build(f"docker://{registry.host}/{REPO}:v1", *CHEAP)
    art = box.root / "work" / "art"
    r = box.xbuild(
        f"docker://{registry.host}/{REPO}:v1",
        "-o",
        str(art),
        "--kernel",
        "none",
        "-q",
        *CHEAP,
        "--push",
        f"{registry.host}/{ARTIFACT_REPO}:v1",
    )
    assert r.returncode == 0, r.stderr
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(art.iterdir())}
    config, _ = registry.manifest(ARTIFACT_REPO, "v1")
    doc = json.loads(config)
    return {
        "initrd": initrd,
        "files": json.dumps(files),
        "config": doc["config"]["digest"],
        "initrd_blob": next(
            d["digest"]
            for d in doc["layers"]
            if d["annotations"]["org.opencontainers.image.title"] == "initrd.img"
        ),
    }


@pytest.fixture
def fault(registry: Registry) -> Iterator[hr.FaultRegistry]:
    server = hr.FaultRegistry(registry.url)
    yield server
    server.close()


def xbuild(box: Sandbox, *args: str, memory: int = MEMORY) -> subprocess.CompletedProcess[str]:
    """The CLI with the test knobs, an address-space limit and a wall-time limit."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [*XBUILD, *args],
        capture_output=True,
        text=True,
        timeout=WALL,
        cwd=box.root / "work",
        env=box.env(**KNOBS),
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
    )


def built(box: Sandbox, fault: Fault) -> str:
    """Build through the fault server with the test knobs; the initrd's sha256."""
    r = xbuild(box, f"docker://{fault.host}/{REPO}:v1", "-o", str(box.out), "--kernel", "none", "-q", *CHEAP)
    assert r.returncode == 0, r.stderr
    return str(json.loads((box.out / "manifest.json").read_text())["initrd"]["sha256"])


def build_refused(box: Sandbox, fault: Fault, served: dict[str, str], code: int, *needles: str) -> str:
    """Build through the fault server: refused as told, nothing left behind, and a good build after."""
    before = box.snapshot()
    r = xbuild(box, f"docker://{fault.host}/{REPO}:v1", "-o", str(box.out), "--kernel", "none", "-q", *CHEAP)
    line = assert_refused(r, code, *needles)
    assert box.changes(before) == []
    assert box.stale_temps() == []
    fault.clear()
    assert box.good_build(f"docker://{fault.host}/{REPO}:v1", *CHEAP) == served["initrd"]
    return line


def pull_refused(box: Sandbox, fault: Fault, served: dict[str, str], code: int, *needles: str) -> str:
    """Pull the VM artifact through the fault server: refused as told, nothing left, a good pull after."""
    before = box.snapshot()
    r = xbuild(box, "pull", f"{fault.host}/{ARTIFACT_REPO}:v1", "-o", str(box.out))
    line = assert_refused(r, code, *needles)
    assert box.changes(before) == []
    assert box.stale_temps() == []
    fault.clear()
    good = box.root / "work" / "pulled"
    r = xbuild(box, "pull", f"{fault.host}/{ARTIFACT_REPO}:v1", "-o", str(good))
    assert r.returncode == 0, r.stderr
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(good.iterdir())}
    assert json.dumps(files) == served["files"]
    return line


def manifest_of(repo: str) -> str:
    return rf"GET /v2/{repo}/manifests/"


# ---- sizes: caps enforced while reading ----------------------------------------------------------------


def test_build_50mb_manifest_is_refused_unread(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.padded_upstream(50 << 20))
    build_refused(sandbox, fault, served, 2, "manifest", "larger than 4 MiB")
    assert fault.most_sent(manifest_of(REPO)) < 16 << 20


def test_build_endless_manifest(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.endless())
    build_refused(sandbox, fault, served, 2, "manifest", "larger than 4 MiB")


def test_build_manifest_length_lies_large(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.fixed(b"{}", length=1 << 40))
    build_refused(sandbox, fault, served, 2, "manifest", "larger than 4 MiB")


def test_build_gzip_bomb_manifest(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.encoded(bomb()))
    build_refused(sandbox, fault, served, 2, "manifest", "larger than 4 MiB")


def test_build_nested_gzip_bomb_config(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(BLOB, hr.encoded(gzip.compress(bomb()), "gzip, gzip"))
    build_refused(sandbox, fault, served, 2, "config", "size mismatch")


def test_build_gzip_bomb_error_body(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.encoded(bomb(), code=404))
    build_refused(sandbox, fault, served, 2, "manifest unknown")


def test_build_zstd_encoded_manifest(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    import zstandard

    fault.fault(manifest_of(REPO), hr.encoded(zstandard.compress(bytes(64 << 20)), "zstd"))
    build_refused(sandbox, fault, served, 2, "manifest", "Content-Encoding 'zstd'")


def test_build_corrupt_gzip_encoding(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.encoded(b"\x1f\x8b\x08\x00not gzip at all"))
    build_refused(sandbox, fault, served, 2, "manifest", "corrupt gzip Content-Encoding")


def test_build_token_100mb(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge(f"{fault.url}/token"))
    fault.fault(r"GET /token", hr.endless())
    build_refused(sandbox, fault, served, 2, "token", "larger than")


def test_build_token_gzip_bomb(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge(f"{fault.url}/token"))
    fault.fault(r"GET /token", hr.encoded(bomb()))
    build_refused(sandbox, fault, served, 2, "token", "larger than")


def test_good_gzip_encoded_answers_are_decoded(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    """A proxy that gzips every answer (manifests and blobs) is fine: decoded, bounded, verified."""
    fault.fault(r"GET ", hr.gzipped_upstream())
    assert built(sandbox, fault) == served["initrd"]


# ---- time: stalls, drips, deadlines --------------------------------------------------------------------


def test_build_manifest_drips(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.drip(0.3))
    build_refused(sandbox, fault, served, 2, "manifest", "XBUILD_REGISTRY_DEADLINE")


def test_build_headers_drip(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"HEAD ", hr.drip(0.3, headers_too=True))
    build_refused(sandbox, fault, served, 2, "XBUILD_REGISTRY_DEADLINE")


def test_build_layer_drips(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(BLOB, hr.drip(0.3))
    build_refused(sandbox, fault, served, 2, "XBUILD_REGISTRY_DEADLINE")


def test_build_manifest_stalls_after_headers(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.stall(30))
    build_refused(sandbox, fault, served, 2, "manifest", "stalled", "XBUILD_REGISTRY_STALL_TIMEOUT")


def test_build_blob_stalls_after_headers(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(BLOB, hr.stall(30))
    build_refused(sandbox, fault, served, 2, "stalled", "XBUILD_REGISTRY_STALL_TIMEOUT")


def test_build_429_retry_after_beyond_deadline(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.status(429, {"Retry-After": "600"}))
    build_refused(sandbox, fault, served, 2, "HTTP 429", "Retry-After")


def test_build_stall_then_success_is_retried(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    """One stalled answer is a transient failure: the next try gets the manifest."""
    fault.fault(manifest_of(REPO), hr.stall(30), times=1)
    assert built(sandbox, fault) == served["initrd"]


# ---- redirects, realms, garbage ------------------------------------------------------------------------


def test_build_manifest_redirect_loop(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.redirect_loop())
    build_refused(sandbox, fault, served, 2, "too many redirects")


def test_build_blob_redirect_to_file(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(BLOB, hr.redirect("file:///etc/passwd"))
    build_refused(sandbox, fault, served, 2, "redirected to a non-http(s) URL", "file:///etc/passwd")


def test_build_manifest_redirect_to_ftp(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.redirect("ftp://127.0.0.1/manifest"))
    build_refused(sandbox, fault, served, 2, "redirected to a non-http(s) URL")


def test_build_token_realm_malformed(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge("http://[::1/token"))
    build_refused(sandbox, fault, served, 2, "token realm", "not an http(s) URL")


def test_build_token_realm_not_http(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge("file:///etc/shadow"))
    build_refused(sandbox, fault, served, 2, "token realm", "not an http(s) URL")


def test_build_token_realm_redirect_loop(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge(f"{fault.url}/token"))
    fault.fault(r"GET /token", hr.redirect_loop())
    build_refused(sandbox, fault, served, 2, "too many redirects")


def test_build_token_realm_redirect_to_file(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge(f"{fault.url}/token"))
    fault.fault(r"GET /token", hr.redirect("file:///etc/shadow"))
    build_refused(sandbox, fault, served, 2, "redirected to a non-http(s) URL")


def test_build_token_not_json(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge(f"{fault.url}/token"))
    fault.fault(r"GET /token", hr.fixed(b"<html>not a token</html>"))
    build_refused(sandbox, fault, served, 2, "answered without a token")


def test_build_layer_reset_mid_body(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(BLOB, hr.short(reset=True))
    build_refused(sandbox, fault, served, 2, "after 4 tries")


def test_build_manifest_short_body(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(REPO), hr.short())
    build_refused(sandbox, fault, served, 2, "after 4 tries")


def test_build_layer_wrong_digest(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(BLOB, hr.corrupt())
    build_refused(sandbox, fault, served, 2, "digest mismatch")


# ---- xbuild pull of a VM image -------------------------------------------------------------------------


def test_pull_50mb_manifest(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(ARTIFACT_REPO), hr.padded_upstream(50 << 20))
    pull_refused(sandbox, fault, served, 2, "manifest", "larger than 4 MiB")


def test_pull_endless_manifest(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(ARTIFACT_REPO), hr.endless())
    pull_refused(sandbox, fault, served, 2, "manifest", "larger than 4 MiB")


def test_pull_gzip_bomb_manifest(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(ARTIFACT_REPO), hr.encoded(bomb()))
    pull_refused(sandbox, fault, served, 2, "manifest", "larger than 4 MiB")


def test_pull_nested_gzip_bomb_config(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(rf"/blobs/{served['config']}", hr.encoded(gzip.compress(bomb()), "gzip, gzip"))
    pull_refused(sandbox, fault, served, 2, "size mismatch")


def test_pull_nested_gzip_bomb_initrd(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(rf"/blobs/{served['initrd_blob']}", hr.encoded(gzip.compress(bomb()), "gzip, gzip"))
    pull_refused(sandbox, fault, served, 2, "initrd.img", "size mismatch")


def test_pull_manifest_drips(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(ARTIFACT_REPO), hr.drip(0.3))
    pull_refused(sandbox, fault, served, 2, "XBUILD_REGISTRY_DEADLINE")


def test_pull_config_stalls(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(rf"/blobs/{served['config']}", hr.stall(30))
    pull_refused(sandbox, fault, served, 2, "stalled", "XBUILD_REGISTRY_STALL_TIMEOUT")


def test_pull_blob_redirect_loop(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(rf"/blobs/{served['initrd_blob']}", hr.redirect_loop())
    pull_refused(sandbox, fault, served, 2, "too many redirects")


def test_pull_blob_redirect_to_file(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(rf"/blobs/{served['initrd_blob']}", hr.redirect("file:///etc/passwd"))
    pull_refused(sandbox, fault, served, 2, "redirected to a non-http(s) URL")


def test_pull_token_realm_malformed(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(r"/v2/", hr.challenge("http://[::1/token"))
    pull_refused(sandbox, fault, served, 2, "token realm", "not an http(s) URL")


def test_pull_corrupt_gzip_config(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(rf"/blobs/{served['config']}", hr.encoded(b"\x1f\x8b\x08\x00garbage"))
    pull_refused(sandbox, fault, served, 2, "corrupt gzip Content-Encoding")


def test_pull_429_retry_after(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    fault.fault(manifest_of(ARTIFACT_REPO), hr.status(429, {"Retry-After": "600"}))
    pull_refused(sandbox, fault, served, 2, "HTTP 429", "Retry-After")


def test_bad_knob_is_one_line(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    """A knob that is not a number of seconds is the user's bad input: one line, exit 2."""
    before = sandbox.snapshot()
    ref = f"docker://{fault.host}/{REPO}:v1"
    r = subprocess.run(
        [*XBUILD, ref, "-o", str(sandbox.out), "--kernel", "none"],
        capture_output=True,
        text=True,
        timeout=WALL,
        cwd=sandbox.root / "work",
        env=sandbox.env(XBUILD_REGISTRY_STALL_TIMEOUT="soon"),
    )
    assert_refused(r, 2, "XBUILD_REGISTRY_STALL_TIMEOUT='soon'", "positive number of seconds")
    assert sandbox.changes(before) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_build_interrupted_mid_download_leaves_nothing(
    sandbox: Sandbox, fault: Fault, served: Served, sig: signal.Signals
) -> None:
    """SIGTERM (or Ctrl-C) while a layer drips in: one line, 128 + the signal, no temp file, no output."""
    fault.fault(BLOB, hr.drip(0.05))
    before = sandbox.snapshot()
    proc = subprocess.Popen(
        [
            *XBUILD,
            f"docker://{fault.host}/{REPO}:v1",
            "-o",
            str(sandbox.out),
            "--kernel",
            "none",
            "-q",
            *CHEAP,
        ],
        cwd=sandbox.root / "work",
        text=True,
        env=sandbox.env(XBUILD_REGISTRY_DEADLINE="120", PYTHONFAULTHANDLER="1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WALL
        while not any(m == "GET" and "/blobs/" in p for m, p in fault.requests):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(1)
        assert proc.poll() is None
        proc.send_signal(sig)
        try:
            _, stderr = proc.communicate(timeout=WALL)
        except subprocess.TimeoutExpired:  # say where it hangs (once: SIGINT ignored, see tests/conftest.py)
            if proc.poll() is not None:
                pytest.fail(f"exited {proc.returncode} after {sig.name}, but a descendant holds its stderr")
            proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack on stderr
            _, stderr = proc.communicate(timeout=WALL)
            pytest.fail(f"still running {WALL} s after {sig.name}; its stacks:\n{stderr}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig
    assert stderr.strip().splitlines() == [f"xbuild: interrupted ({sig.name})"], stderr
    assert sandbox.changes(before) == []
    assert sandbox.stale_temps() == []
    fault.clear()
    assert sandbox.good_build(f"docker://{fault.host}/{REPO}:v1", *CHEAP) == served["initrd"]


def test_build_retry_after_that_is_not_ascii(sandbox: Sandbox, fault: Fault, served: Served) -> None:
    """`Retry-After: ²` (a digit to str.isdigit, not to float) is an ordinary 429: retried, then one line."""
    fault.fault(r"/v2/", hr.status(429, {"Retry-After": "²"}))
    build_refused(sandbox, fault, served, 2, "HTTP 429")
