"""builder.run.qemu: command line, accelerator choice and KVM probe (fast); boots (slow).

Boots use Debian's cloud kernel (tests/test_init.py's `cloud_kernel`); the networking and power-button
tests need the trimmed kernel (IP_PNP, VIRTIO_NET, ACPI_BUTTON, INPUT_EVDEV): the newest one in the
kernel cache or $XBUILD_TRIMMED_KERNEL, else they are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from builder import kernel as kern
from builder.artifact import MANIFEST, Artifact, DiskInfo, open_artifact
from builder.cpio import pack
from builder.errors import ArtifactError, BadInput, RunError
from builder.flatten import flatten
from builder.guest import guest_config, install
from builder.init import init_binary
from builder.reference import parse
from builder.run import qemu
from builder.run.cmdline import SYNC_UNPACK
from builder.run.console import RunResult
from builder.run.qemu import NET_CMDLINE, Qemu, guest_cmdline, run
from builder.source import load
from tests.fixtures import images as fx
from tests.fixtures.artifacts import fake_artifact, manifest_for
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.test_init import (  # noqa: F401
    CMDLINE,
    PROBE_C,
    artifact_from,
    boot,
    cloud_kernel,
    make_artifact,
    probe_binary,
    probe_members,
    report,
)

slow = pytest.mark.slow


@pytest.fixture(scope="session")
def trimmed_kernel(default_kernel_path: Path) -> Path:
    override = os.environ.get("XBUILD_TRIMMED_KERNEL")
    return Path(override) if override else default_kernel_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ fast


def test_guest_cmdline() -> None:
    base = "console=ttyS0 quiet rdinit=/.xbuild/init"
    std = f"{base} panic=-1 no_timer_check"
    assert guest_cmdline(base) == std
    assert guest_cmdline("quiet") == "quiet console=ttyS0 rdinit=/.xbuild/init panic=-1 no_timer_check"
    got = guest_cmdline(base, network=True, kernel_args=["xbuild.env=A=b c"], extra_args=["x", "y z", ""])
    # a guest with a NIC unpacks its initramfs before the NIC probes (builder/memory.py, NIC_BYTES)
    assert got == f'{std} {SYNC_UNPACK} {NET_CMDLINE} "xbuild.env=A=b c" -- x "y z" ""'
    # the artifact's own `-- words` are kept, or replaced by extra_args; ip= always before `--`
    assert guest_cmdline(base + " -- a b", network=True) == f"{std} {SYNC_UNPACK} {NET_CMDLINE} -- a b"
    assert guest_cmdline(base + " -- a b", extra_args=["c"]).endswith(" -- c")
    with pytest.raises(BadInput, match="quotes"):
        guest_cmdline(base, extra_args=['say "hi"'])


def _command(guest: Qemu) -> list[str]:
    """The guest's QEMU command line; its temp directory (QMP socket, overlays) removed."""
    try:
        return guest.command()
    finally:
        guest.kill()


def test_qemu_command(tmp_path: Path) -> None:
    for name in ("bzImage", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "cmdline").write_text(CMDLINE)
    g = Qemu(tmp_path, ports=[(8080, 80), (2222, 22)], icount=True, memory_mb=300)
    cmd = g.command()
    assert cmd[0] == "qemu-system-x86_64" and "-no-reboot" in cmd
    assert cmd[cmd.index("-kernel") + 1] == str(tmp_path / "bzImage")
    assert cmd[cmd.index("-m") + 1] == "300" and cmd[cmd.index("-accel") + 1] == "tcg"
    assert cmd[cmd.index("-icount") + 1] == "shift=0,sleep=off"
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22" in cmd
    assert "virtio-net-pci,netdev=n0" in cmd
    assert NET_CMDLINE in cmd[cmd.index("-append") + 1]
    g.kill()
    plain = _command(Qemu(tmp_path))
    assert "-netdev" not in plain and "-icount" not in plain
    assert NET_CMDLINE not in plain[plain.index("-append") + 1]
    assert SYNC_UNPACK not in plain[plain.index("-append") + 1]  # no NIC: the kernel's asynchronous unpack


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no kernel"):
        Qemu(tmp_path)
    (tmp_path / "kernel").write_bytes(b"x")
    with pytest.raises(RunError, match="initrd"):
        Qemu(tmp_path)


def test_choose_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    k = Path("/k")
    monkeypatch.setattr(qemu, "kvm_works", lambda kernel: True)
    assert qemu.choose_accel("auto", k, False) == "kvm"
    assert qemu.choose_accel("auto", k, True) == "tcg"  # -icount is TCG only
    assert qemu.choose_accel("tcg", k, False) == "tcg"
    monkeypatch.setattr(qemu, "kvm_works", lambda kernel: False)
    assert qemu.choose_accel("auto", k, False) == "tcg"
    with pytest.raises(RunError):
        qemu.choose_accel("kvm", k, True)
    with pytest.raises(RunError):
        qemu.choose_accel("hvf", k, False)


def test_kvm_probe_is_cached(xbuild_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(qemu.os, "access", lambda p, m: True)
    monkeypatch.setattr(qemu, "_probe_kvm", lambda kernel: calls.append(kernel) or False)
    assert qemu.kvm_works(Path("/k")) is False
    assert qemu.kvm_works(Path("/k")) is False
    assert len(calls) == 1
    assert list((xbuild_cache / "probe").glob("kvm-*.json"))


# ------------------------------------------------------------------------------------------------ slow


@slow
def test_run_auto_accel_and_icount(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    """accel=auto probes KVM once (it hangs on this machine kind: TCG is chosen); -icount boots too."""
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["probe", "exit", "0"]}, probe_members(probe_binary)
    )
    t0 = time.monotonic()
    r = run(art, accel="auto", console=None, timeout=120)
    assert r.exit_status == 0
    first = time.monotonic() - t0
    r = run(art, accel="auto", icount=True, console=None, timeout=120)
    assert r.exit_status == 0 and r.boot_us
    sys.stderr.write(f"auto: {first:.1f}s (with the KVM probe on first use); icount marker {r.boot_us}us\n")


@slow
def test_console_is_streamed(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["probe", "exit", "2"]}, probe_members(probe_binary)
    )
    r_fd, w_fd = os.pipe()
    seen = bytearray()
    reader = threading.Thread(target=_drain, args=(r_fd, seen))
    reader.start()
    with os.fdopen(w_fd, "wb") as w:
        r = run(art, accel="tcg", console=w, timeout=120)
    reader.join(5)
    assert r.exit_status == 2
    assert bytes(seen) == r.console and b"xbuild: exit status 2" in seen


def _drain(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 4096):
        into.extend(chunk)
    os.close(fd)


def _runner_until_ready(code: str) -> tuple[subprocess.Popen[bytes], bytearray]:
    """A python process running `code` (a run() of a probe guest), once its guest printed `probe: ready`."""
    script = "import sys; from pathlib import Path; from builder.run.qemu import run\n" + code
    p = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    out = bytearray()
    assert p.stdout is not None
    os.set_blocking(p.stdout.fileno(), False)
    deadline = time.monotonic() + 120
    while b"probe: ready" not in out and time.monotonic() < deadline:
        time.sleep(0.1)
        out += p.stdout.read() or b""
    assert b"probe: ready" in out
    return p, out


@slow
def test_sigterm_to_the_runner_stops_the_guest(
    tmp_path: Path,
    cloud_kernel: Path,
    probe_binary: bytes,
) -> None:
    """SIGTERM to the process running `run()` → graceful stop → the program gets its StopSignal;
    no QEMU is left behind."""
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["probe", "wait-signal"]}, probe_members(probe_binary)
    )
    p, out = _runner_until_ready(
        f"r = run(Path({str(art)!r}), accel='tcg', timeout=120)\n"
        "print('RESULT', r.exit_status, r.error, file=sys.stderr)\n"
    )
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=60)
    out += rest
    assert b"probe: got signal 15" in out, (out, err)
    assert b"RESULT 3 None" in err
    ps = subprocess.run(["pgrep", "-f", str(art)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


@slow
def test_timeout_kills_a_hung_guest(tmp_path: Path, cloud_kernel: Path) -> None:
    """A guest that never reaches init and ignores the power button is killed. (Not by a panic: a panic
    before exec ends the run at once, tests/test_memory.py; here the kernel waits for a root device that
    never comes, `rootwait`.)"""
    (tmp_path / "initrd.img").write_bytes(b"\0" * 512)
    (tmp_path / "kernel").symlink_to(cloud_kernel)
    (tmp_path / "cmdline").write_text("console=ttyS0 quiet rdinit=/nothing root=/dev/xbuild-none rootwait")
    t0 = time.monotonic()
    r = run(tmp_path, accel="tcg", console=None, timeout=5, stop_grace=3)
    assert r.exit_status is None and r.error and "timed out" in r.error
    assert time.monotonic() - t0 < 30


@slow
def test_power_button_and_port_forwarding(tmp_path: Path, trimmed_kernel: Path, probe_binary: bytes) -> None:
    """Trimmed kernel: ip= networking, /etc/resolv.conf from /proc/net/pnp, hostfwd to busybox httpd,
    then a stop through the ACPI power button alone (no ctrl-alt-del: that kernel has no VT)."""
    port = free_port()
    img = fx.make_busybox_image(
        tmp_path / "layout",
        "bb",
        {
            "Cmd": [
                "sh",
                "-c",
                "cat /etc/resolv.conf; mkdir -p /www; echo hello-from-guest > /www/index.html;"
                " exec httpd -f -p 80 -h /www",
            ]
        },
    )
    art, _ = artifact_from(tmp_path, trimmed_kernel, img.ref, "web")
    guest = Qemu(art, ports=[(port, 80)], accel="tcg")
    body = b""
    with guest:
        deadline = time.monotonic() + 120
        while guest.pump(0.2) and time.monotonic() < deadline and not body:
            if guest.watcher.boot_us is None:
                continue
            with contextlib.suppress(OSError):
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
        guest.stop(power_button_only=True)
        r = guest.wait(timeout=60)
    assert body == b"hello-from-guest\n", r.console.decode(errors="replace")
    assert b"nameserver 10.0.2.3" in r.console
    # busybox httpd dies of SIGTERM (the default StopSignal) before the grace period ends
    assert r.signal == 15, r.console.decode(errors="replace")


@slow
def test_qemu_dies_with_a_killed_runner(
    tmp_path: Path,
    cloud_kernel: Path,
    probe_binary: bytes,
) -> None:
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["probe", "wait-signal"]}, probe_members(probe_binary)
    )
    p, _ = _runner_until_ready(f"run(Path({str(art)!r}), accel='tcg')\n")
    p.kill()
    p.wait()
    for _ in range(50):
        ps = subprocess.run(["pgrep", "-f", str(art)], capture_output=True, text=True)
        if not ps.stdout.strip():
            break
        time.sleep(0.1)
    assert ps.stdout.strip() == ""


# ------------------------------------------------------------------------------------------ root disks


def _disk_artifact(tmp_path: Path, fmt: str, mode: str) -> Artifact:
    art = tmp_path / f"{fmt}-{mode}"
    art.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(art / "disk.img"), "64M"], check=True)
    size = (art / "disk.img").stat().st_size
    disk = DiskInfo(format=fmt, mode=mode, size=64 << 20, file_size=size, sha256="0" * 64)
    return fake_artifact(art, kernel=b"x", initrd=b"x", disk=disk)


def _nodes(cmd: list[str]) -> list[dict]:
    return [json.loads(cmd[i + 1]) for i, a in enumerate(cmd) if a == "-blockdev"]


def test_the_artifacts_disk_is_attached_as_vda(tmp_path: Path) -> None:
    """An explicit driver, never a backing file followed; rw: a throwaway overlay, ro: read-only."""
    guest = Qemu.for_artifact(_disk_artifact(tmp_path, "raw", "rw"))
    rw = guest.command()
    image = tmp_path / "raw-rw" / "disk.img"
    base, overlay = _nodes(rw)
    assert base == {
        "node-name": "disk0",
        "driver": "raw",
        "read-only": True,
        "file": {"driver": "file", "filename": str(image), "read-only": True},
    }
    assert overlay["backing"] == "disk0" and overlay["driver"] == "qcow2"
    assert Path(overlay["file"]["filename"]).parent == Path(guest._tmp)
    assert rw[rw.index("-device") + 1] == "virtio-blk-pci,drive=disk0rw"
    assert "-drive" not in rw
    guest.kill()
    assert not Path(guest._tmp).exists()
    ro = _command(Qemu.for_artifact(_disk_artifact(tmp_path, "qcow2", "ro")))
    (node,) = _nodes(ro)
    assert node["driver"] == "qcow2" and node["backing"] is None and node["read-only"] is True
    assert ro[ro.index("-device") + 1] == "virtio-blk-pci,drive=disk0"
    odd = tmp_path / "a,b"
    odd.mkdir()
    (odd / "disk.img").write_bytes(b"")
    args = qemu.Disk(odd / "disk.img", readonly=True).qemu_args(1, tmp_path, serial="s")
    assert json.loads(args[1])["file"]["filename"] == f"{tmp_path}/a,b/disk.img"
    assert args[3].endswith(",drive=disk1,serial=s")
    with pytest.raises(RunError, match="disk format 'vmdk'"):
        qemu.Disk(odd / "disk.img", "vmdk").qemu_args(0, tmp_path)
    # a bare directory: no disk unless given
    for name in ("bzImage", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    assert "-blockdev" not in _command(Qemu(tmp_path))


def test_an_artifact_without_a_kernel_is_refused_by_every_runner(sandbox: Sandbox, tmp_path: Path) -> None:
    """`--kernel none` artifacts: `xbuild run` says so in one line (exit 2); so do the runners."""
    from builder.run import xen

    art = fake_artifact(tmp_path / "art", initrd=b"i", cmdline="console=ttyS0")
    r = sandbox.xbuild("run", str(art.path))
    assert_refused(r, 2, f"{art.path}: no kernel in the artifact (it was built with --kernel none)")
    for runner in (lambda: Qemu.for_artifact(art), lambda: xen.run_nested(art)):
        with pytest.raises(ArtifactError, match="no kernel in the artifact"):
            runner()


def test_run_without_qemu_leaves_no_temp_dir(sandbox: Sandbox, tmp_path: Path) -> None:
    """QEMU missing from PATH: `xbuild run DIR` exits with one line; the guest's temp dir is removed."""
    fake_artifact(tmp_path / "art", kernel=b"k", initrd=b"i", cmdline="console=ttyS0")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    r = sandbox.xbuild("run", str(tmp_path / "art"), env=sandbox.env(PATH=str(bindir)))
    assert_refused(
        r,
        1,
        "qemu-system-x86_64 not found (needed for run / --verify under QEMU): "
        "apt-get install qemu-system-x86",
    )
    assert sandbox.stale_temps() == []


# ------------------------------------------------------------------------------------------------ arm64


def _platform_artifact(directory: Path, platform: str, **files: bytes) -> Artifact:
    """fake_artifact's files and manifest, the manifest's source.platform set to `platform`."""
    fake_artifact(directory, cmdline="quiet rdinit=/.xbuild/init", **files)
    m = manifest_for(directory)
    m = dataclasses.replace(m, source=dataclasses.replace(m.source, platform=platform))
    (directory / MANIFEST).write_bytes(m.dump())
    return open_artifact(directory)


def test_arm64_guests_run_under_qemu_system_aarch64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One argv builder, the machine as data: virt, -cpu max (cheap pointer auth), PL011 console, no x86
    flags; virtio-pci net and disks as on amd64; TCG only (auto never picks KVM for it, even where KVM
    works)."""
    arm = Qemu.for_artifact(
        _platform_artifact(tmp_path / "art", "linux/arm64", kernel=b"k", initrd=b"i"), ports=[(8080, 80)]
    )
    cmd = _command(arm)
    assert cmd[:7] == ["qemu-system-aarch64", "-M", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on"]
    append = cmd[cmd.index("-append") + 1]
    assert append == f"quiet rdinit=/.xbuild/init console=ttyAMA0 panic=-1 {SYNC_UNPACK} {NET_CMDLINE}"
    assert "virtio-net-pci,netdev=n0" in cmd and "-no-reboot" in cmd
    amd = _command(
        Qemu.for_artifact(_platform_artifact(tmp_path / "amd", "linux/amd64", kernel=b"k", initrd=b"i"))
    )
    assert amd[:7] == ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-cpu", "max"]
    assert amd[amd.index("-append") + 1].split()[2:] == [
        "console=ttyS0",
        "panic=-1",
        "no_timer_check",
        "noapictimer",
    ]
    assert guest_cmdline("quiet", machine=qemu.MACHINES["linux/arm64"]) == (
        "quiet console=ttyAMA0 rdinit=/.xbuild/init panic=-1"
    )
    monkeypatch.setattr(qemu, "kvm_works", lambda kernel: True)
    assert qemu.choose_accel("auto", Path("/k"), False, "linux/arm64") == "tcg"
    assert qemu.choose_accel("auto", Path("/k"), False) == "kvm"
    with pytest.raises(RunError, match="KVM cannot run a linux/arm64 guest on this host"):
        Qemu(tmp_path / "art", platform="linux/arm64", accel="kvm")


def test_a_platform_xbuild_cannot_run_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    """`xbuild run` of a linux/s390x artifact: one line, exit 2, nothing started or left behind."""
    art = _platform_artifact(tmp_path / "art", "linux/s390x", kernel=b"k", initrd=b"i")
    before = sandbox.snapshot()
    r = sandbox.xbuild("run", str(art.path))
    assert_refused(
        r, 2, "cannot run a 'linux/s390x' guest: xbuild runs linux/amd64 and linux/arm64 guests under QEMU"
    )
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []


def _arm64_static(source: str, name: str, d: Path) -> bytes:
    """`source` compiled static for arm64 with Debian's cross compiler (gcc-aarch64-linux-gnu)."""
    (d / f"{name}.c").write_text(source)
    cmd = ["aarch64-linux-gnu-gcc", "-static", "-Os", "-s", "-o", str(d / name), str(d / f"{name}.c")]
    subprocess.run(cmd, check=True)
    return (d / name).read_bytes()


@slow
def test_an_arm64_guest_under_xbuild_run(sandbox: Sandbox, tmp_path: Path) -> None:
    """The arm64 kernel (built once, cached) + the cross-compiled init and a cross-compiled probe, hand-packed
    into a linux/arm64 artifact, under the real `xbuild run`: the entrypoint's argv, env (the image's, -e),
    user and groups as on amd64 (tests/test_init.py), its exit status is xbuild run's, and a stop reaches it
    as its StopSignal (the init watches every evdev device that sends KEY_POWER)."""
    image = kern.default_kernel(arch="arm64")
    fx.write_oci_image(
        tmp_path / "layout",
        "t",
        [probe_members(_arm64_static(PROBE_C, "probe", tmp_path))],
        {"Entrypoint": ["probe"], "Cmd": ["report"], "Env": ["FOO=bar", "PATH=/bin"], "User": "app"},
    )
    oci = load(parse(f"oci:{tmp_path / 'layout'}:t"))
    tree = flatten(oci).tree
    install(tree, guest_config(oci.config, tree, "arm"), init_binary(arch="arm64"))
    d = tmp_path / "art"
    d.mkdir()
    pack(tree, d / "initrd.img", "lz4")
    art = _platform_artifact(d, "linux/arm64", kernel=image.path.read_bytes())
    r = sandbox.xbuild("run", str(art.path), "-e", "X=y z", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = report(RunResult(0, None, None, None, None, r.stdout.encode()))
    assert seen["argv"] == ["probe", "report"]
    assert seen["env"] == {"PATH": "/bin", "HOSTNAME": "arm", "FOO": "bar", "X": "y z", "HOME": "/home/app"}
    assert (seen["uid"], seen["gid"], seen["groups"]) == (1000, 1000, [10, 50, 1000])
    assert "booted to exec in" in r.stderr
    r = sandbox.xbuild("run", str(art.path), "--", "exit", "7", timeout=600)
    assert r.returncode == 7, r.stdout + r.stderr
    # a stop (--timeout) reaches the program gracefully: QEMU virt's power button is a gpio-keys device
    r = sandbox.xbuild("run", str(art.path), "--timeout", "20", "--", "wait-signal", timeout=600)
    assert "probe: got signal 15" in r.stdout, r.stdout + r.stderr
