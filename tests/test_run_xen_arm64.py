"""The nested Xen rig on arm64 (issue 18.3): a linux/arm64 artifact runs as a DomU of Xen 4.17 for arm64,
nested in `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3` (TCG), through the real CLI.

One boot proves the console (only the guest's lines on stdout, Xen's and dom0's in no output), the exit
status, the arguments after `--`, `-e` and the image's User on an aarch64 DomU; a second proves `-p` and a
stop. The refusals cost no boot. One fast test reads an arm64 rig log. The artifacts are
tests/fixtures/arm64.py's (built once per session).
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from builder.run import xen
from tests.fixtures.hostile import XBUILD, Sandbox, assert_refused, sandbox  # noqa: F401 (a fixture)
from tests.fixtures.registry import free_port


def test_dom0_words_are_one_line(tmp_path: Path) -> None:
    """dom0's last word and the toolstack's first error, as the arm64 rig's log has them (hvc0 through Xen's
    PL011: lines end in \\r\\r\\n), make one line of the run's error."""
    log = tmp_path / "xen-console.log"
    log.write_bytes(
        b"(XEN) Xen version 4.17\r\r\nxenrig: dom0 init at 2.6s\r\r\nlibxl: error: no kernel\r\r\n"
        b"xenrig: xl exited 1 at 9.1s\r\r\n"
    )
    assert xen.dom0_says(log) == " (dom0: xl exited 1 at 9.1s; no kernel)"


@pytest.mark.slow  # an arm64 kernel, the arm64 rig and one nested TCG boot
def test_arm64_guest_on_nested_xen(arm64_artifact: Path, sandbox: Sandbox) -> None:
    """`xbuild run --hypervisor xen-nested` of the arm64 artifact: the DomU runs the probe as the image's
    User with the run's -e and arguments, stdout carries its console only, its exit status is the run's."""
    before = sandbox.snapshot()
    start = time.monotonic()
    r = sandbox.xbuild(
        "run",
        "--hypervisor",
        "xen-nested",
        "-e",
        "GREETING=from-xen-arm64",
        "--timeout",
        "900",
        str(arm64_artifact),
        "--",
        "3",
        "two words",
        timeout=1200,
        env=sandbox.shared_cache_env(),
    )
    took = time.monotonic() - start
    assert r.returncode == 3, r.stdout + r.stderr
    probe = "probe: machine=aarch64 user=app uid=1000 gid=1000 greeting=from-xen-arm64 args=3 two words"
    assert probe in r.stdout, r.stdout
    assert "(XEN)" not in r.stdout and "xenrig:" not in r.stdout, r.stdout  # Xen and dom0 go to the log
    assert "(xen-nested)" in r.stderr, r.stderr
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []
    print(f"arm64 nested Xen run: {took:.0f} s wall")


@pytest.mark.slow  # the arm64 artifact (its kernel)
def test_arm64_rig_refusals(arm64_artifact: Path, sandbox: Sandbox, tmp_path: Path) -> None:
    """Each in one line, nothing left behind: a guest type Xen on arm does not have (2), no
    qemu-system-aarch64 (1, with the apt line), apt without the arm64 architecture (1, with the dpkg line)."""
    before = sandbox.snapshot()
    art = str(arm64_artifact)
    r = sandbox.xbuild(
        "run", "--hypervisor", "xen-nested", "--xen-type", "pv", art, env=sandbox.shared_cache_env()
    )
    assert_refused(r, 2, "Xen on arm64 boots pvh guests only, not pv")
    bare = tmp_path / "bin"  # a PATH without qemu-system-aarch64
    bare.mkdir()
    r = sandbox.xbuild("run", "--hypervisor", "xen-nested", art, env=sandbox.env(PATH=str(bare)))
    assert_refused(r, 1, "qemu-system-aarch64 not found", "apt-get install", "qemu-system-arm")
    conf = tmp_path / "apt.conf"  # apt as on a host that never ran dpkg --add-architecture arm64
    conf.write_text('APT::Architectures { "amd64"; };\n')
    r = sandbox.xbuild("run", "--hypervisor", "xen-nested", art, env=sandbox.env(APT_CONFIG=str(conf)))
    assert_refused(r, 1, "linux-image-arm64:arm64", "dpkg --add-architecture arm64")
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []


@pytest.mark.slow  # one more nested arm64 boot
def test_arm64_port_forwarding_on_nested_xen(arm64_httpd_artifact: Path, sandbox: Sandbox) -> None:
    """`-p HOST:80` under the arm64 rig reaches the DomU's httpd (dom0 relays it to the guest's vif, as on
    amd64); SIGTERM to `xbuild run` stops the guest, whose program's end is the run's status."""
    port = free_port()
    run = subprocess.Popen(
        [
            *XBUILD,
            "run",
            "--hypervisor",
            "xen-nested",
            "-p",
            f"{port}:80",
            "--timeout",
            "600",
            str(arm64_httpd_artifact),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=sandbox.shared_cache_env(),
        cwd=sandbox.root / "work",
    )
    body = b""
    deadline = time.monotonic() + 600
    try:
        while run.poll() is None and not body and time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            except OSError:
                time.sleep(2)
    finally:
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=180)
    assert body == b"hello from xen on arm64\n", (out, err)
    assert b"killed by signal 15" in out and run.returncode == 143, (out, err)
