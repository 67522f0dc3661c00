"""xbuild installed from its wheel works outside the checkout: kernels/, initramfs/ and recipes/ ship as
package data, and `xbuild doctor` reads the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from builder.kernel import DEFAULT_FRAGMENTS
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.fixtures.images import OciImage, make_busybox_image

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged() -> None:
    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "builder").rglob("__init__.py")}
    assert on_disk <= packages
    assert {"builder.data.kernels", "builder.data.initramfs", "builder.data.recipes"} <= packages


def test_doctor_names_every_missing_package_in_one_apt_line(tmp_path: Path) -> None:
    """With a PATH that has nothing on it, doctor fails and its last line installs what is missing."""
    env = dict(os.environ, PATH=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-c", "from builder.cli import run; run()", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 1
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("apt-get install ")
    for package in ("musl-tools", "qemu-system-x86", "strace", "e2fsprogs"):
        assert package in last.split()
    assert "xen-utils-4.17" not in last.split()  # optional: only a dom0 has xl
    assert "MISSING  qemu-system-x86_64" in r.stdout


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (
            (),
            1,
            ("musl-gcc or gcc not found (needed for build (the guest init)): apt-get install musl-tools",),
        ),
        (("--format", "disk"), 2, ("not found (needed for --format disk", "apt-get install", "e2fsprogs")),
    ],
)
def test_a_stage_names_what_it_lacks_from_the_one_table(
    args: tuple[str, ...],
    code: int,
    needles: tuple[str, ...],
    sandbox: Sandbox,
    busybox_image: OciImage,
    tmp_path: Path,
) -> None:
    """A build on a host without the stage's tools (an empty PATH, an empty cache: the init must be
    compiled) fails in one line naming the tool, the feature and the apt line from builder/host.py, and
    writes nothing."""
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    env = sandbox.env(PATH=str(bare))
    env.pop("XBUILD_INIT_CC", None)
    before = sandbox.snapshot()
    r = sandbox.xbuild(busybox_image.ref, "-o", str(sandbox.out), "--kernel", "none", "-q", *args, env=env)
    assert_refused(r, code, *needles)
    assert sandbox.changes(before) == []
    assert sandbox.stale_temps() == []


@pytest.mark.slow
def test_the_wheel_builds_and_boots_an_image_outside_the_checkout(
    tmp_path: Path, default_kernel_path: Path
) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"initramfs/init.c", "kernels/base.config", "kernels/cmdline", "recipes/nginx.toml"} <= names

    venv = tmp_path / "venv"
    # libguestfs' binding is Debian's only (python3-guestfs, not on PyPI): a venv sees it through the
    # system site-packages, as the README tells pipx and venv users
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # the shared kernel cache keeps this from compiling a kernel: the wheel's fragments give the same key
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XBUILD_CACHE"] = str(Path(default_kernel_path).parents[2])
    img = make_busybox_image(tmp_path / "oci", ref="busybox-httpd")

    def xbuild(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv / "bin" / "xbuild"), *args],
            capture_output=True,
            text=True,
            cwd=work,
            env=env,
            timeout=600,
        )

    r = xbuild("doctor")
    assert r.returncode == 0, r.stdout
    r = xbuild(img.ref, "-o", str(work / "art"), "--json", "--no-verify")  # not about verify (Cmd is sh)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["guest"]["recipe"] == "busybox-httpd"  # recipes ship with the wheel
    assert manifest["kernel"]["fragments"] == list(DEFAULT_FRAGMENTS)
    r = xbuild("run", str(work / "art"), "--", "sh", "-c", "echo from the wheel; exit 3")
    assert r.returncode == 3, r.stderr
    assert "from the wheel" in r.stdout
