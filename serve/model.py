"""Loading an artifact for the server: open and verify it, time one decode, start the decode processes if
asked -> a ``batching.LoadedModel`` (the Recommender, a version, and a count of the requests using it)."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from pathlib import Path

from nezha.runtime import Recommender
from nezha.runtime.errors import ArtifactError, InputError
from nezha.runtime.artifact import MAX_MANIFEST_BYTES

from .batching import LoadedModel
from .child import probe_codes
from .options import LoadOptions
from .pool import DecodePool

log = logging.getLogger("nezha.serve")


def auto_workers(backend_share: float, decode_seconds: float, cores: int | None = None) -> int:
    """Decode threads by default. One per core when a decode runs mostly in the backend with the GIL
    released (large models, the C++ loop): the threads compute in parallel; else one (the Python loop on a
    small model: a second thread only contends for the GIL with the first and the event loop). And when a
    decode is short, one core fewer: the event loop's HTTP work per request is then a sizeable share of
    the CPU, and a decode thread on every core starves it (measured: demo model, C++ loop, 2 cores)."""
    cores = cores or os.cpu_count() or 1
    if backend_share < WORKERS_SHARE:
        return 1
    return max(1, cores - 1) if decode_seconds < SHORT_DECODE_SECONDS else cores


WORKERS_SHARE = 0.75
SHORT_DECODE_SECONDS = 0.002


def batch_limit(model: LoadedModel, max_batch: int | None) -> int:
    """Histories per batch: ``max_batch`` (--max-batch; None: the artifact's) capped at the artifact's, with a
    warning when it caps (a reloaded artifact may have a smaller limit than the one the server started with)."""
    if max_batch is not None and max_batch > model.rec.max_batch:
        log.warning("--max-batch %d is more than the artifact's max_batch: batches of at most %d",
                    max_batch, model.rec.max_batch)
    return model.rec.max_batch if max_batch is None else min(max_batch, model.rec.max_batch)


def decode_workers(model: LoadedModel, workers: int | None, max_batch: int) -> int:
    """Worker threads of the uvicorn engine: one per decode process, else ``workers`` or auto_workers."""
    pool = model.pool
    n = pool.processes if pool else workers or auto_workers(model.backend_share, model.decode_seconds)
    log.info("%d decode %s, batches of up to %d histories", n, "process(es), one worker thread each" if pool
             else "thread(s)", max_batch)
    return n


def backend_share(rec: Recommender, repeats: int = 5) -> tuple[float, float]:
    """Of a solo decode (a mid-length history, beam 20), the share of time spent in the backend's graph
    runs, where the GIL is released: the rest is the Python loop, which decode threads cannot overlap.
    The C++ runtime (backend "cpp") runs its whole loop in one call without the GIL: every stage counts.
    -> (share, seconds of that decode)."""
    history = probe_codes(rec, max(1, rec.max_history // 2))
    best = (0.0, float("inf"))
    for _ in range(repeats):
        stages: dict = {}
        t0 = time.perf_counter()
        rec.decode_batch(history, min(20, rec.max_beam), [1], stages)
        total = time.perf_counter() - t0
        inside = sum(v for k, v in stages.items() if rec.backend == "cpp" or k == "backbone" or k.startswith("head_"))
        best = min(best, (inside, total), key=lambda x: x[1])
    return best[0] / best[1], best[1]


def load_model(artifact: str | Path, options: LoadOptions) -> LoadedModel:
    """Open and verify (sha256 of every file) an artifact, run one request through it and measure how
    much of a decode runs outside the GIL; start the decode processes if asked. Raises the library's
    NezhaError for a bad or corrupt artifact, or one that changes while it loads."""
    if "\0" in str(artifact):
        raise InputError("an artifact folder path must not contain a NUL character")
    try:
        artifact = Path(artifact).resolve()
    except (RuntimeError, OSError):                 # a link loop (RuntimeError before Python 3.13)
        raise InputError(f"{artifact}: cannot resolve the folder's path (a symbolic link loop?)") from None
    manifest = _manifest_bytes(artifact)
    rec = Recommender.load(artifact, backend=options.backend, device=options.device,
                           precision=options.precision, threads=options.threads, verify=True)
    pool = None
    try:
        rec.decode_batch(probe_codes(rec), min(20, rec.max_beam), [1])       # smoke test, binds buffers
        share, seconds = backend_share(rec)
        if _manifest_bytes(artifact) != manifest:
            raise ArtifactError(f"{artifact}/manifest.json changed while the artifact was loading; try again")
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
        raise ArtifactError(f"{path}: {e.strerror}") from None
