"""Read the guest console: the init's marker lines and the run's result.

The init (initramfs/init.c) prints exactly these lines on the console:
    xbuild: exec <path> at <N>us          just before exec; N = CLOCK_BOOTTIME in µs
    xbuild: exit status <N>               the entrypoint exited with N
    xbuild: killed by signal <N> (<NAME>) the entrypoint died of signal N
    xbuild: error: <message>              a failure before exec (followed by an exit status line)
    xbuild: health: healthy|unhealthy     the image's HEALTHCHECK changed state
    xbuild: health: probe…                after `unhealthy`: how the last probe ended, then its output
Health lines are read only as health lines (a probe's output can hold any text, markers included).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

EXEC_RE = re.compile(rb"xbuild: exec (?P<path>\S.*?) at (?P<us>\d+)us")
EXIT_RE = re.compile(rb"xbuild: exit status (?P<code>\d+)")
SIGNAL_RE = re.compile(rb"xbuild: killed by signal (?P<sig>\d+)")
ERROR_RE = re.compile(rb"xbuild: error: (?P<msg>.*)")
HEALTH_PREFIX = b"xbuild: health: "
HEALTH_RE = re.compile(rb"xbuild: health: (?P<state>healthy|unhealthy)\s*$")
HEALTH_STATES = ("healthy", "unhealthy")


@dataclass(frozen=True)
class RunResult:
    """What a guest run produced. `exit_status` follows the shell: 128+N when killed by signal N."""

    exit_status: int | None
    signal: int | None
    boot_us: int | None
    launch_to_exec_s: float | None
    error: str | None
    console: bytes
    health: str | None = None  # the last health state the init reported (None: none reported)

    @property
    def boot_ms(self) -> float | None:
        return None if self.boot_us is None else self.boot_us / 1000


@dataclass
class ConsoleWatcher:
    """Feed console bytes as they arrive; it records the markers and when the exec marker was seen."""

    started: float = field(default_factory=time.monotonic)
    buf: bytearray = field(default_factory=bytearray)
    boot_us: int | None = None
    exec_seen_at: float | None = None
    exit_status: int | None = None
    signal: int | None = None
    error: str | None = None
    health: str | None = None
    _scan: int = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            nl = self.buf.find(b"\n", self._scan)
            if nl < 0:
                return
            self._line(bytes(self.buf[self._scan : nl]).rstrip(b"\r"))
            self._scan = nl + 1

    def _line(self, line: bytes) -> None:
        if HEALTH_PREFIX in line:
            if m := HEALTH_RE.search(line):
                self.health = m["state"].decode()
            return
        if self.boot_us is None and (m := EXEC_RE.search(line)):
            self.boot_us = int(m["us"])
            self.exec_seen_at = time.monotonic()
        elif self.error is None and (m := ERROR_RE.search(line)):
            self.error = m["msg"].decode(errors="replace").strip()
        elif self.exit_status is None and (m := EXIT_RE.search(line)):
            self.exit_status = int(m["code"])
        elif self.exit_status is None and (m := SIGNAL_RE.search(line)):
            self.signal = int(m["sig"])
            self.exit_status = 128 + self.signal

    @property
    def finished(self) -> bool:
        return self.exit_status is not None

    def result(self) -> RunResult:
        if self._scan < len(self.buf):
            self._line(bytes(self.buf[self._scan :]))
            self._scan = len(self.buf)
        launch = None if self.exec_seen_at is None else self.exec_seen_at - self.started
        return RunResult(
            self.exit_status, self.signal, self.boot_us, launch, self.error, bytes(self.buf), self.health
        )
