"""Read the guest console: the init's marker lines and the run's result.

The init (initramfs/init.c) prints exactly these lines on the console:
    xbuild: init at <N>us                 first thing; N = CLOCK_BOOTTIME in µs
    xbuild: exec <path> at <N>us          just before exec; N = CLOCK_BOOTTIME in µs
    xbuild: exit status <N>               the entrypoint exited with N
    xbuild: killed by signal <N> (<NAME>) the entrypoint died of signal N
    xbuild: error: <message>              a failure before exec (followed by an exit status line)
    xbuild: health: healthy|unhealthy     the image's HEALTHCHECK changed state
    xbuild: health: probe…                after `unhealthy`: how the last probe ended, then its output
Health lines are read only as health lines (a probe's output can hold any text, markers included).

The kernel's own lines that mean the guest cannot run what it was given are fatal (`ConsoleWatcher.fatal`):
    Initramfs unpacking failed: <why>     the initramfs stopped unpacking (too little memory, a corrupt
                                          archive): the tree is partial, so the guest must not run
    Kernel panic - not syncing: <why>     the kernel gave up (e.g. "System is deadlocked on memory")
The runner ends the guest as soon as one is seen (builder/proc.py), and it becomes the result's error.
Only the first of them counts, and none after the init's exec marker (the program's own output is not
the kernel's).

Phases (`RunResult.phases`): host times are seconds on the host's monotonic clock since the launch of the
hypervisor process; guest times are the init's CLOCK_BOOTTIME (µs since the guest kernel started).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

INIT_RE = re.compile(rb"xbuild: init at (?P<us>\d+)us")
EXEC_RE = re.compile(rb"xbuild: exec (?P<path>\S.*?) at (?P<us>\d+)us")
EXIT_RE = re.compile(rb"xbuild: exit status (?P<code>\d+)")
SIGNAL_RE = re.compile(rb"xbuild: killed by signal (?P<sig>\d+)")
ERROR_RE = re.compile(rb"xbuild: error: (?P<msg>.*)")
HEALTH_PREFIX = b"xbuild: health: "
HEALTH_RE = re.compile(rb"xbuild: health: (?P<state>healthy|unhealthy)\s*$")
HEALTH_STATES = ("healthy", "unhealthy")
FATAL_RE = re.compile(rb"(?P<msg>(?:Initramfs unpacking failed|Kernel panic - not syncing): .*)")
UNPACK_FAILED = "Initramfs unpacking failed"


@dataclass(frozen=True)
class Phases:
    """Where a boot's time went: launch (0) → first console byte → init start → exec → app ready.

    `*_s`: host monotonic seconds since launch, when the line (or the first byte) reached the host;
    `*_us`: the guest's CLOCK_BOOTTIME in the init's line. `ready_s`: the first connection to a forwarded
    port that the program accepted (builder/run/ready.py); None without ports or before it happened."""

    first_output_s: float | None = None
    init_s: float | None = None
    init_us: int | None = None
    exec_s: float | None = None
    exec_us: int | None = None
    ready_s: float | None = None

    def to_json(self) -> dict[str, float | int | None]:
        return dict(vars(self))

    def summary(self) -> str:
        """One line: `first output 0.41 s, init 1.20 s (guest 980 ms), exec 1.22 s (guest 1003 ms),
        ready 1.90 s` (the phases seen)."""
        parts = []
        for name, host, guest in (
            ("first output", self.first_output_s, None),
            ("init", self.init_s, self.init_us),
            ("exec", self.exec_s, self.exec_us),
            ("ready", self.ready_s, None),
        ):
            if host is not None:
                parts.append(f"{name} {host:.2f} s" + (f" (guest {guest / 1000:.0f} ms)" if guest else ""))
        return ", ".join(parts)


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
    phases: Phases = Phases()
    fatal: str | None = None  # the kernel's fatal line (see the module docstring), also the error

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
    fatal: str | None = None
    first_output_at: float | None = None
    init_us: int | None = None
    init_seen_at: float | None = None
    ready_at: float | None = None  # set by the runner's AppReady probe (host monotonic)
    _scan: int = 0

    def feed(self, data: bytes) -> None:
        if self.first_output_at is None and data:
            self.first_output_at = time.monotonic()
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
        if self.boot_us is None and self.fatal is None and (m := FATAL_RE.search(line)):
            self.fatal = m["msg"].decode(errors="replace").strip()
            return
        if self.init_us is None and (m := INIT_RE.search(line)):
            self.init_us = int(m["us"])
            self.init_seen_at = time.monotonic()
        elif self.boot_us is None and (m := EXEC_RE.search(line)):
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
        launch = self._since(self.exec_seen_at)
        phases = Phases(
            self._since(self.first_output_at),
            self._since(self.init_seen_at),
            self.init_us,
            launch,
            self.boot_us,
            self._since(self.ready_at),
        )
        return RunResult(
            self.exit_status,
            self.signal,
            self.boot_us,
            launch,
            self.fatal or self.error,
            bytes(self.buf),
            self.health,
            phases,
            self.fatal,
        )

    def _since(self, at: float | None) -> float | None:
        return None if at is None else at - self.started
