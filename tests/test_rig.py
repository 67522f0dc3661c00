"""`xbuild rig start|status|stop` (builder/rig_cli.py, builder/run/warm.py) through the real CLI.

No boot: the state of a rig that never started, and a stale state file (its pid gone, or reused by
another process). The warm rig's boots (two clients, a killed client, a rig killed under a guest, `rig
stop` under a guest) are in tests/test_run_xen.py and below, marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from builder.artifact import Artifact
from builder.run import warm
from tests.fixtures.hostile import XBUILD, Sandbox
from tests.test_run_xen import artifact, needs_rig  # noqa: F401 - the session artifact fixture

ERROR = "xbuild: error: "


def _env(sandbox: Sandbox, **extra: str) -> dict[str, str]:
    env = sandbox.env(**extra)
    if "XBUILD_RIG" not in extra:
        env.pop("XBUILD_RIG", None)  # the default place: $XDG_RUNTIME_DIR, else the cache
        env.pop("XDG_RUNTIME_DIR", None)
    return env


def test_status_of_a_rig_that_never_started(sandbox: Sandbox) -> None:
    before = sandbox.snapshot()
    r = sandbox.xbuild("rig", "status", env=_env(sandbox))
    assert r.returncode == 3 and r.stdout.startswith("not running: no warm rig"), r
    assert (
        str(sandbox.cache / "rig-run") in r.stdout
    )  # one rig per user, in the cache without XDG_RUNTIME_DIR
    j = json.loads(sandbox.xbuild("rig", "status", "--json", env=_env(sandbox)).stdout)
    assert j["state"] == "not running" and j["pid"] is None and j["guests"] == []
    r = sandbox.xbuild("rig", "stop", env=_env(sandbox))
    assert r.returncode == 0 and r.stderr == "xbuild: no warm rig was running\n", r
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []
    assert not (sandbox.cache / "rig-run").exists()  # looking creates nothing


@pytest.mark.parametrize("case", ["pid gone", "pid reused"])
def test_stale_state_file_is_a_crashed_rig(sandbox: Sandbox, case: str) -> None:
    """A state file whose QEMU is gone, or whose pid now names another process (its start time differs):
    status says crashed (exit 1), stop cleans it up, status then says not running; no socket needed."""
    d = sandbox.root / "rig"
    env = _env(sandbox, XBUILD_RIG=str(d))
    assert sandbox.xbuild("rig", "status", env=env).returncode == 3
    d.mkdir(mode=0o700)
    if case == "pid gone":
        p = subprocess.Popen(["true"])
        p.wait()
        pid, start = p.pid, "1"
    else:
        pid, start = os.getpid(), "1"  # this process: alive, but not the rig's (another start time)
    (d / "state.json").write_text(json.dumps({"pid": pid, "starttime": start, "memory_mb": 2048, "up_at": 0}))
    (d / "share" / "jobs").mkdir(parents=True)
    r = sandbox.xbuild("rig", "status", env=env)
    assert r.returncode == 1 and r.stdout.startswith(f"crashed: its QEMU (pid {pid}) is gone"), r
    r = sandbox.xbuild("rig", "stop", env=env)
    assert r.returncode == 0 and "the warm rig is stopped (it was crashed" in r.stderr, r
    assert sorted(p.name for p in d.iterdir()) == ["lock"]
    assert sandbox.xbuild("rig", "status", env=env).returncode == 3
    assert sandbox.stale_temps() == []


def test_state_dir_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, 4242)
    monkeypatch.setenv("XBUILD_RIG", str(d))
    with pytest.raises(Exception, match="belongs to uid 4242, not to this user"):
        warm.state_dir()


@pytest.mark.slow
@needs_rig
def test_rig_killed_under_a_guest_then_recovered_then_stopped_under_one(
    sandbox: Sandbox,
    artifact: Artifact,  # noqa: F811 - the session fixture
) -> None:
    """One rig of its own: (1) its QEMU killed under a running guest: the client says so in one error line,
    exit 1; status says crashed; (2) the next run restarts it (one progress line) and runs; (3) `rig stop`
    under a running guest: the guest is destroyed with the rig, the client exits 1 with one error line."""
    from builder.cache import cache_root

    d = sandbox.root / "rig"
    env = _env(sandbox, XBUILD_RIG=str(d), XBUILD_CACHE=str(cache_root()))  # the rig's build is cached there
    r = sandbox.xbuild("rig", "start", "--memory", "1536", env=env, timeout=900)
    assert r.returncode == 0 and "the warm rig is up in" in r.stderr, r
    run = [*XBUILD, "run", str(artifact.path), "--hypervisor", "xen-nested", "--", "hang"]

    def client() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            run, env=env, cwd=sandbox.root / "work", text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert p.stdout is not None
        while "xbuild: exec" not in (line := p.stdout.readline()):
            assert line, f"client ended early: {p.communicate()}"
        return p

    def one_error(p: subprocess.Popen[str], needle: str) -> None:
        _out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 1 and "Traceback" not in err, err
        assert [ln for ln in lines if ln.startswith(ERROR)] == lines[-1:] and needle in lines[-1], err

    p = client()
    pid = json.loads((d / "state.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    one_error(p, "the warm rig stopped under the guest: the warm rig's QEMU")
    r = sandbox.xbuild("rig", "status", env=env)
    assert r.returncode == 1 and r.stdout.startswith("crashed:"), r

    r = sandbox.xbuild("run", str(artifact.path), "--hypervisor", "xen-nested", env=env, timeout=900)
    assert r.returncode == 7, r.stderr
    assert "xbuild: the warm rig is crashed (its QEMU" in r.stderr and "restarting it" in r.stderr
    assert "xbuild: running in the warm rig" in r.stderr
    assert sandbox.xbuild("rig", "status", env=env).returncode == 0

    p = client()
    t0 = time.monotonic()
    r = sandbox.xbuild("rig", "stop", env=env)
    assert r.returncode == 0 and "the warm rig is stopped (it was running" in r.stderr, r
    assert time.monotonic() - t0 < warm.HALT_S + 10
    one_error(p, "the warm rig stopped under the guest")
    assert sandbox.xbuild("rig", "status", env=env).returncode == 3
    assert sandbox.stale_temps() == []
