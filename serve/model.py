"""A loaded artifact as the server holds it: the Recommender, a version, and
a count of requests still using it so that a reload can close the old one only when they are done."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nezha.runtime import Recommender
from nezha.runtime.errors import OptionError
from nezha.runtime.artifact import MAX_MANIFEST_BYTES
from nezha.runtime.manifest import ManifestError

from .options import LoadOptions
from .pool import DecodePool, DecodeProcessUnavailable

log = logging.getLogger("nezha.serve")


@dataclass(eq=False)
class LoadedModel:
    rec: Recommender
    artifact: Path
    version: str                                  # short hash of manifest.json: changes with the artifact
    backend_share: float = 1.0                    # of a decode's time, the share inside the backend (GIL released)
    decode_seconds: float = 0.0                   # one solo decode (mid-length history, beam 20), best of 5
    pool: DecodePool | None = None                # decode processes, if any: they decode, ``rec`` parses and maps
    loaded_at: float = field(default_factory=time.time)
    _users: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def retire(self) -> None:
        """No new requests will use this model; close it once the last one is done."""
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def decode_codes(self, code_histories, beam: int, idle: bool = False, timeout: float | None = None):
        """Recommender.decode_codes, in a decode process when there is a pool (one that has not answered
        in ``timeout`` s is killed), except when the server is ``idle`` (a lone history, nothing queued):
        then the hop to a process costs more than the GIL it frees (measured on the demo at concurrency
        1: 0.82x of decoding in the server's process). A decode process that cannot be started again
        leaves its batches to the server's process (same answers) until it can."""
        if self.pool is not None and not idle:
            try:
                return self.pool.decode_codes(code_histories, beam, timeout)
            except DecodeProcessUnavailable:
                pass
        return self.rec.decode_codes(code_histories, beam)

    def _close(self) -> None:
        log.info("closing model %s (%s)", self.version, self.artifact)
        if self.pool is not None:
            self.pool.close()
        self.rec.close()

    def info(self) -> dict:
        rec = self.rec
        return {"artifact": str(self.artifact), "version": self.version, "loaded_at": self.loaded_at, "backend": rec.backend,
                "precision": rec.precision, "max_batch": rec.max_batch, "max_beam": rec.max_beam,
                "max_history": rec.max_history, "levels": rec.layout.levels, "items": len(rec.catalog.item_ids),
                "backend_share": round(self.backend_share, 3), "decode_ms": round(1e3 * self.decode_seconds, 3),
                "decode_processes": self.pool.processes if self.pool else 0}


def backend_share(rec: Recommender, repeats: int = 5) -> tuple[float, float]:
    """Of a solo decode (a mid-length history, beam 20), the share of time spent in the backend's graph
    runs, where the GIL is released: the rest is the Python loop, which decode threads cannot overlap.
    The C++ runtime (backend "cpp") runs its whole loop in one call without the GIL: every stage counts.
    -> (share, seconds of that decode)."""
    history = rec.catalog.item_codes[:max(1, rec.max_history // 2)]
    best = (0.0, float("inf"))
    for _ in range(repeats):
        stages: dict = {}
        t0 = time.perf_counter()
        rec.decode_codes([history], min(20, rec.max_beam), stages)
        total = time.perf_counter() - t0
        inside = sum(v for k, v in stages.items() if rec.backend == "cpp" or k == "backbone" or k.startswith("head_"))
        best = min(best, (inside, total), key=lambda x: x[1])
    return best[0] / best[1], best[1]


def load_model(artifact: str | Path, options: LoadOptions) -> LoadedModel:
    """Open and verify (sha256 of every file) an artifact, run one request through it and measure how
    much of a decode runs outside the GIL; start the decode processes if asked. Raises the library's
    NezhaError for a bad or corrupt artifact, or one that changes while it loads."""
    if "\0" in str(artifact):
        raise OptionError("an artifact folder path must not contain a NUL character")
    try:
        artifact = Path(artifact).resolve()
    except (RuntimeError, OSError) as e:                 # a link loop (RuntimeError before Python 3.13)
        raise OptionError(f"{artifact}: cannot resolve the folder's path (a symbolic link loop?)") from None
    manifest = _manifest_bytes(artifact)
    rec = Recommender.load(artifact, backend=options.backend, device=options.device,
                           precision=options.precision, threads=options.threads, verify=True)
    pool = None
    try:
        rec.decode_codes([rec.catalog.item_codes[:1]], min(20, rec.max_beam))       # smoke test, binds buffers
        share, seconds = backend_share(rec)
        if _manifest_bytes(artifact) != manifest:
            raise ManifestError(f"{artifact}/manifest.json changed while the artifact was loading; try again")
        version = hashlib.sha256(manifest).hexdigest()[:12]
        if options.processes:
            pool = DecodePool(artifact, {"backend": options.backend, "device": options.device,
                                         "precision": rec.precision, "threads": options.threads},
                              options.processes, version)
    except BaseException:
        rec.close()
        raise
    model = LoadedModel(rec, artifact, version, share, seconds, pool)
    log.info("loaded %s version %s; a decode takes %.2f ms, %.0f%% of it in the backend", artifact, version,
             1e3 * seconds, 100 * share)
    return model


def _manifest_bytes(artifact: Path) -> bytes:
    """manifest.json's bytes; b"" where it is missing or no regular file of a sane size (a FIFO would block
    the read): Recommender.load then refuses the folder with its own message."""
    path = artifact / "manifest.json"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            return b""
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror}") from None
