"""arm64 guests (issue 18.1, 18.5): the arm64 Debian test image (tests/fixtures/build-arm64-oci.sh:
debootstrap --arch arm64, second stage under qemu-user-static) built by the real CLI for linux/arm64.

The build test proves the minimizer follows aarch64 programs through the aarch64 loader and multiarch
directories of a real arm64 tree and that the guest's init is the arm64 one; the boot test proves exit
status, environment and user under `xbuild run` (qemu-system-aarch64) with xbuild's arm64 kernel.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder.elf import parse
from tests.fixtures.hostile import Sandbox
from tests.fixtures.images import arm64_layout

pytestmark = pytest.mark.slow  # the fixture image: one debootstrap --arch arm64 (cached by its scripts' hash)

KEPT = (  # the probe script, its shell and commands, and what loads them: aarch64 loader, libc, multiarch dir
    "usr/local/bin/probe",
    "usr/bin/dash",
    "usr/bin/sh",
    "usr/bin/id",
    "usr/bin/uname",
    "lib",
    "usr/lib/ld-linux-aarch64.so.1",
    "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
    "usr/lib/aarch64-linux-gnu/libc.so.6",
    "etc/passwd",
)


@pytest.fixture(scope="module")
def probe_ref() -> str:
    return f"oci:{arm64_layout()}:arm64-probe"


def _initrd(artifact: Path) -> bytes:
    """The artifact's initrd as the real zstd decompresses it."""
    return subprocess.run(
        ["zstd", "-dc", str(artifact / "initrd.img")], capture_output=True, check=True
    ).stdout


def _member(cpio: bytes, name: str) -> bytes:
    return subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", name], input=cpio, capture_output=True, check=True
    ).stdout


def test_arm64_image_builds(probe_ref: str, sandbox: Sandbox) -> None:
    """`xbuild IMAGE --platform linux/arm64`: the manifest says linux/arm64, minimize auto keeps the aarch64
    loader, libc and multiarch directory the probe's /bin/sh needs (and nothing of x86-64), the init is the
    arm64 one."""
    out = sandbox.root / "work" / "arm64"
    r = sandbox.xbuild(probe_ref, "--platform", "linux/arm64", "--kernel", "none", "-o", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["platform"] == "linux/arm64" and m["minimize"]["mode"] == "auto"
    cpio = _initrd(out)
    names = set(
        subprocess.run(["cpio", "-t", "--quiet"], input=cpio, capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    assert set(KEPT) <= names, set(KEPT) - names
    assert not any("x86_64" in n for n in names)
    assert parse(_member(cpio, ".xbuild/init")).machine == "EM_AARCH64"
    assert parse(_member(cpio, "usr/bin/dash")).interp == "/lib/ld-linux-aarch64.so.1"
    why = sandbox.xbuild("explain", str(out), "/usr/lib/aarch64-linux-gnu/libc.so.6")
    assert "KEPT (elf-closure)" in why.stdout and "DT_NEEDED libc.so.6 of /bin/sh" in why.stdout, why.stdout


def test_arm64_boot_exit_env_user(arm64_artifact: Path, sandbox: Sandbox) -> None:
    """The arm64 artifact with xbuild's arm64 kernel boots under `xbuild run` (qemu-system-aarch64 -M virt,
    TCG): the probe runs as the image's User with its Env on an aarch64 machine, and its exit status (the
    Cmd, 7) is `xbuild run`'s."""
    run = sandbox.xbuild("run", str(arm64_artifact), timeout=600)
    assert (
        "probe: machine=aarch64 user=app uid=1000 gid=1000 greeting=hello-arm64 args=7"
        in run.stdout + run.stderr
    )
    assert run.returncode == 7, run.stderr
