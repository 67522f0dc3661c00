"""The command line as a user and CI see it: default command, exit codes, --json, no partial artifacts,
and (slow) build + run of a real guest with its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from enum import StrEnum
from pathlib import Path

import click
import pytest

from builder import options
from builder.build import BuildOptions
from builder.cli import build_cmd
from builder.errors import BadInput
from builder.run_cli import run_cmd
from tests.fixtures.images import OciImage, make_busybox_image

XBUILD = [sys.executable, "-c", "from builder.cli import run; run()"]


def xbuild(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XBUILD, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_bare_image_means_build_and_json_is_the_manifest(
    busybox_image: OciImage, tmp_path: Path, xbuild_cache: Path
) -> None:
    out = tmp_path / "art"
    r = xbuild(busybox_image.ref, "-o", str(out), "--kernel", "none", "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    products = manifest.pop("products")  # the manifest, and where each product came from (buildcache)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert [(p["name"], p["origin"]) for p in products] == [("init", "built"), ("artifact", "built")]
    assert manifest["source"]["reference"] == busybox_image.ref
    assert manifest["guest"]["argv"] == ["sh"]
    assert sorted(p.name for p in out.iterdir()) == [
        "initrd.img",
        "manifest.json",
        "provenance.intoto.json",
        "sbom.cdx.json",
    ]
    assert r.stderr == ""  # --json: nothing but the JSON


@pytest.mark.parametrize(
    "args, message",
    [
        (["Not-An-Image"], "invalid image reference"),
        (["oci:/nonexistent/layout"], "not an OCI image layout"),
        (["--compression", "brotli", "oci:x"], "brotli"),
        (["build", "oci:{layout}:missing-tag"], "no image tagged 'missing-tag'"),
        (["build", "oci:{layout}", "--recipe", "no-such-recipe"], "no-such-recipe"),
        (["oci:{layout}", "--format", "disk", "--disk-size", "1M"], "--disk-size 1 MiB is too small"),
        (["oci:{layout}", "--format", "disk", "--disk-size", "lots"], "--disk-size 'lots'"),
        (["oci:{layout}", "--disk-mode", "ro"], "--disk-mode needs --format disk"),
        (["oci:{layout}", "--format", "squashfs"], "'squashfs' is not one of"),
        (["oci:{layout}", "--memory", "100000"], "100000 is not in the range 16<=x<=65536"),
        (
            ["oci:{layout}", "--platform", "linux/s390x"],
            "--platform linux/s390x: xbuild builds linux/amd64, linux/arm64 guests only",
        ),
        (["oci:{layout}", "--platform", "linux/arm64"], "image is for linux/amd64, not linux/arm64"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    args: list[str], message: str, busybox_image: OciImage, tmp_path: Path, xbuild_cache: Path
) -> None:
    out = tmp_path / "out"
    args = [a.format(layout=busybox_image.layout) for a in args]
    r = xbuild(*args, "-o", str(out), "--kernel", "none", "-q")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 or "Usage:" in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    "command, flag, members",
    [
        (build_cmd, "minimize", options.MinimizeMode),
        (build_cmd, "fmt", options.OutputFormat),
        (build_cmd, "disk_format", options.DiskFormat),
        (build_cmd, "disk_mode", options.DiskMode),
        (build_cmd, "xen_type", options.XenType),
        (build_cmd, "verify_on", options.VERIFY_HYPERVISORS),
        (run_cmd, "hypervisor", options.Hypervisor),
        (run_cmd, "accel", options.Accel),
        (run_cmd, "xen_type", options.XenType),
    ],
)
def test_every_choice_flag_offers_its_enum(
    command: click.Command, flag: str, members: type[StrEnum] | tuple[StrEnum, ...]
) -> None:
    """The CLI's choices are the option enums' values (builder/options.py), in order, and a default is one."""
    (param,) = [p for p in command.params if p.name == flag]
    assert isinstance(param.type, click.Choice)
    assert list(param.type.choices) == options.choices(members)
    assert not isinstance(param.default, str) or param.default in param.type.choices  # str: it has one


def test_memory_bounds_are_the_artifacts() -> None:
    """Both --memory flags take exactly what an artifact may hold (options.MEMORY_MB)."""
    for command in (build_cmd, run_cmd):
        (param,) = [p for p in command.params if p.name == "memory"]
        assert isinstance(param.type, click.IntRange)
        assert (param.type.min, param.type.max) == options.MEMORY_MB
    assert options.memory_outside(options.DEFAULT_MEMORY_MB) is None
    assert options.memory_outside(options.DISK_MEMORY_MB) is None
    assert options.memory_outside(15) == "15 MiB is outside 16..65536"


def test_build_options_hold_enum_members() -> None:
    """A library caller's strings become the enums' members; anything else is BadInput naming the flag."""
    o = BuildOptions(minimize="trace", format="disk", disk_format="qcow2", disk_mode="ro", xen_type="pv")
    assert (o.minimize, o.format, o.disk_format, o.disk_mode, o.xen_type) == (
        options.MinimizeMode.TRACE,
        options.OutputFormat.DISK,
        options.DiskFormat.QCOW2,
        options.DiskMode.RO,
        options.XenType.PV,
    )
    assert type(o.format) is options.OutputFormat
    for field, flag in (
        ("format", "--format"),
        ("disk_format", "--disk-format"),
        ("minimize", "--minimize"),
        ("disk_mode", "--disk-mode"),
        ("xen_type", "--xen-type"),
    ):
        with pytest.raises(BadInput, match=f"^{flag} vmdk: choose from "):
            BuildOptions(**{field: "vmdk"})


def test_user_that_cannot_be_resolved_fails_the_build(tmp_path: Path, xbuild_cache: Path) -> None:
    img = make_busybox_image(tmp_path / "oci", config_overrides={"User": "nobody-here"})
    r = xbuild(img.ref, "-o", str(tmp_path / "out"), "--kernel", "none")
    assert r.returncode == 2 and "nobody-here" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output(busybox_image: OciImage, tmp_path: Path, xbuild_cache: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = xbuild(busybox_image.ref, "-o", str(tmp_path / "file" / "out"), "--kernel", "none")
    assert r.returncode == 2 and "output" in r.stderr


def test_explain(busybox_image: OciImage, tmp_path: Path, xbuild_cache: Path) -> None:
    out = tmp_path / "art"
    assert xbuild(busybox_image.ref, "-o", str(out), "--kernel", "none", "-q").returncode == 0
    r = xbuild("explain", str(out), "/bin/busybox")
    assert r.returncode == 0 and "KEPT" in r.stdout


@pytest.mark.slow
def test_build_and_run_exit_status_and_args(tmp_path: Path, default_kernel_path: Path) -> None:
    """`xbuild IMAGE` pairs the kernel; `xbuild run DIR -- ARGS` boots it and exits with the status."""
    img = make_busybox_image(
        tmp_path / "oci",
        config_overrides={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hello from $HOSTNAME"]},
    )
    out = tmp_path / "art"
    r = xbuild(img.ref, "-o", str(out), "--kernel", str(default_kernel_path))
    assert r.returncode == 0, r.stderr
    assert {"kernel", "initrd.img", "cmdline", "xen.cfg", "manifest.json"} <= {p.name for p in out.iterdir()}
    cfg = (out / "xen.cfg").read_text()
    assert 'kernel = "kernel"' in cfg and 'ramdisk = "initrd.img"' in cfg and "rdinit=/.xbuild/init" in cfg
    r = xbuild("run", str(out), "--timeout", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hello from busybox" in r.stdout
    assert "booted to exec in" in r.stderr
    r = xbuild("run", str(out), "--timeout", "120", "--json", "--", "exit 7")
    assert r.returncode == 7, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["exit_status"] == 7 and report["boot_ms"] > 0
    r = xbuild(
        "run", str(out), "--timeout", "120", "-e", "GREETING=hi there", "--", "echo $GREETING; kill -9 $$"
    )
    assert r.returncode == 128 + 9 and "hi there" in r.stdout


@pytest.mark.slow
def test_trimmed_kernel_artifact_boots_on_nested_xen_pv_and_pvh(
    tmp_path: Path, default_kernel_path: Path
) -> None:
    """The same artifact (trimmed kernel + our init) runs as a Xen PV and a PVH guest on real Xen."""
    img = make_busybox_image(
        tmp_path / "oci", config_overrides={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo on xen; exit 5"]}
    )
    out = tmp_path / "art"
    assert xbuild(img.ref, "-o", str(out), "--kernel", str(default_kernel_path), "-q").returncode == 0
    for xen_type in ("pv", "pvh"):
        r = xbuild(
            "run",
            str(out),
            "--hypervisor",
            "xen-nested",
            "--xen-type",
            xen_type,
            "--timeout",
            "240",
            timeout=600,
        )
        assert r.returncode == 5, f"{xen_type}: {r.stdout}{r.stderr}"
        assert "on xen" in r.stdout and "xen-nested" in r.stderr


@pytest.mark.slow
def test_build_push_then_run_the_pushed_ref(tmp_path: Path, default_kernel_path: Path, registry) -> None:  # noqa: ANN001
    """CI's path: `xbuild IMAGE --push REF`, then on another machine `xbuild run REF` pulls and boots it."""
    img = make_busybox_image(
        tmp_path / "oci",
        config_overrides={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo pushed and pulled"]},
    )
    ref = f"{registry.host}/vms/busybox:1"
    r = xbuild(img.ref, "-o", str(tmp_path / "art"), "--kernel", str(default_kernel_path), "--push", ref)
    assert r.returncode == 0, r.stderr
    assert f"pushed {ref}@sha256:" in r.stderr
    r = xbuild("run", ref, "--timeout", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pulled the VM image" in r.stderr and "pushed and pulled" in r.stdout


def test_a_layout_whose_name_is_no_hostname_builds(tmp_path: Path, xbuild_cache: Path) -> None:
    """The default hostname is the image's short name made valid ('My Images~2' -> 'My-Images-2')."""
    img = make_busybox_image(tmp_path / "My Images~2")
    r = xbuild(f"oci:{img.layout}", "-o", str(tmp_path / "out"), "--kernel", "none", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["guest"]["hostname"] == "My-Images-2"


def test_a_bad_hostname_is_refused_before_the_image_is_read(tmp_path: Path, xbuild_cache: Path) -> None:
    r = xbuild(
        "oci:/nonexistent/layout", "--hostname", "a b;c", "-o", str(tmp_path / "out"), "--kernel", "none"
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "xbuild: error: --hostname 'a b;c': letters, digits, '_', '.' and '-', at most 63, starting with a "
        "letter or digit"
    ], r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_output_onto_a_mount_point_is_refused_before_the_build(
    busybox_image: OciImage, tmp_path: Path, xbuild_cache: Path
) -> None:
    """A volume mounted at -o cannot be renamed over: one line, exit 2, the volume untouched."""
    vol = tmp_path / "vol"
    vol.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(vol)], check=True)
    try:
        r = xbuild(busybox_image.ref, "-o", str(vol), "--kernel", "none")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "is a mount point" in r.stderr
        assert list(vol.iterdir()) == []
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", str(vol)], check=True)
