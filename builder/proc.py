"""Host processes: run a tool to completion (`run_tool`), or supervise a long-running guest (`Supervisor`).

`run_tool` is the one way xbuild runs a host tool it needs an answer from (qemu-img, e2fsprogs, apt-cache,
dpkg-deb, ldd, cp, a compiler): output captured as text, an optional timeout, and every failure one line
of the caller's error type naming the tool: not found, timed out, or `TOOL failed (status N): LINE` with
the last line it printed on stderr (stdout when stderr is empty).

A `Supervisor` runs one process that hosts a guest (QEMU, or `xl create -c` on a dom0) and owns it until it
is gone:
- it runs in a new session (its own process group) and is SIGKILLed by the kernel if the thread that
  started it dies, even by SIGKILL (PR_SET_PDEATHSIG), so no guest outlives its runner;
- its stdout is the guest console: every byte goes to the `console` stream and to a `ConsoleWatcher`
  (builder/run/console.py) that finds the init's marker lines; its stderr is captured, sent to a file,
  or inherited; its stdin is /dev/null, a pipe (`write`) or inherited;
- `wait` streams until the process exits. A stop (the timeout, a set `stop_event`, SIGTERM or SIGINT
  received by this process, or `stop()`) calls the caller's `stop` hook once; `grace` seconds later the
  `force` hook (when given) and `settle` seconds after that, or at once without a force hook, the process
  group is killed. Once the guest printed its exit status the process gets `settle` seconds to exit by
  itself. A second SIGTERM/SIGINT kills at once. After a SIGINT, `wait` raises KeyboardInterrupt once the
  process group is gone. A fatal kernel line (`ConsoleWatcher.fatal`: the initramfs did not unpack, a
  panic) kills the group at once: that guest cannot run what it was given;
- with `ready_ports` (host ports forwarded to the guest), `wait` probes them after the exec marker
  (builder/run/ready.py: a connection open `ready_hold` s) and the result's phases carry when the program
  first accepted a connection;
- `kill` ends the whole process group (SIGTERM, then SIGKILL) and is also registered with atexit.
SIGTERM and SIGINT are handled only while `wait` runs in the main thread, and only if this process does not
ignore them (a shell starts a background job with SIGINT ignored: the terminal's Ctrl-C is not for it, as
Python itself leaves such a SIGINT ignored); the previous handlers are put back before it returns.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import IO, BinaryIO

from .errors import XbuildError
from .run.console import ConsoleWatcher, RunResult
from .run.ready import HOLD_S, AppReady

PR_SET_PDEATHSIG = 1
KILL_WAIT_S = 5.0  # after SIGTERM to the group, before SIGKILL
CAPTURE = "capture"  # Supervisor(stderr=CAPTURE): keep what the process prints on stderr in `.stderr`


def run_tool(
    argv: Sequence[str],
    error: type[XbuildError],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    max_status: int = 0,
    check: bool = True,
    missing: type[XbuildError] | None = None,
    hint: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion, output captured as text (undecodable bytes replaced), and return it.

    Raises `error` when the tool times out, or (with `check`) exits with a status above `max_status`;
    `missing` (default `error`) when it cannot be started, with `hint` (an apt line) appended. With
    `check=False` any status is returned for the caller to judge.
    """
    tool = Path(argv[0]).name
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            text=True,
            errors="replace",
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        raise (missing or error)(f"{tool} not found" + (f": {hint}" if hint else "")) from None
    except OSError as e:
        raise (missing or error)(f"cannot run {tool}: {e.strerror or e}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{tool} timed out after {timeout:g} s") from None
    if check and done.returncode > max_status:
        raise error(f"{tool} failed (status {done.returncode}): {last_line(done.stderr, done.stdout)}")
    return done


def last_line(*texts: str) -> str:
    """The last non-blank line of the first text that has one ('no output' when none has)."""
    for text in texts:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return "no output"


Hook = Callable[["Supervisor"], None]


class Supervisor:
    """One guest-hosting process: start(), then pump() and/or wait(); kill() (idempotent) at the end.

    `stop` asks the guest to shut down (QMP power button, `xl shutdown`, a word on the rig's control
    line); `force` (optional) forces it off after `grace` (`xl destroy`). See the module docstring."""

    def __init__(
        self,
        *,
        console: BinaryIO | None,
        stop: Hook,
        force: Hook | None = None,
        grace: float,
        settle: float,
        stdin: int | None = subprocess.DEVNULL,
        stderr: IO[bytes] | str | None = CAPTURE,
        cwd: Path | None = None,
        ready_ports: Sequence[int] = (),
        ready_hold: float = HOLD_S,
    ):
        self.console, self._stop_hook, self._force_hook = console, stop, force
        self.ready = AppReady(ready_ports, ready_hold)
        self.grace, self.settle = grace, settle
        self._stdin, self._stderr, self._cwd = stdin, stderr, cwd
        self.watcher = ConsoleWatcher()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = bytearray()
        self.stop_requested_at: float | None = None
        self.killed = False  # kill() found the process still running
        self._ended = False
        self.interrupted = False  # a SIGINT arrived during wait()
        self._signals = 0
        self._sel: selectors.BaseSelector | None = None

    # ---- life cycle

    def start(self, argv: Sequence[str]) -> Supervisor:
        """Start `argv` (OSError when it cannot be; the caller names it)."""
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the child only calls it
        capture = self._stderr == CAPTURE
        stderr = subprocess.PIPE if isinstance(self._stderr, str) else self._stderr
        self.watcher = ConsoleWatcher()  # at launch: the exec marker's arrival measures launch → exec
        self.proc = subprocess.Popen(
            list(argv),
            stdin=self._stdin,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=self._cwd,
            start_new_session=True,
            preexec_fn=lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL),
        )  # noqa: PLW1509
        atexit.register(self.kill)
        self._sel = selectors.DefaultSelector()
        for f in (self.proc.stdout, self.proc.stderr if capture else None):
            if f is not None:
                os.set_blocking(f.fileno(), False)
                self._sel.register(f, selectors.EVENT_READ)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write(self, data: bytes) -> None:
        """Send `data` to the process's stdin (stdin=subprocess.PIPE); a closed pipe is ignored."""
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def stop(self) -> None:
        """Ask the guest to stop (the `stop` hook), once; the grace period starts now."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            self._stop_hook(self)

    def kill(self) -> None:
        """End the process group: SIGTERM, then SIGKILL KILL_WAIT_S later; close the pipes. Idempotent."""
        proc = self.proc
        if proc is not None and not self._ended:
            self._ended = True  # once: a reaped leader's pid may be reused
            self.killed = proc.poll() is None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_WAIT_S)
                try:  # the leader is gone; anything left in its group still gets the next signal
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        atexit.unregister(self.kill)

    # ---- streaming

    def pump(self, timeout: float = 0.2) -> bool:
        """Copy what the process printed (waiting up to `timeout` s); False once it exited and its pipes
        are drained."""
        assert self.proc is not None
        if self._sel is None or not self._sel.get_map():
            if self.proc.poll() is None:
                time.sleep(timeout)
                return True
            return False
        for key, _ in self._sel.select(timeout):
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                self._sel.unregister(key.fileobj)
            elif key.fileobj is self.proc.stdout:
                self.watcher.feed(data)
                if self.console is not None:
                    with contextlib.suppress(OSError, ValueError):
                        self.console.write(data)
                        self.console.flush()
            else:
                self.stderr += data
        return bool(self._sel.get_map()) or self.proc.poll() is None

    def wait(self, timeout: float | None = None, stop_event: threading.Event | None = None) -> RunResult:
        """Stream until the process exits or is killed (see the module docstring); kill() on the way out.
        The result carries `timed out after Ns` as its error when the timeout forced the stop."""
        assert self.proc is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        end_at: float | None = None  # kill the group then (the guest is done, or was forced off)
        forced = False
        previous = self._catch_signals()
        try:
            while self.pump(0.2 if self.ready.done else 0.05) and self._signals < 2:
                if self.watcher.fatal:
                    break
                if self.watcher.exec_seen_at is not None and not (self.ready.done or self.watcher.finished):
                    self.ready.poll()
                    self.watcher.ready_at = self.ready.ready_at
                now = time.monotonic()
                if self.stop_requested_at is None:
                    if self._signals or (stop_event is not None and stop_event.is_set()):
                        self.stop()
                    elif deadline is not None and now > deadline:
                        timed_out = True
                        self.stop()
                if end_at is None and self.watcher.finished:
                    end_at = now + self.settle
                stopping = self.stop_requested_at
                if stopping is not None and not forced and now > stopping + self.grace:
                    forced = True
                    if self._force_hook is None:
                        break
                    self._force_hook(self)
                    end_at = now + self.settle if end_at is None else min(end_at, now + self.settle)
                if end_at is not None and now > end_at:
                    break
        finally:
            self.ready.close()
            self.kill()
            self._restore_signals(previous)
        if self.interrupted:
            raise KeyboardInterrupt
        result = self.watcher.result()
        if timed_out and result.error is None:
            result = replace(result, error=f"timed out after {timeout:g}s")
        return result

    # ---- signals

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        self.interrupted = self.interrupted or signum == signal.SIGINT

    def _catch_signals(self) -> dict[int, object] | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        self._signals = 0
        catch = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN]
        return {s: signal.signal(s, self._on_signal) for s in catch}

    @staticmethod
    def _restore_signals(previous: dict[int, object] | None) -> None:
        for s, handler in (previous or {}).items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]
