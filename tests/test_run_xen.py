"""builder.run.xen: the xl config rewrite, and boots under the nested Xen rig (slow: ~15-50 s each).

The guest is Debian's cloud kernel with a tiny static /init that speaks the init's marker protocol:
`hang` makes it wait for SIGTERM (exit status 143), `ignore` makes it ignore SIGTERM. It doubles as
/sbin/poweroff, which the kernel runs on `xl shutdown`, to send SIGTERM to PID 1.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from builder.artifact import Artifact, open_artifact
from builder.cache import cache_dir
from builder.errors import BadInput, RunError
from builder.run import xen
from builder.run.console import RunResult
from builder.run.rig import Rig, ensure_rig
from builder.run.warm import WarmRig
from tests.fixtures.artifacts import fake_artifact

GUEST_INIT = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

static void finish(int status) {
    printf("xbuild: exit status %d\n", status);
    fflush(stdout);
    reboot(RB_POWER_OFF);
    _exit(0);
}

static void on_term(int sig) { finish(128 + sig); }

int main(int argc, char **argv) {
    if (strstr(argv[0], "poweroff")) return kill(1, SIGTERM) ? 1 : 0;
    char buf[4096];
    mount("proc", "/proc", "proc", 0, 0);
    int fd = open("/proc/cmdline", O_RDONLY);
    ssize_t n = fd < 0 ? 0 : read(fd, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("cmdline: %s", buf);
    for (int i = 1; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    printf("xbuild: exec /bin/true at %lldus\n", (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000);
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "hang") == 0) signal(SIGTERM, on_term);
    if (argc > 1 && strcmp(argv[1], "ignore") == 0) signal(SIGTERM, SIG_IGN);
    while (argc > 1 && (strcmp(argv[1], "hang") == 0 || strcmp(argv[1], "ignore") == 0)) pause();
    finish(7);
}
"""

# ---- no boot -------------------------------------------------------------------------------------------


def _xl_entries(text: str) -> dict[str, str]:
    """`key = value` lines of a generated xl config (one per line: that is how xen_config writes them)."""
    return dict(line.split(" = ", 1) for line in text.splitlines())


def test_guest_config_for_the_rig(tmp_path: Path) -> None:
    art = _fake_artifact(tmp_path)
    text = xen.guest_config(
        art,
        name="xbuild",
        kernel="/guest/kernel",
        ramdisk="/guest/initrd.img",
        xen_type="pvh",
        memory_mb=256,
        extra_args=["a"],
        rig=True,
    )
    cfg = _xl_entries(text)
    assert "vif" not in cfg and "disk" not in cfg
    assert cfg == {
        "name": '"xbuild"',
        "type": '"pvh"',
        "kernel": '"/guest/kernel"',
        "ramdisk": '"/guest/initrd.img"',
        "extra": '"console=hvc0 quiet panic=-1 -- a"',
        "memory": "256",
        "maxmem": "256",
        "vcpus": "1",
        "on_poweroff": '"destroy"',
        "on_reboot": '"destroy"',
        "on_crash": '"destroy"',
        "tsc_mode": '"native"',
    }
    networked = _xl_entries(
        xen.guest_config(
            art,
            name="xbuild",
            kernel="/k",
            ramdisk="/r",
            xen_type="pv",
            memory_mb=128,
            network=True,
            rig=True,
        )
    )
    assert networked["vif"] == "[ 'ip=10.0.3.2,script=/etc/xen/scripts/vif-xbuild' ]"
    assert networked["extra"].endswith(' ip=10.0.3.2::10.0.3.1:255.255.255.0::eth0:off"')


def test_bad_artifact_and_options(tmp_path: Path) -> None:
    art = _fake_artifact(tmp_path)
    with pytest.raises(BadInput, match="xen type must be pvh or pv"):
        xen.run_nested(art, xen_type="hvm")


@pytest.mark.skipif(Path("/proc/xen/capabilities").exists(), reason="this host is a Xen domain")
def test_run_xl_needs_a_dom0(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"not a Xen dom0 \(no /proc/xen/capabilities with control_d\)"):
        xen.run_xl(_fake_artifact(tmp_path))


def _fake_artifact(tmp_path: Path) -> Artifact:
    return fake_artifact(tmp_path / "art", kernel=b"k", initrd=b"i", cmdline="console=hvc0 quiet panic=-1")


# ---- boots ---------------------------------------------------------------------------------------------

needs_rig = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "cpio"))
    or not Path("/bin/busybox").exists()
    or not (shutil.which("musl-gcc") or shutil.which("gcc")),
    reason="needs qemu-system-x86_64, apt-get, dpkg-deb, cpio, a static /bin/busybox and a C compiler",
)


@pytest.fixture(scope="session")
def rig() -> Rig:
    return ensure_rig()


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """kernel (Debian's cloud kernel), initrd.img (the test init), cmdline, manifest.json."""
    work = tmp_path_factory.mktemp("guest")
    (work / "init.c").write_text(GUEST_INIT)
    cc = shutil.which("musl-gcc") or "gcc"
    root = work / "root"
    (root / "proc").mkdir(parents=True)
    (root / "sbin").mkdir()
    subprocess.run([cc, "-static", "-Os", "-o", root / "init", work / "init.c"], check=True)
    (root / "sbin" / "poweroff").symlink_to("../init")
    art = work / "art"
    art.mkdir()
    _cpio(root, art / "initrd.img")
    shutil.copy(_cloud_kernel(), art / "kernel")
    return fake_artifact(art, cmdline="console=hvc0 quiet panic=-1")


def _cloud_kernel() -> Path:
    """Debian's cloud kernel bzImage (and its xen-netfront.ko beside it), downloaded once into the cache."""
    kernel = cache_dir("test", "cloud-kernel") / "vmlinuz"
    if kernel.exists() and kernel.with_name("xen-netfront.ko").exists():
        return kernel
    deps = subprocess.run(
        ["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True, check=True
    ).stdout
    pkg = re.findall(r"Depends: (linux-image-\S+)", deps)[0]
    with tempfile.TemporaryDirectory(dir=kernel.parent) as tmp:
        subprocess.run(["apt-get", "download", "-q", pkg], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            for m in t.getmembers():
                name = "vmlinuz" if re.fullmatch(r"\./boot/vmlinuz-.*", m.name) else Path(m.name).name
                if name in ("vmlinuz", "xen-netfront.ko"):
                    (Path(tmp) / name).write_bytes(t.extractfile(m).read())  # type: ignore[union-attr]
        os.replace(Path(tmp) / "xen-netfront.ko", kernel.with_name("xen-netfront.ko"))
        os.replace(Path(tmp) / "vmlinuz", kernel)
    return kernel


def _cpio(root: Path, out: Path) -> None:
    names = "\n".join(["."] + sorted(str(p.relative_to(root)) for p in root.rglob("*")))
    with open(out, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names.encode(), stdout=f, check=True
        )


NET_INIT = """#!/bin/busybox sh
# a web server guest: the cloud kernel has no ip= autoconfig, so take the address from the runner's ip=
/bin/busybox mount -t proc proc /proc
/bin/busybox insmod /xen-netfront.ko
for w in $(/bin/busybox cat /proc/cmdline); do case $w in ip=*) a=${w#ip=}; addr=${a%%:*};; esac; done
/bin/busybox ip link set lo up
/bin/busybox ip addr add "$addr/24" dev eth0
/bin/busybox ip link set eth0 up
echo "xbuild: exec /bin/busybox at 0us"
exec /bin/busybox httpd -f -p 80 -h /www
"""
POWEROFF = """#!/bin/busybox sh
echo "xbuild: exit status 0" > /dev/console  # the kernel runs this helper without stdio
/bin/busybox poweroff -f
"""


@pytest.fixture(scope="session")
def net_artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """A guest serving /www on port 80 (busybox httpd); `xl shutdown` makes it report exit status 0."""
    work = tmp_path_factory.mktemp("netguest")
    root = work / "root"
    for d in ("bin", "sbin", "proc", "www"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    shutil.copy(_cloud_kernel().with_name("xen-netfront.ko"), root / "xen-netfront.ko")
    (root / "www" / "index.html").write_text("hello from the nested guest\n")
    for path, text in (("init", NET_INIT), ("sbin/poweroff", POWEROFF)):
        (root / path).write_text(text)
        (root / path).chmod(0o755)
    art = work / "art"
    art.mkdir()
    _cpio(root, art / "initrd.img")
    shutil.copy(_cloud_kernel(), art / "kernel")
    return fake_artifact(art, cmdline="console=hvc0 quiet panic=-1")


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runner's temp dir goes under tmp_path, so its processes are recognisable by their arguments."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of other processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args and cmdline.parent.name != str(os.getpid()):
            found.append(args)
    return found


@pytest.mark.slow
@needs_rig
def test_rig_is_cached(rig: Rig) -> None:
    stamp = (rig.xen.parent / "rig.json").stat().st_mtime_ns
    t0 = time.monotonic()
    assert ensure_rig() == rig
    assert time.monotonic() - t0 < 5
    assert (rig.xen.parent / "rig.json").stat().st_mtime_ns == stamp
    assert rig.dom0_kernel.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.slow
@needs_rig
def test_pv_boot_streams_only_the_guest(warm_rig: WarmRig, artifact: Artifact, own_tmp: Path) -> None:
    out = io.BytesIO()
    result = xen.run_nested(artifact, "pv", timeout=240, extra_args=["first", "two words"], console=out)
    assert result.exit_status == 7
    assert result.boot_us and result.launch_to_exec_s and result.launch_to_exec_s > result.boot_us / 1e6
    stream = out.getvalue()
    assert b'cmdline: console=hvc0 quiet panic=-1 -- first "two words"' in stream
    assert b"argv[1]=first" in stream and b"argv[2]=two words" in stream
    for noise in (b"(XEN)", b"xenrig:", b"Parsing config", b"Linux version"):
        assert noise not in stream
    assert stream == result.console
    assert not _processes_mentioning(str(own_tmp))
    assert not list(own_tmp.iterdir())  # nothing kept on success


@pytest.mark.slow
@needs_rig
def test_pvh_boot(warm_rig: WarmRig, artifact: Artifact, own_tmp: Path) -> None:
    result = xen.run_nested(artifact, "pvh", timeout=240, console=io.BytesIO())
    assert result.exit_status == 7
    assert result.boot_us is not None
    assert not _processes_mentioning(str(own_tmp))


@pytest.mark.slow
@needs_rig
def test_bad_kernel_fails_with_dom0s_reason(warm_rig: WarmRig, artifact: Artifact, own_tmp: Path) -> None:
    bad = own_tmp / "bad"
    shutil.copytree(artifact.path, bad)
    (bad / "kernel").write_bytes(b"not a kernel" * 1000)
    with pytest.raises(
        RunError, match=r"could not be created or printed nothing \(xl exited 3\) \(dom0: "
    ) as e:
        xen.run_nested(open_artifact(bad), "pv", timeout=240, console=io.BytesIO())
    assert "log: " not in str(e.value)  # the warm rig's log is its own, named by `xbuild rig status`
    assert "Invalid kernel" in str(e.value), e.value  # xl's own error line, from dom0
    assert not _processes_mentioning(str(own_tmp))
    assert [p.name for p in own_tmp.iterdir()] == ["bad"]  # the test's own copy; nothing of the run


@pytest.mark.slow
@needs_rig
def test_timeout_shuts_the_guest_down_gracefully(
    warm_rig: WarmRig, artifact: Artifact, own_tmp: Path
) -> None:
    t0 = time.monotonic()
    result = xen.run_nested(artifact, "pv", timeout=45, extra_args=["hang"], console=io.BytesIO())
    assert result.boot_us is not None  # the timeout came after the guest started, even on a loaded host
    assert result.exit_status == 143 and result.signal is None  # the init's own SIGTERM handler
    assert result.error == "timed out after 45s"
    assert time.monotonic() - t0 < 45 + xen.GRACE_S + xen.EXIT_WAIT_S
    assert not _processes_mentioning(str(own_tmp))


RUNNER = """
import sys
from pathlib import Path
from builder.artifact import open_artifact
from builder.run.xen import run_nested
r = run_nested(open_artifact(Path(sys.argv[1])), "pv", extra_args=[sys.argv[2]])
print(f"RESULT {r.exit_status} {r.error}", flush=True)
"""


@pytest.mark.slow
@needs_rig
@pytest.mark.parametrize(("sig", "guest"), [(signal.SIGTERM, "ignore"), (signal.SIGINT, "hang")])
def test_signals_stop_the_guest_and_leave_nothing(
    warm_rig: WarmRig, artifact: Artifact, tmp_path: Path, sig: signal.Signals, guest: str
) -> None:
    """SIGTERM: stop, return the result. Ctrl-C: stop, re-raise. A guest ignoring the stop is destroyed.
    (In the warm rig, as every run is when one is up: $XBUILD_RIG reaches the runner.)"""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(artifact.path), guest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    seen = b""
    while b"xbuild: exec" not in seen:
        line = proc.stdout.readline()
        assert line, f"runner ended early: {proc.stderr.read() if proc.stderr else b''!r}"
        seen += line
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=xen.GRACE_S + xen.EXIT_WAIT_S + 30)
    assert time.monotonic() - t0 < xen.GRACE_S + xen.EXIT_WAIT_S + 15
    assert not _processes_mentioning(str(tmp_path))
    if sig == signal.SIGTERM:
        assert proc.returncode == 0
        log = warm_rig.dir / "console.log"
        assert f"RESULT None no exit status (Xen and dom0 log: {log})".encode() in out
        assert re.search(rb"xenrig: xbuild-\S+ destroyed after 10 s", log.read_bytes())
        assert not list(tmp_path.iterdir())
    else:
        assert b"KeyboardInterrupt" in err
        assert b"xbuild: exit status 143" in out  # the init got its SIGTERM


@pytest.mark.slow
@needs_rig
def test_qemu_dies_with_a_killed_runner(rig: Rig, artifact: Artifact, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from builder.run.xen import run_nested; "
        "from builder.artifact import open_artifact; run_nested(open_artifact(Path(sys.argv[1])), 'pv')"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(artifact.path)], stdout=subprocess.DEVNULL, env=env
    )
    try:
        _wait_for(lambda: any("qemu-system" in p for p in _processes_mentioning(str(tmp_path))), 60)
    finally:
        proc.kill()  # no chance to clean up: PR_SET_PDEATHSIG must take QEMU down
        proc.wait()
    _wait_for(lambda: not _processes_mentioning(str(tmp_path)), 10)


def _wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.mark.slow
@needs_rig
def test_port_forwarding_reaches_the_guest(warm_rig: WarmRig, net_artifact: Artifact, own_tmp: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = xen.run_nested(
                net_artifact, "pv", timeout=240, ports=[(port, 80)], console=io.BytesIO(), stop_event=stop
            )
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    body = b""
    try:
        while runner.is_alive() and not body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            except OSError:
                time.sleep(1)
    finally:
        stop.set()
        runner.join()
    assert body == b"hello from the nested guest\n", outcome
    result = outcome["result"]
    assert isinstance(result, RunResult) and result.exit_status == 0  # stopped through /sbin/poweroff
    assert not _processes_mentioning(str(own_tmp))


@pytest.mark.slow
@needs_rig
@pytest.mark.parametrize(("fmt", "mode", "xen_type"), [("qcow2", "rw", "pv"), ("raw", "ro", "pvh")])
def test_disk_guest_on_nested_xen(
    fmt: str,
    mode: str,
    xen_type: Literal["pv", "pvh"],
    rig: Rig,
    tmp_path: Path,
    own_tmp: Path,
    default_kernel_path: Path,
) -> None:
    """`xbuild IMAGE --format disk` on the rig: the disk goes to the outer QEMU (qcow2 opened there), dom0
    serves it with blkback, the guest mounts /dev/xvda. rw: the write works and is thrown away; ro: EROFS.
    The artifact's disk.img is unchanged."""
    from builder.build import BuildOptions, build
    from builder.cache import file_sha256
    from tests.fixtures.images import check_disk_probe, make_disk_probe_image

    image = make_disk_probe_image(tmp_path / "oci")
    opts = BuildOptions(
        output=tmp_path / "art",
        format="disk",
        disk_format=fmt,
        disk_mode=mode,
        xen_type=xen_type,
        log=lambda _m: None,
    )
    art = build(image.ref, opts)
    assert art.manifest.disk is not None
    digest = art.manifest.disk.sha256
    t0 = time.monotonic()
    result = xen.run_nested(art, xen_type, timeout=240, console=io.BytesIO())
    sys.stderr.write(
        f"nested {xen_type} {fmt} {mode}: {time.monotonic() - t0:.1f}s wall, "
        f"launch to exec {result.launch_to_exec_s}s\n"
    )
    assert result.exit_status == 0, result.console
    check_disk_probe(result.console, "/dev/xvda", mode)
    assert file_sha256(art.path / "disk.img") == digest
    assert not _processes_mentioning(str(own_tmp))


def test_run_xl_domain_names_are_unique_and_never_a_domid(tmp_path: Path) -> None:
    """Each run names its own domain (xl shutdown/destroy never reach another guest); never all digits."""
    names = {xen.domain_name("3") for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(rf"xbuild-3-{os.getpid()}-[0-9a-f]{{8}}", n) for n in names)
    long = xen.domain_name("h" * 63)
    assert long.startswith("xbuild-" + "h" * 32 + "-") and len(long) <= 7 + 32 + 1 + 10 + 1 + 8
    cfg = _xl_entries(
        xen.guest_config(
            _fake_artifact(tmp_path), name=long, kernel="/k", ramdisk="/r", xen_type="pv", memory_mb=128
        )
    )
    assert cfg["name"] == f'"{long}"'


# ---- the warm rig (builder/run/warm.py) ----------------------------------------------------------------


@pytest.mark.slow
@needs_rig
def test_warm_rig_runs_two_clients_at_once(warm_rig: WarmRig, artifact: Artifact, own_tmp: Path) -> None:
    """Two runs at once in the one rig: each its own domain, address and console, each its own status."""
    results: dict[str, RunResult | BaseException] = {}

    def run(word: str, xen_type: str) -> None:
        try:
            results[word] = xen.run_nested(
                artifact, xen_type, timeout=600, extra_args=[word], console=io.BytesIO()
            )
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[word] = e

    runners = [threading.Thread(target=run, args=a) for a in (("alpha", "pv"), ("beta", "pvh"))]
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    for word, other in (("alpha", "beta"), ("beta", "alpha")):
        r = results[word]
        assert isinstance(r, RunResult) and r.exit_status == 7, r
        assert f"argv[1]={word}".encode() in r.console and other.encode() not in r.console
    assert not _processes_mentioning(str(warm_rig.share / "jobs"))  # the console tails are gone


@pytest.mark.slow
@needs_rig
def test_warm_rig_destroys_a_killed_clients_guest(
    warm_rig: WarmRig, artifact: Artifact, tmp_path: Path
) -> None:
    """A client killed outright (no cleanup) takes its console tail down (PR_SET_PDEATHSIG); its lease stops
    and dom0 destroys the guest (the warm_rig fixture then finds no domain left)."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(artifact.path), "hang"], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    seen = b""
    while b"xbuild: exec" not in seen:
        line = proc.stdout.readline()
        assert line, "runner ended early"
        seen += line
    assert len(warm_rig_guests()) == 1
    proc.kill()
    proc.wait()
    _wait_for(lambda: not _processes_mentioning(str(warm_rig.share / "jobs")), 10)
    _wait_for(lambda: not warm_rig_guests() and not list((warm_rig.share / "jobs").iterdir()), 180)
    assert re.search(
        rb"xenrig: xbuild-\S+ destroyed \(client done or gone\)", (warm_rig.dir / "console.log").read_bytes()
    )
    assert not list(tmp_path.iterdir())


def warm_rig_guests() -> tuple[str, ...]:
    from builder.run import warm

    return warm.status().guests
