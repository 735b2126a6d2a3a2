"""Bounds on the uvicorn engine's connections, so that slow or idle clients cannot starve healthy ones.

uvicorn alone holds a connection that never completes its request headers forever (its keep-alive timeout
starts only after a first response), and accepts connections until the process runs out of file
descriptors; then new clients wait in the kernel's backlog or are reset. Here every connection is admitted
by one ``Guard`` per server:

- at most ``cap`` connections are open, below the descriptor limit (``RLIMIT_NOFILE`` less a reserve for
  model files, pipes and logs), so that the server can always accept;
- when a new one arrives at the cap, the oldest connection that has *not delivered a complete request* is
  closed to make room: one waiting for request headers (slow, or idle between keep-alive requests), or one
  whose body is still arriving (a trickled or endless chunked body, ``Expect: 100-continue`` with no body):
  else a client that sends headers fast and then stalls would hold its slot until ``--body-timeout``. A
  connection whose whole request has arrived (being processed, or being answered) is never closed for
  another; if every one is, the newcomer gets 503;
- request headers must be complete within ``header_timeout_s`` of the connection (or, on a kept-alive
  connection, of the next request's first byte), and within ``max_header_bytes``: else 408 or 431 and close.

Bodies have their own timeout in ``Service.handle`` (``--body-timeout``), idle keep-alive connections
uvicorn's ``timeout_keep_alive``. The protocol class extends uvicorn's own (httptools where installed,
else h11), so that parsing and throughput are uvicorn's."""

from __future__ import annotations

import json
import resource
from typing import Callable

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .options import ConnectionLimits

FD_RESERVE = 128                  # descriptors kept free of connections: artifacts, decode-process pipes, logs


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to leave FD_RESERVE descriptors of the process's soft limit free."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


class Guard:
    """The open connections of one server, oldest first, and the bounds they are held to. ``on_close(reason)``
    counts the connections the bounds closed (reasons: evicted, busy, header_timeout, header_too_large)."""

    def __init__(self, limits: ConnectionLimits, on_close: Callable[[str], None] = lambda reason: None,
                 on_count: Callable[[int], None] = lambda n: None):
        self.limits, self.cap = limits, connection_cap(limits.max_connections)
        self.on_close, self.on_count = on_close, on_count
        self.open: dict = {}                             # connection -> None; dicts keep arrival order

    def admit(self, conn: "GuardedHTTPProtocol") -> bool:
        if len(self.open) >= self.cap:
            victim = next((c for c in self.open if c.incomplete()), None)
            if victim is None:
                return False
            victim.refuse(408, "evicted", "closed to admit a new connection: the server is at its connection limit "
                                          "and this one had not sent a complete request")
        self.open[conn] = None
        self.on_count(len(self.open))
        return True

    def forget(self, conn: "GuardedHTTPProtocol") -> None:
        if conn in self.open:
            del self.open[conn]
            self.on_count(len(self.open))

    def protocol(self) -> type:
        """uvicorn's HTTP protocol class bound to this guard (pass it as ``uvicorn.Config(http=...)``)."""
        return type("GuardedHTTPProtocol", (GuardedHTTPProtocol,), {"guard": self})


class GuardedHTTPProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol under a Guard: admitted on connect, headers timed and bounded."""

    guard: Guard

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._header_bytes = 0
        self._cycle_seen = None
        if not self.guard.admit(self):
            self.refuse(503, "busy", "the server is at its connection limit with every connection in a request; "
                                     "retry later")
            return
        self._start_header_clock()

    def connection_lost(self, exc) -> None:
        self.guard.forget(self)
        self._stop_header_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.waiting() and self._header_timer is None:       # the first byte of a kept-alive connection's next request
            self._start_header_clock()
        super().data_received(data)
        if self.cycle is not self._cycle_seen:                  # a request's headers are complete
            self._cycle_seen = self.cycle
            self._stop_header_clock()
        elif self.waiting() and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.guard.limits.max_header_bytes:
                self.refuse(431, "header_too_large", f"request headers are over {self.guard.limits.max_header_bytes} bytes")

    def waiting(self) -> bool:
        """True between requests: no request's headers are complete since the last answer."""
        return self.cycle is None or self.cycle.response_complete

    def incomplete(self) -> bool:
        """True while no request has arrived whole: between requests, or inside one whose body is still coming
        and whose answer has not started (an early 413 or 408 may be on its way: that one is let finish).
        With httptools a pipelined request waits in ``pipeline`` while an earlier one is processed."""
        if self.waiting():
            return True
        return self.cycle.more_body and not self.cycle.response_started and not getattr(self, "pipeline", None)

    def refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` with a JSON error (as Service answers) and close; counted under ``reason``."""
        self.guard.forget(self)
        self._stop_header_clock()
        if self.transport.is_closing():
            return
        body = json.dumps({"error": message, "kind": reason}).encode()
        phrase = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
        self.transport.write(f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             f"content-length: {len(body)}\r\n\r\n".encode() + body)
        self.transport.close()
        self.guard.on_close(reason)

    def _start_header_clock(self) -> None:
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.guard.limits.header_timeout_s, self._header_timeout)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.waiting():
            self.refuse(408, "header_timeout", f"request headers not complete within "
                                               f"{self.guard.limits.header_timeout_s:g} s")
