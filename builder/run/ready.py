"""App-ready: when the program first accepted a connection on a forwarded port, seen from the host.

A forwarded port (QEMU user networking's hostfwd, also the nested rig's) is a host socket that the
hypervisor accepts at once, whatever the guest does; it then connects to the guest and closes the host side
when the guest refuses (RST). So a connection that is still open `HOLD_S` seconds after it was made is one
the program accepted, and its connect time is the app-ready time. Nothing is sent: an HTTP server sees a
client that connected and left. Probing starts only after the init's exec marker (before that no program
listens, and a guest without a network stack yet leaves the host side open while the hypervisor retries).

Under the nested Xen rig a forward is relayed by dom0 (`nc -ll -e nc GUEST PORT`, builder/run/xenrig):
dom0 accepts every connection and closes it only once its relay heard the guest refuse, which under
nested TCG can take seconds, so there a connection must stay open RELAYED_HOLD_S.

Limits: a program that accepts and closes at once without a byte looks like a refusal (never ready); a
guest (or relay) slower than the hold to refuse would look ready early. `poll` never blocks longer than one
connect (CONNECT_TIMEOUT_S); it is called from the runner's console loop (builder/proc.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

HOLD_S = 1.0  # an accepted connection stays open at least this long
RELAYED_HOLD_S = 10.0  # the same through the nested rig's dom0 relay
RETRY_S = 0.1  # between attempts
CONNECT_TIMEOUT_S = 0.2


class AppReady:
    """Poll the host ports `ports` (127.0.0.1) until one connection stays open `hold` seconds; `ready_at` is
    then the host monotonic time it was made."""

    def __init__(self, ports: Sequence[int], hold: float = HOLD_S):
        self.ports, self.hold = tuple(ports), hold
        self.ready_at: float | None = None
        self._sock: socket.socket | None = None
        self._made_at = 0.0
        self._next_try = 0.0
        self._turn = 0

    @property
    def done(self) -> bool:
        return self.ready_at is not None or not self.ports

    def poll(self) -> None:
        """One step: check the open connection, or open the next one when it is time."""
        if self.done:
            return
        now = time.monotonic()
        if self._sock is not None:
            if self._refused():
                self.close()
                self._next_try = now + RETRY_S
            elif now - self._made_at >= self.hold:
                self.ready_at = self._made_at
                self.close()
            return
        if now < self._next_try:
            return
        port = self.ports[self._turn % len(self.ports)]
        self._turn += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(CONNECT_TIMEOUT_S)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            self._next_try = now + RETRY_S
            return
        s.setblocking(False)
        self._sock, self._made_at = s, now

    def _refused(self) -> bool:
        """The open connection was closed or reset by the far side (data waiting means accepted)."""
        assert self._sock is not None
        try:
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
