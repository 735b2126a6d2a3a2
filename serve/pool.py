"""Decode processes: the server's decode workers in separate processes, each with its own Python GIL.

The Python decode loop holds the GIL for a third of a decode on a small model (numpy between the graph
runs), and the event loop needs it for every request's HTTP work: in one process, decode threads and the
event loop take turns on one GIL and the server uses about one core however many it has (measured on
the demo artifact: 1.09 cores of 2 at concurrency 16; a second decode thread lowered throughput). A
``DecodePool`` runs ``processes`` child processes, each with its own Recommender on the same artifact;
the server's worker threads hand each batch to a free child over a pipe and wait without the GIL.

Children are fresh interpreters (``python -m nezha.serve.pool``: no fork of a threaded server, and unlike
multiprocessing's spawn no re-import of the caller's main script) talking over a socket pair; they load
and verify the artifact themselves and must report the server's own manifest version. One that dies (killed, crashed) fails
the batch it was running (500 for those requests) and is started again on its next use. A child whose
server dies reads end-of-file on its pipe and exits.
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
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Sequence

import numpy as np

from nezha.runtime.errors import OptionError

log = logging.getLogger("nezha.serve")
START_TIMEOUT_S = 300.0              # a child loads and hashes the artifact (a large one takes seconds)


class DecodeProcessError(RuntimeError):
    """A decode process died or could not start: a server fault (500), not the request's."""


def _child_main(conn: Connection, artifact: str, load: dict) -> None:
    """A decode process: load the artifact, report ("ready", version), then answer (codes, beam) messages
    with ("ok", keys, scores) or ("error", exception) until None or the server's end of the pipe closes."""
    import hashlib

    from nezha.runtime import Recommender

    try:
        rec = Recommender.load(artifact, verify=True, **load)
        rec.decode_codes([rec.catalog.item_codes[:1]], min(20, rec.max_beam))        # binds this process's buffers
        version = hashlib.sha256((Path(artifact) / "manifest.json").read_bytes()).hexdigest()[:12]
    except BaseException as e:                     # reported to the server, which refuses the load
        conn.send(("error", _portable(e)))
        return
    conn.send(("ready", version))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):            # the server is gone
                return
            if message is None:
                return
            codes, beam = message
            try:
                keys, scores = rec.decode_codes(codes, beam)
                conn.send(("ok", keys, scores))
            except Exception as e:
                conn.send(("error", _portable(e)))
    finally:
        rec.close()


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it pickles (the library's errors do), else a RuntimeError with its text."""
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Child:
    """One decode process and the server's end of its pipe."""

    def __init__(self, index: int):
        self.index = index
        self.process = None
        self.conn = None

    def start(self, artifact: Path, load: dict) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nezha.serve.pool", str(theirs.fileno()), str(artifact), json.dumps(load)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
            self.conn = Connection(os.dup(ours.fileno()))

    def wait_ready(self, version: str, timeout: float = START_TIMEOUT_S) -> None:
        if not self.conn.poll(timeout):
            self.stop()
            raise DecodeProcessError(f"decode process {self.index} did not start within {timeout:.0f} s")
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            code = self.stop()
            raise DecodeProcessError(f"decode process {self.index} exited while loading (exit code {code})") from None
        if reply[0] == "error":
            self.stop()
            raise reply[1]
        if reply[1] != version:
            self.stop()
            raise DecodeProcessError(f"decode process {self.index} loaded manifest version {reply[1]}, the server "
                                     f"{version}: the artifact changed while loading")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the process to end (None), then kill it if it does not; -> its exit code."""
        if self.process is None:
            return None
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        code = self.process.returncode
        self.conn.close()
        self.process = self.conn = None
        return code


class DecodePool:
    """``processes`` decode processes on one artifact. ``decode_codes(codes, beam)`` runs on a free one
    (thread-safe: each caller holds one child for the call; more callers than children wait)."""

    def __init__(self, artifact: Path, load: dict, processes: int, version: str):
        if type(processes) is not int or processes < 1:
            raise OptionError(f"processes must be a positive integer, got {processes!r}")
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
                child.stop()
            raise
        for child in self._children:
            self._free.put(child)
        log.info("%d decode process(es) ready (pids %s)", processes, [c.process.pid for c in self._children])

    @property
    def processes(self) -> int:
        return len(self._children)

    def pids(self) -> list[int | None]:
        return [c.process.pid if c.process is not None else None for c in self._children]

    def decode_codes(self, code_histories: Sequence[np.ndarray], beam: int) -> tuple[np.ndarray, np.ndarray]:
        """Recommender.decode_codes in a child: (sid_keys [B, K] uint64, scores [B, K] float32)."""
        child = self._free.get()
        try:
            if self._closed:
                raise DecodeProcessError("the decode pool is closed")
            if not child.alive:                       # died after its last batch: start it again
                self._restart(child)
            try:
                child.conn.send((list(code_histories), beam))
                reply = child.conn.recv()
            except (EOFError, OSError):
                code = child.stop(1.0)
                raise DecodeProcessError(f"decode process {child.index} died during a batch (exit code {code}); "
                                         f"it is started again for the next one") from None
        finally:
            self._free.put(child)
        if reply[0] == "error":
            raise reply[1]
        return reply[1], reply[2]

    def _restart(self, child: _Child) -> None:
        code = child.stop(0)
        log.warning("decode process %d is gone (exit code %s); starting it again", child.index, code)
        try:
            child.start(self.artifact, self.load)
            child.wait_ready(self.version)
        except Exception as e:                        # e.g. the artifact was removed since: a server fault
            child.stop(0)
            raise DecodeProcessError(f"decode process {child.index} died and could not start again: {e}") from None

    def close(self) -> None:
        """Stop every child (each finishes the batch it runs first: callers hold them until then)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        stopped = [self._free.get() for _ in self._children]
        for child in stopped:
            child.stop()
        for child in stopped:                         # late callers get DecodeProcessError, not a hang
            self._free.put(child)


if __name__ == "__main__":                         # a decode process: python -m nezha.serve.pool FD ARTIFACT LOAD
    import signal
    # A decode process lives as long as its server needs it: Ctrl-C at a terminal or a SIGTERM to the whole
    # process group must not end it before the server has drained (the server stops it, or it reads
    # end-of-file when the server is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _child_main(Connection(int(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3]))
