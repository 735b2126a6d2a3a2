"""A decode process's own side (serve.pool starts them): load the artifact, then decode the batches the
server sends over its socket until the server's end closes. Nothing here runs in the server's process but
``probe_codes``."""

from __future__ import annotations

import json
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np


def probe_codes(rec, n: int = 1) -> list[np.ndarray]:
    """One prepared history of ``n`` items (every code 0: any history runs the same graphs), for the
    smoke test and the timing a load runs."""
    return rec.prepare_codes([[[0] * rec.levels] * n])


def _child_main(conn: Connection, artifact: str, load: dict) -> None:
    """A decode process: load the artifact, report ("ready", version), then answer (codes, beam, ks) messages
    with ("ok", results) or ("error", exception) until None or the server's end of the socket closes."""
    import hashlib

    from nezha.runtime import Recommender

    try:
        rec = Recommender.load(artifact, verify=True, **load)
        rec.decode_batch(probe_codes(rec), min(20, rec.max_beam), [1])        # binds this process's buffers
        version = hashlib.sha256((Path(artifact) / "manifest.json").read_bytes()).hexdigest()[:12]
    except BaseException as e:                     # reported to the server, which refuses the load
        conn.send(("error", _portable(e)))
        return
    conn.send(("ready", version))
    try:
        while (message := _receive(conn)) is not None:
            try:
                conn.send(("ok", rec.decode_batch(*message)))
            except Exception as e:
                conn.send(("error", _portable(e)))
    finally:
        rec.close()


def _receive(conn: Connection):
    """The next message, or None once the server's end is closed (the server is gone)."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def child_entry() -> None:
    """``python -c ... FD ARTIFACT LOAD``: a decode process (see the module docstring for the signals)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _child_main(Connection(int(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3]))


# sys.path[0] is '' (the working directory) under -c: dropped before anything is imported from it (with
# PYTHONSAFEPATH it is not there, and the first entry stays).
CHILD_CODE = "import sys\nif sys.path[:1] == ['']:\n    del sys.path[0]\nfrom nezha.serve.child import child_entry\nchild_entry()"


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it pickles (the library's errors do), else a RuntimeError with its text."""
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
