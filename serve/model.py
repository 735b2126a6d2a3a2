"""A loaded artifact as the server holds it: the Recommender, its measured cost model, a version, and
a count of requests still using it so that a reload can close the old one only when they are done."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nezha.runtime import Recommender

from .cost import CostModel, measure_cost

log = logging.getLogger("nezha.serve")


@dataclass
class LoadOptions:
    """How to open an artifact (Recommender.load's arguments) and whether to batch."""

    backend: str = "onnxruntime"
    device: str | None = None
    precision: str | None = None
    threads: int | None = 1
    batching: bool = True


@dataclass(eq=False)
class LoadedModel:
    rec: Recommender
    artifact: Path
    version: str                                  # short hash of manifest.json: changes with the artifact
    cost: CostModel | None                        # None: batching off
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

    def _close(self) -> None:
        log.info("closing model %s (%s)", self.version, self.artifact)
        self.rec.close()

    def info(self) -> dict:
        rec = self.rec
        return {"artifact": str(self.artifact), "version": self.version, "loaded_at": self.loaded_at, "backend": rec.backend,
                "precision": rec.precision, "max_batch": rec.max_batch, "max_beam": rec.max_beam,
                "max_history": rec.max_history, "levels": rec.layout.levels, "items": len(rec.catalog.item_ids),
                "cost_model": self.cost.as_dict() if self.cost else None}


def load_model(artifact: str | Path, options: LoadOptions) -> LoadedModel:
    """Open and verify (sha256 of every file) an artifact, run one request through it, and measure its
    cost model when batching. Raises the library's NezhaError for a bad or corrupt artifact."""
    artifact = Path(artifact).resolve()
    rec = Recommender.load(artifact, backend=options.backend, device=options.device,
                           precision=options.precision, threads=options.threads, verify=True)
    try:
        rec.decode_codes([rec.catalog.item_codes[:1]], min(20, rec.max_beam))       # smoke test, binds buffers
        # one intra-op thread: ONNX Runtime computes in this thread, so its CPU time is the cost, unskewed
        # by other processes taking the cores while we measure
        clock = time.thread_time if options.threads == 1 and options.backend == "onnxruntime" else time.perf_counter
        cost = measure_cost(rec, clock=clock) if options.batching and rec.max_batch > 1 else None
    except BaseException:
        rec.close()
        raise
    version = hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()[:12]
    model = LoadedModel(rec, artifact, version, cost)
    log.info("loaded %s version %s; cost model %s", artifact, version, cost)
    return model
