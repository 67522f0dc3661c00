"""Hostile VM images and `-o` onto user data, through the real CLI (issue 12, items 3 and 4).

An artifact is data, never code or paths: a tampered artifact directory (or one pulled from a registry)
is refused by `xbuild run`, `xbuild explain` and `xbuild push` alike with one line and exit 2 before any
tool (QEMU, xl) would start, nothing is written, and the host file it points at is neither read into the
guest nor changed. A pulled artifact is refused before anything is written to `-o`. The artifact's own
xen.cfg is never read: the runners' config is generated from the manifest. `-o` replaces only an earlier
artifact (or, with `--force`, a directory), never a file, the cwd or one of its ancestors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from builder import publish
from builder.artifact import (
    CMDLINE,
    DISK,
    INITRD,
    KERNEL,
    MANIFEST,
    PROVENANCE,
    SBOM,
    XEN_CFG,
    open_artifact,
    xen_config,
)
from builder.cache import file_sha256
from builder.errors import ArtifactError
from builder.run import xen
from tests.fixtures.hostile import XBUILD, Sandbox, assert_refused
from tests.fixtures.images import make_busybox_image
from tests.fixtures.registry import Registry

SECRET = b"host secret: must never reach a guest\n"
CMDLINE_TEXT = "console=ttyS0 quiet no_timer_check rdinit=/.xbuild/init"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(a good artifact directory built by the CLI with --kernel none, the OCI reference it came from)."""
    work = tmp_path_factory.mktemp("hostile-art")
    image = make_busybox_image(work / "oci")
    out = work / "art"
    r = subprocess.run(
        [*XBUILD, image.ref, "-o", str(out), "--kernel", "none", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), "XBUILD_CACHE": str(work / "cache")},
    )
    assert r.returncode == 0, r.stderr
    return out, image.ref


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}


@pytest.fixture
def host(sandbox: Sandbox) -> Path:
    """A host file the hostile artifacts point at."""
    d = sandbox.root / "host"
    d.mkdir()
    (d / "secret").write_bytes(SECRET)
    return d / "secret"


def _copy(template: tuple[Path, str], sandbox: Sandbox) -> Path:
    """The good artifact in the sandbox, with a stand-in kernel (so only validation stands between a
    hostile artifact and QEMU), its cmdline and its xen.cfg."""
    art = Path(shutil.copytree(template[0], sandbox.root / "work" / "art"))
    (art / KERNEL).write_bytes(b"\x7fELF not a kernel" * 256)
    (art / CMDLINE).write_text(CMDLINE_TEXT + "\n")
    (art / XEN_CFG).write_text(xen_config("busybox", CMDLINE_TEXT.replace("ttyS0", "hvc0"), 256))
    return art


def _edit(art: Path, change: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((art / MANIFEST).read_text())
    change(m)
    (art / MANIFEST).write_text(json.dumps(m))


def _disk_section(path: Path, fmt: str, virtual: int) -> dict[str, Any]:
    return {
        "file": DISK,
        "format": fmt,
        "mode": "rw",
        "size": virtual,
        "file_size": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def _qcow2_backed(art: Path, host: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(host), str(art / DISK), "1M"],
        check=True,
    )
    _edit(art, lambda m: m.update(disk=_disk_section(art / DISK, "qcow2", 1 << 20)))


def _qcow2_data_file(art: Path, host: Path) -> None:
    data = host.with_name("data.raw")
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"data_file={data},data_file_raw=on",
            str(art / DISK),
            "1M",
        ],
        check=True,
    )
    _edit(art, lambda m: m.update(disk=_disk_section(art / DISK, "qcow2", 1 << 20)))


def _symlinked(name: str) -> Callable[[Path, Path], None]:
    def tamper(art: Path, host: Path) -> None:
        (art / name).unlink()
        (art / name).symlink_to(host)

    return tamper


def _manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], None]:
    return lambda art, host: _edit(art, change)


def _disk_named(name: str) -> Callable[[Path, Path], None]:
    def tamper(art: Path, host: Path) -> None:
        (art / DISK).write_bytes(bytes(4096))
        _edit(art, lambda m: m.update(disk=dict(_disk_section(art / DISK, "raw", 4096), file=name)))

    return tamper


def _no_disk_size(art: Path, host: Path) -> None:
    (art / DISK).write_bytes(bytes(4096))
    section = _disk_section(art / DISK, "raw", 4096)
    del section["size"]
    _edit(art, lambda m: m.update(disk=section))


def _guest(**change: Any) -> Callable[[Path, Path], None]:
    return _manifest(lambda m: m["guest"].update(change))


def _cmdline(text: str) -> Callable[[Path, Path], None]:
    return lambda art, host: (art / CMDLINE).write_text(text)


def _extra_file(art: Path, host: Path) -> None:
    (art / "payload.sh").write_text("#!/bin/sh\ncat /etc/shadow\n")


def _initrd_named(name: str) -> Callable[[Path, Path], None]:
    return _manifest(lambda m: m["initrd"].update(file=name))


HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "qcow2 backing file": (_qcow2_backed, "backing file"),
    "qcow2 external data file": (_qcow2_data_file, "external data file"),
    "disk ../../etc/passwd": (_disk_named("../../etc/passwd"), "disk.file: '../../etc/passwd' is not"),
    "disk /etc/shadow": (_disk_named("/etc/shadow"), "disk.file: '/etc/shadow' is not"),
    "initrd ../x": (_initrd_named("../x"), "initrd.file: '../x' is not"),
    "symlinked initrd": (_symlinked(INITRD), "initrd.img is a symlink"),
    "symlinked kernel": (_symlinked(KERNEL), "kernel is a symlink"),
    "memory 10^9": (_guest(memory_mb=10**9), "guest.memory_mb: 1000000000 MiB is outside 16..65536"),
    "vcpus 4096": (_guest(vcpus=4096), "guest.vcpus: 4096 is outside 1..64"),
    "memory a string": (_guest(memory_mb="256"), "guest.memory_mb: expected int, not str"),
    "xen_type hvm": (_guest(xen_type="hvm"), "guest.xen_type: 'hvm' is not one of pvh, pv"),
    "hostname quotes": (_guest(hostname='x"; bootloader="/bin/sh'), "guest.hostname"),
    "hostname newline": (_guest(hostname="x\nbootloader=/bin/sh"), "guest.hostname"),
    "hostname semicolon": (_guest(hostname="x;reboot"), "guest.hostname"),
    "cmdline quote injection": (_cmdline('quiet" \nbootloader = "/bin/sh'), "cmdline: not one line"),
    "cmdline quoted word": (_cmdline('quiet init="/bin/sh -c id"'), "kernel argument 'init=\"/bin/sh'"),
    "disk without size": (_no_disk_size, "disk: no size"),
    "a file that is not an artifact file": (_extra_file, "'payload.sh' is not an artifact file"),
    "initrd size lies": (_manifest(lambda m: m["initrd"].update(size=1)), "initrd.img is"),
    "schema": (_manifest(lambda m: m.update(schema="other")), "not an xbuild artifact manifest"),
}
COMMANDS = {
    "run": ["run", "{art}", "--accel", "tcg", "--timeout", "5"],
    "explain": ["explain", "{art}", "/bin/sh"],
    "push": ["push", "{art}", "{registry}/hostile/x:t"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", HOSTILE)
def test_a_tampered_artifact_is_refused(
    case: str, command: str, template: tuple[Path, str], sandbox: Sandbox, host: Path, registry: Registry
) -> None:
    tamper, needle = HOSTILE[case]
    art = _copy(template, sandbox)
    tamper(art, host)
    before = sandbox.snapshot()
    args = [a.format(art=art, registry=registry.host) for a in COMMANDS[command]]
    r = sandbox.xbuild(*args, timeout=120)
    assert_refused(r, 2, needle)
    assert sandbox.changes(before) == []
    assert host.read_bytes() == SECRET
    if command == "push":
        assert httpx.get(f"{registry.url}/v2/hostile/x/tags/list").status_code == 404


def test_the_artifacts_xen_cfg_is_never_read(
    template: tuple[Path, str], sandbox: Sandbox, host: Path
) -> None:
    """A pulled xen.cfg naming a bootloader, a device model, vif scripts and host paths: accepted as
    data (it is only for a hand-run `xl create`), and the config both runners give xl is generated from the
    manifest, without any of it."""
    art = _copy(template, sandbox)
    (art / XEN_CFG).write_text(
        f'name = "x"\nkernel = "{host}"\nramdisk = "/etc/shadow"\n'
        'bootloader = "/bin/sh"\ndevice_model_override = "/bin/sh"\n'
        "vif = [ 'script=/tmp/evil.sh' ]\ndisk = [ 'target=/dev/sda' ]\n"
        'extra = "init=/bin/sh"\n'
    )
    opened = open_artifact(art)
    for rig, kernel in ((True, "/guest/kernel"), (False, str(art / KERNEL))):
        cfg = xen.guest_config(
            opened,
            name="busybox",
            kernel=kernel,
            ramdisk=kernel + ".initrd",
            xen_type="pv",
            memory_mb=opened.manifest.guest.memory_mb,
            rig=rig,
        )
        keys = [line.split(" = ")[0] for line in cfg.splitlines()]
        assert keys == [
            "name",
            "type",
            "kernel",
            "ramdisk",
            "extra",
            "memory",
            "maxmem",
            "vcpus",
            "on_poweroff",
            "on_reboot",
            "on_crash",
        ]
        for word in (
            "bootloader",
            "device_model",
            "script",
            "/etc/shadow",
            str(host),
            "/dev/sda",
            "init=/bin/sh",
        ):
            assert word not in cfg
        assert f'extra = "console=hvc0 {CMDLINE_TEXT.removeprefix("console=ttyS0 ")}"' in cfg
    # the nested rig gets only the artifact's validated kernel and initrd: a symlinked one never opens
    (art / INITRD).unlink()
    (art / INITRD).symlink_to(host)
    with pytest.raises(ArtifactError, match="initrd.img is a symlink"):
        xen.run_nested(open_artifact(art))


def test_a_raw_disk_never_has_its_format_probed(
    template: tuple[Path, str], sandbox: Sandbox, host: Path
) -> None:
    """A "raw" disk.img that is really a qcow2 naming a backing file: QEMU is told the format (raw) and
    `backing: null`, so the host file stays out of reach (the guest sees the qcow2 bytes as a raw disk)."""
    from builder.run.qemu import Qemu

    art = _copy(template, sandbox)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(host), str(art / DISK), "1M"],
        check=True,
    )
    _edit(art, lambda m: m.update(disk=_disk_section(art / DISK, "raw", 1 << 20)))
    guest = Qemu.for_artifact(open_artifact(art))
    try:
        cmd = guest.command()
        nodes = [json.loads(cmd[i + 1]) for i, a in enumerate(cmd) if a == "-blockdev"]
        assert nodes[0]["driver"] == "raw" and nodes[0]["file"]["driver"] == "file"
        assert all(n.get("backing") in (None, "disk0") for n in nodes) and str(host) not in " ".join(cmd)
        assert "-drive" not in cmd
        # and QEMU itself agrees: it opens the nodes and names no backing file of the image
        info = subprocess.run(
            [
                "qemu-img",
                "info",
                "--output=json",
                "--image-opts",
                f"driver=raw,file.driver=file,file.filename={art / DISK}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "backing" not in json.loads(info.stdout)
    finally:
        guest.kill()


# ---- pulled from a registry ----------------------------------------------------------------------------


def _blob(registry: Registry, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.post(f"{registry.url}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    url = httpx.URL(registry.url).join(r.headers["Location"]).copy_merge_params({"digest": digest})
    r = httpx.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return digest


def _put_vm(registry: Registry, repo: str, config: bytes, files: dict[str, tuple[bytes, str]]) -> str:
    """A VM artifact as a lying pusher would make it: any config, any layers; its reference."""
    layers = [
        {
            "mediaType": media_type,
            "digest": _blob(registry, repo, data),
            "size": len(data),
            "annotations": {publish.TITLE: title},
        }
        for title, (data, media_type) in files.items()
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": publish.OCI_MANIFEST,
        "artifactType": publish.VM_ARTIFACT,
        "config": {
            "mediaType": publish.VM_CONFIG,
            "digest": _blob(registry, repo, config),
            "size": len(config),
        },
        "layers": layers,
    }
    registry.put_manifest(repo, "t", doc, publish.OCI_MANIFEST)
    return f"{registry.host}/{repo}:t"


def _pulled_case(case: str, art: Path, host: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest.json, files) of a hostile pulled artifact."""
    m = json.loads((art / MANIFEST).read_text())
    files = {name: (art / name).read_bytes() for name in (INITRD, KERNEL, CMDLINE, PROVENANCE, SBOM)}
    if case == "disk ../x":
        files[DISK] = bytes(4096)
        m["disk"] = {
            "file": "../x",
            "format": "raw",
            "mode": "rw",
            "size": 4096,
            "file_size": 4096,
            "sha256": hashlib.sha256(bytes(4096)).hexdigest(),
        }
    elif case == "disk without size":
        files[DISK] = bytes(4096)
        m["disk"] = {
            "file": DISK,
            "format": "raw",
            "mode": "rw",
            "file_size": 4096,
            "sha256": hashlib.sha256(bytes(4096)).hexdigest(),
        }
    elif case == "memory 10^9":
        m["guest"]["memory_mb"] = 10**9
    elif case == "a layer named evil.sh":
        files["evil.sh"] = b"#!/bin/sh\n"
    elif case == "qcow2 backing file":
        _qcow2_backed(art, host)
        files[DISK] = (art / DISK).read_bytes()
        m = json.loads((art / MANIFEST).read_text())
    return m, files


PULLED = {
    "disk ../x": "disk.file: '../x' is not",
    "disk without size": "disk: no size",
    "memory 10^9": "guest.memory_mb: 1000000000 MiB",
    "a layer named evil.sh": "'evil.sh' is not an artifact",
    "qcow2 backing file": "backing file",
}


@pytest.mark.parametrize("command", ["pull", "run"])
@pytest.mark.parametrize("case", PULLED)
def test_a_hostile_pulled_artifact_is_refused_before_anything_is_written(
    case: str, command: str, template: tuple[Path, str], sandbox: Sandbox, host: Path, registry: Registry
) -> None:
    art = _copy(template, sandbox)
    manifest, files = _pulled_case(case, art, host)
    repo = f"hostile/{case.replace(' ', '-').replace('^', '').replace('.', '').replace('/', '')}-{command}"
    ref = _put_vm(
        registry,
        repo,
        json.dumps(manifest).encode(),
        {name: (data, publish.VM_OTHER_FILE) for name, data in files.items()},
    )
    shutil.rmtree(art)
    before = sandbox.snapshot()
    r = sandbox.xbuild(
        *(["pull", ref, "-o", str(sandbox.out)] if command == "pull" else ["run", ref, "--accel", "tcg"]),
        timeout=120,
    )
    assert_refused(r, 2, PULLED[case])
    assert sandbox.changes(before) == [] and not sandbox.out.exists()
    assert not any((sandbox.cache / "pulled").glob("*")) if (sandbox.cache / "pulled").exists() else True
    assert sandbox.stale_temps() == []
    assert host.read_bytes() == SECRET


def test_a_good_artifact_still_pushes_and_pulls(
    template: tuple[Path, str], sandbox: Sandbox, registry: Registry
) -> None:
    art = _copy(template, sandbox)
    r = sandbox.xbuild("push", str(art), f"{registry.host}/hostile/good:v1", "-q")
    assert r.returncode == 0, r.stderr
    r = sandbox.xbuild("pull", f"{registry.host}/hostile/good:v1", "-o", str(sandbox.out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in sandbox.out.iterdir()) == sorted(p.name for p in art.iterdir())
    assert open_artifact(sandbox.out).manifest == open_artifact(art).manifest


# ---- -o onto user data ----------------------------------------------------------------------------------


def _build(sandbox: Sandbox, ref: str, out: str, *extra: str, cwd: Path | None = None):
    return sandbox.xbuild(ref, "-o", out, "--kernel", "none", "-q", *extra, cwd=cwd)


@pytest.mark.parametrize("how", ["build", "pull"])
def test_o_onto_a_users_directory_is_refused(
    how: str, template: tuple[Path, str], sandbox: Sandbox, registry: Registry
) -> None:
    user = sandbox.root / "work" / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    (user / MANIFEST).write_text("{}")  # even a manifest.json of its own does not make it an artifact
    ref = _source(how, template, sandbox, registry)
    before = sandbox.snapshot()
    r = _build(sandbox, ref, str(user)) if how == "build" else sandbox.xbuild("pull", ref, "-o", str(user))
    assert_refused(r, 2, "not an xbuild artifact (it holds holiday.jpg)", "--force")
    assert sandbox.changes(before) == [] and (user / "holiday.jpg").read_bytes() == b"precious"
    assert sandbox.stale_temps() == []
    # --force is the user's word: the directory is replaced by the artifact
    r = (
        _build(sandbox, ref, str(user), "--force")
        if how == "build"
        else sandbox.xbuild("pull", ref, "-o", str(user), "--force")
    )
    assert r.returncode == 0, r.stderr
    assert not (user / "holiday.jpg").exists() and open_artifact(user)


@pytest.mark.parametrize("how", ["build", "pull"])
def test_o_onto_a_file_is_refused_even_forced(
    how: str, template: tuple[Path, str], sandbox: Sandbox, registry: Registry
) -> None:
    f = sandbox.root / "work" / "notes.txt"
    f.write_text("my notes\n")
    ref = _source(how, template, sandbox, registry)
    before = sandbox.snapshot()
    for force in ((), ("--force",)):
        r = (
            _build(sandbox, ref, str(f), *force)
            if how == "build"
            else sandbox.xbuild("pull", ref, "-o", str(f), *force)
        )
        assert_refused(r, 2, f"-o {f}: is a file, not an artifact directory")
    assert sandbox.changes(before) == [] and f.read_text() == "my notes\n"


@pytest.mark.parametrize("how", ["build", "pull"])
@pytest.mark.parametrize("target", [".", "..", "~", "/", "cwd"])
def test_o_onto_the_cwd_an_ancestor_home_or_root_is_refused(
    how: str, target: str, template: tuple[Path, str], sandbox: Sandbox, registry: Registry
) -> None:
    cwd = sandbox.root / "work" / "project"
    cwd.mkdir()
    (cwd / "main.c").write_text("int main(void) { return 0; }\n")
    out = {"~": str(sandbox.home), "cwd": str(cwd)}.get(target, target)
    ref = _source(how, template, sandbox, registry)
    before = sandbox.snapshot()
    r = (
        _build(sandbox, ref, out, "--force", cwd=cwd)
        if how == "build"
        else sandbox.xbuild("pull", ref, "-o", out, "--force", cwd=cwd)
    )
    assert_refused(r, 2, f"-o {out}: refusing to replace")
    assert sandbox.changes(before) == []
    assert sandbox.stale_temps() == []


@pytest.mark.parametrize("how", ["build", "pull"])
def test_o_onto_an_earlier_artifact_replaces_it(
    how: str, template: tuple[Path, str], sandbox: Sandbox, registry: Registry
) -> None:
    ref = _source(how, template, sandbox, registry)
    out = sandbox.out
    shutil.copytree(template[0], out)
    (out / MANIFEST).write_text(
        (out / MANIFEST).read_text().replace('"hostname": "busybox"', '"hostname": "old"')
    )
    r = _build(sandbox, ref, str(out)) if how == "build" else sandbox.xbuild("pull", ref, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert open_artifact(out).manifest.guest.hostname == "busybox"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no debris beside it
    assert sandbox.stale_temps() == []


def _source(how: str, template: tuple[Path, str], sandbox: Sandbox, registry: Registry) -> str:
    """What the -o cases build (the OCI layout) or pull (the template, pushed once per module)."""
    if how == "build":
        return template[1]
    ref = f"{registry.host}/hostile/o:v1"
    if (
        httpx.get(
            f"{registry.url}/v2/hostile/o/manifests/v1", headers={"Accept": publish.OCI_MANIFEST}
        ).status_code
        != 200
    ):
        r = sandbox.xbuild("push", str(template[0]), ref, "-q")
        assert r.returncode == 0, r.stderr
    return ref
