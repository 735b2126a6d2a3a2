"""Decode processes: the server's decode workers in separate processes, each with its own Python GIL.

The Python decode loop holds the GIL for a third of a decode on a small model (numpy between the graph
runs), and the event loop needs it for every request's HTTP work: in one process, decode threads and the
event loop take turns on one GIL and the server uses about one core however many it has (measured on
the demo artifact: 1.09 cores of 2 at concurrency 16; a second decode thread lowered throughput). A
``DecodePool`` runs ``processes`` child processes, each with its own Recommender on the same artifact;
the server's worker threads hand each batch to a free child over a socket and wait without the GIL.

Children are fresh interpreters (no fork of a threaded server; unlike multiprocessing's spawn, no
re-import of the caller's main script, and nothing imported from the server's working directory). They
load and verify the artifact themselves and must report the server's own manifest version. They ignore
the signals a terminal or a process manager sends to the whole group (the server stops them after its
drain) and exit when the server's end of their socket closes.

Failures: a child that dies during a batch fails that batch (500); one that does not answer within the
batch's deadline plus ``GRACE_S`` is killed, the same way. A dead child is started again in the
background, and until it is ready its batches are refused at once (DecodeProcessUnavailable: the caller
decodes them in the server's process, same answers); a start that fails (the artifact changed on disk)
is retried after ``RETRY_S`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Sequence

import numpy as np

from nezha.runtime.errors import NezhaError, Unavailable

from .child import CHILD_CODE

log = logging.getLogger("nezha.serve")
START_TIMEOUT_S = 120.0              # a child loads and hashes the artifact (the 104.6M one: about 3 s)
STOP_TIMEOUT_S = 5.0                 # a child asked to stop finishes its batch first; then it is killed
GRACE_S = 1.0                        # past the batch's deadline, a child that has not answered is killed
RETRY_S = 5.0                        # after a failed restart, the next attempt waits this long
MAX_WAIT_S = 86_400.0                # a wait on a child is capped (the OS's poll takes a C int of milliseconds)


class DecodeProcessError(RuntimeError):
    """A decode process died, hung or is unavailable: a server fault (500), not the request's."""


class DecodeProcessUnavailable(DecodeProcessError):
    """A decode process could not be started again and is not tried for a while: nothing was sent to it."""


class _Child:
    """One decode process and the server's end of its socket."""

    def __init__(self, index: int):
        self.index = index
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.exit_code: int | None = None
        self.ready = False                    # its ("ready", version) message has been read
        self.ready_by = 0.0                   # monotonic time by which a starting process must be ready
        self.retry_at = 0.0                   # monotonic time before which a failed restart is not retried

    def start(self, artifact: Path, load: dict) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-c", CHILD_CODE, str(theirs.fileno()), str(artifact), json.dumps(load)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
            self.conn = Connection(os.dup(ours.fileno()))
        self.ready, self.ready_by = False, time.monotonic() + START_TIMEOUT_S

    def wait_ready(self, version: str, timeout: float = START_TIMEOUT_S) -> None:
        """Raise Unavailable (with the child's own error where it sent one) unless it is ready."""
        if not self.conn.poll(timeout):
            self.kill()
            raise Unavailable(f"decode process {self.index} did not load the artifact within {timeout:.0f} s")
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            code = self.kill()
            raise Unavailable(f"decode process {self.index} exited while loading the artifact (exit code {code})") from None
        if reply[0] == "error":
            self.kill()
            if isinstance(reply[1], NezhaError):
                raise reply[1]
            raise Unavailable(f"decode process {self.index} could not load the artifact: {reply[1]}")
        if reply[1] != version:
            self.kill()
            raise Unavailable(f"decode process {self.index} loaded manifest version {reply[1]}, the server "
                              f"{version}: the artifact changed while loading")
        self.ready = True

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ask_to_stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass

    def kill(self, timeout: float = 0.0) -> int | None:
        """Wait up to ``timeout`` s for the process to end, kill it if it has not, and release the socket;
        -> its exit code (kept in ``exit_code``)."""
        if self.process is None:
            return self.exit_code
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.exit_code = self.process.returncode
        self.conn.close()
        self.process = self.conn = None
        return self.exit_code


class DecodePool:
    """``processes`` decode processes on one artifact. ``decode_batch(codes, beam, ks, timeout)`` runs on a
    free one (thread-safe: each caller holds one child for the call; more callers than children wait)."""

    def __init__(self, artifact: Path, load: dict, processes: int, version: str):
        """``processes`` >= 1, as ``LoadOptions`` checks it (at most one per core)."""
        self.artifact, self.load, self.version = Path(artifact), dict(load), version
        self._children = [_Child(i) for i in range(processes)]
        self._free: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        try:
            for child in self._children:              # all load at once
                child.start(self.artifact, self.load)
            for child in self._children:
                child.wait_ready(version)
        except BaseException:
            for child in self._children:
                child.ask_to_stop()
            for child in self._children:
                child.kill(STOP_TIMEOUT_S)
            raise
        for child in self._children:
            self._free.put(child)
        log.info("%d decode process(es) ready (pids %s)", processes, self.pids())

    @property
    def processes(self) -> int:
        return len(self._children)

    def pids(self) -> list[int | None]:
        return [c.process.pid if c.process is not None else None for c in self._children]

    def decode_batch(self, codes: Sequence[np.ndarray], beam: int, ks: Sequence[int],
                     timeout: float | None = None) -> list[list[tuple[int, float]]]:
        """Recommender.decode_batch in a child. A child that has not answered within ``timeout`` seconds
        (None: no limit) is killed: DecodeProcessError."""
        child = self._free.get()
        try:
            if self._closed:
                raise DecodeProcessUnavailable("the decode pool is closed")
            self._ensure_ready(child)
            try:
                child.conn.send((list(codes), beam, list(ks)))
                if not child.conn.poll(None if timeout is None else min(timeout, MAX_WAIT_S)):
                    child.kill()
                    raise DecodeProcessError(f"decode process {child.index} did not answer within {timeout:.1f} s; "
                                             f"killed, it is started again for the next batch")
                reply = child.conn.recv()
            except (EOFError, OSError):
                code = child.kill(1.0)
                raise DecodeProcessError(f"decode process {child.index} died during a batch (exit code {code}); "
                                         f"it is started again for the next one") from None
            except BaseException:                     # its answer may still come: never read it as the next one's
                child.kill()
                raise
        finally:
            self._free.put(child)
        if reply[0] == "error":
            raise reply[1]
        return reply[1]

    def _ensure_ready(self, child: _Child) -> None:
        """A child ready for a batch, or DecodeProcessUnavailable at once (the caller decodes the batch in the
        server's process): a batch never waits for a process to start. A dead child is started again in the
        background; a failed start is retried after RETRY_S."""
        now = time.monotonic()
        if child.ready and child.alive:
            return
        if child.process is not None and not child.ready:               # starting: ready yet?
            if child.conn.poll(0):
                try:
                    child.wait_ready(self.version, 0)
                    log.info("decode process %d is back (pid %d)", child.index, child.process.pid)
                    return
                except Exception as e:
                    self._failed_start(child, e)
            elif now > child.ready_by:
                self._failed_start(child, Unavailable(f"not ready within {START_TIMEOUT_S:.0f} s"))
            raise DecodeProcessUnavailable(f"decode process {child.index} is starting")
        if now < child.retry_at:
            raise DecodeProcessUnavailable(f"decode process {child.index} could not be started again; next try in "
                                           f"{child.retry_at - now:.1f} s")
        code = child.kill()
        log.warning("decode process %d is not running (last exit code %s); starting it again", child.index, code)
        try:
            child.start(self.artifact, self.load)
        except OSError as e:                                             # no process to be had (fds, memory)
            self._failed_start(child, e)
        raise DecodeProcessUnavailable(f"decode process {child.index} is starting again")

    def _failed_start(self, child: _Child, e: BaseException) -> None:
        child.kill()
        child.exit_code = None
        child.retry_at = time.monotonic() + RETRY_S
        log.warning("decode process %d could not be started again (%s); next try in %.0f s", child.index, e, RETRY_S)
        raise DecodeProcessUnavailable(f"decode process {child.index} could not be started again: {e}") from None

    def close(self) -> None:
        """Stop every child in the background (each finishes the batch it runs first; a stuck one is killed
        after STOP_TIMEOUT_S): safe to call from the event loop. Later callers get DecodeProcessError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        thread = threading.Thread(target=self._stop_all, name="nezha-pool-close", daemon=True)
        with _closing_lock:
            _closing.append(thread)
        thread.start()

    def _stop_all(self) -> None:
        children = [self._free.get() for _ in self._children]     # as their batches end
        for child in children:
            child.ask_to_stop()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in children:                                   # wait for all together, not one after another
            child.kill(max(deadline - time.monotonic(), 0.0))
        for child in children:
            self._free.put(child)


_closing: list[threading.Thread] = []
_closing_lock = threading.Lock()


def wait_closed(timeout: float = STOP_TIMEOUT_S + 1.0) -> bool:
    """Wait until every pool closed so far has stopped its children (a stopped or hung one is killed after
    STOP_TIMEOUT_S): a server's last step on shutdown, so that none outlives it. -> whether all did."""
    deadline = time.monotonic() + timeout
    with _closing_lock:
        threads = list(_closing)
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    with _closing_lock:
        _closing[:] = [t for t in _closing if t.is_alive()]
        return not _closing
