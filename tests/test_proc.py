"""builder.proc: run_tool's one-line errors and the Supervisor, against real child processes (shell
scripts standing in for QEMU or `xl create -c`: they print the init's marker lines, ignore SIGTERM, exit
with a status)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.errors import DiskError, DiskInputError, RunError
from builder.proc import KILL_WAIT_S, Supervisor, run_tool

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- run_tool


def test_run_tool_returns_the_output() -> None:
    done = run_tool(["sh", "-c", "echo out; echo err >&2"], RunError)
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")


def test_run_tool_failure_is_one_line_naming_the_tool_and_its_last_stderr_line() -> None:
    with pytest.raises(RunError) as e:
        run_tool(["sh", "-c", "echo first >&2; echo 'the reason' >&2; echo; exit 3"], RunError)
    assert str(e.value) == "sh failed (status 3): the reason"
    with pytest.raises(DiskError, match=r"^false failed \(status 1\): no output$"):
        run_tool(["false"], DiskError)
    with pytest.raises(RunError, match=r"^sh failed \(status 2\): on stdout$"):  # stderr empty: stdout's
        run_tool(["sh", "-c", "echo on stdout; exit 2"], RunError)


def test_run_tool_accepts_statuses_up_to_max_status_or_any_without_check() -> None:
    assert run_tool(["sh", "-c", "exit 1"], RunError, max_status=1).returncode == 1
    assert run_tool(["sh", "-c", "exit 7"], RunError, check=False).returncode == 7


def test_run_tool_missing_and_timeout() -> None:
    with pytest.raises(DiskInputError, match=r"^no-such-tool-xb not found: apt-get install x$"):
        run_tool(["no-such-tool-xb"], DiskError, missing=DiskInputError, hint="apt-get install x")
    with pytest.raises(RunError, match=r"^no-such-tool-xb not found$"):
        run_tool(["/nonexistent/no-such-tool-xb"], RunError)
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"^sleep timed out after 0.3 s$"):
        run_tool(["sleep", "10"], RunError, timeout=0.3)
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------------------------- Supervisor


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return all(
        _gone(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pgid
    )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _sup(stops: list[float], **kw: object) -> Supervisor:
    defaults: dict = dict(
        console=io.BytesIO(), stop=lambda s: stops.append(time.monotonic()), grace=0.5, settle=0.5
    )
    return Supervisor(**{**defaults, **kw})


def test_the_marker_lines_reach_the_watcher_and_the_console() -> None:
    console = io.BytesIO()
    stops: list[float] = []
    sup = _sup(stops, console=console).start(
        [
            "sh",
            "-c",
            "echo booting; echo 'xbuild: exec /bin/app at 1234us'; echo hello; "
            "echo 'xbuild: exit status 7'; echo oops >&2",
        ]
    )
    r = sup.wait(timeout=30)
    assert (r.exit_status, r.boot_us, r.error, r.signal) == (7, 1234, None, None)
    assert r.launch_to_exec_s is not None and r.launch_to_exec_s >= 0
    assert console.getvalue() == r.console and b"hello\n" in r.console
    assert bytes(sup.stderr) == b"oops\n" and stops == [] and not sup.killed
    assert sup.proc is not None and sup.proc.returncode == 0


def test_a_process_exiting_with_a_status_and_no_marker() -> None:
    stops: list[float] = []
    sup = _sup(stops).start(["sh", "-c", "echo 'cannot start' >&2; exit 5"])
    r = sup.wait(timeout=30)
    assert r.exit_status is None and r.console == b"" and r.error is None
    assert sup.proc is not None and sup.proc.returncode == 5 and not sup.killed
    assert bytes(sup.stderr) == b"cannot start\n" and stops == []


def test_a_guest_that_lingers_after_its_status_gets_settle_seconds() -> None:
    stops: list[float] = []
    sup = _sup(stops, settle=0.5).start(["sh", "-c", "echo 'xbuild: exit status 0'; exec sleep 60"])
    t0 = time.monotonic()
    r = sup.wait()
    assert r.exit_status == 0 and stops == [] and sup.killed
    assert 0.4 < time.monotonic() - t0 < 10


def test_timeout_stops_then_kills_the_group_of_a_process_ignoring_sigterm() -> None:
    """The stop hook once at the timeout; `grace` later the group: SIGTERM (ignored), then SIGKILL."""
    stops: list[float] = []
    script = "trap '' TERM; echo 'xbuild: exec /x at 1us'; sleep 60 & while :; do sleep 0.1; done"
    sup = _sup(stops, grace=0.5).start(["sh", "-c", script])
    assert sup.proc is not None
    pgid = os.getpgid(sup.proc.pid)
    assert pgid == sup.proc.pid != os.getpgid(0)  # its own session and group
    t0 = time.monotonic()
    r = sup.wait(timeout=0.5)
    took = time.monotonic() - t0
    assert r.error == "timed out after 0.5s" and r.exit_status is None and r.boot_us == 1
    assert len(stops) == 1 and stops[0] - t0 >= 0.5
    assert sup.killed and sup.proc.returncode == -signal.SIGKILL
    assert 1.0 <= took < 1.0 + KILL_WAIT_S + 5
    _eventually(lambda: _group_gone(pgid))  # SIGKILLed members may take a moment to finish dying


def test_force_hook_after_grace_then_settle() -> None:
    """xl's shape: `stop` (xl shutdown) is ignored, `force` (xl destroy) `grace` later ends the guest."""
    stops: list[float] = []
    forced: list[float] = []
    sup = _sup(
        stops,
        stdin=subprocess.PIPE,
        grace=0.5,
        settle=5.0,
        force=lambda s: (forced.append(time.monotonic()), s.write(b"die\n")),
    )
    sup.start(
        ["sh", "-c", "while read w; do [ \"$w\" = die ] && { echo 'xbuild: exit status 137'; exit 0; }; done"]
    )
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    r = sup.wait(stop_event=stop)
    assert r.exit_status == 137 and len(stops) == 1 and len(forced) == 1
    assert forced[0] - stops[0] >= 0.5 and not sup.killed


# --------------------------------------------------------------- signals and parent death (a real runner)

RUNNER = """
import sys
import subprocess
from builder.proc import Supervisor
script = ("echo ready; while read w; do [ \\"$w\\" = stop ] && "
          "{ echo 'xbuild: exit status 143'; exit 0; }; done")
sup = Supervisor(console=sys.stdout.buffer, stop=lambda s: s.write(b"stop\\n"), grace=30, settle=5,
                 stdin=subprocess.PIPE)
sup.start(["sh", "-c", sys.argv[1] if len(sys.argv) > 1 else script])
print("PID", sup.proc.pid, flush=True)
try:
    r = sup.wait()
except KeyboardInterrupt:
    print("KeyboardInterrupt after", sup.proc.returncode, flush=True)
    raise
print("RESULT", r.exit_status, sup.killed, flush=True)
"""


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _runner(*args: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_ignore_sigint if sigint_ignored else None,  # as a shell starts a background job
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(2)]
    pid_line = next(ln for ln in lines if ln.startswith(b"PID "))
    assert b"ready\n" in lines
    return proc, int(pid_line.split()[1])


def test_sigterm_is_a_stop_request() -> None:
    proc, child = _runner()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"xbuild: exit status 143\n" in out and b"RESULT 143 False" in out
    assert _gone(child)


def test_sigint_stops_then_raises_keyboardinterrupt() -> None:
    proc, child = _runner()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert b"xbuild: exit status 143\n" in out and b"KeyboardInterrupt after 0" in out
    assert b"KeyboardInterrupt" in err and proc.returncode != 0
    assert _gone(child)


def test_an_ignored_sigint_stays_ignored() -> None:
    """A runner started with SIGINT ignored (a shell's background job) is not stopped by it; SIGTERM still
    stops it."""
    proc, child = _runner(sigint_ignored=True)
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"RESULT 143 False" in out and b"KeyboardInterrupt" not in out + err
    assert _gone(child)


def test_a_second_signal_kills_at_once() -> None:
    proc, child = _runner("trap '' TERM; echo ready; exec sleep 60")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert b"RESULT None True" in out and time.monotonic() - t0 < KILL_WAIT_S + 5
    assert _gone(child)


def test_the_child_dies_with_a_killed_runner() -> None:
    """SIGKILL leaves the runner no chance to clean up: PR_SET_PDEATHSIG takes the child down."""
    proc, child = _runner("trap '' TERM; echo ready; exec sleep 60")
    assert not _gone(child)
    proc.kill()
    proc.wait()
    _eventually(lambda: _gone(child))
