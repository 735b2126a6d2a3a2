"""The one decode path of both engines: requests become ``Item``s (one per history), batches of one model
and one beam are decoded by the model's ``decode_batch`` in worker threads, and each answer goes back to
its request. The uvicorn engine queues items in the ``Batcher``; the Ray engine hands them to Ray Serve's
``@serve.batch`` (serve.ray_engine). Both call ``decode_items``, so both answer alike.

A batch holds histories of any lengths: the runtime runs the backbone once per history length with no
padding token and the draft head over all of them at once, so a batch costs its real tokens plus one
head loop, and every answer is bit for bit the history's solo answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nezha.runtime import Recommender
from nezha.runtime.errors import DeadlineExceeded, Overloaded, Unavailable

from .pool import GRACE_S, DecodePool, DecodeProcessUnavailable

log = logging.getLogger("nezha.serve")


@dataclass(eq=False)
class LoadedModel:
    """A loaded artifact as the server holds it, with a count of the requests still using it so that a
    reload closes the old one only when they are done (``serve.model.load_model`` makes one)."""

    rec: Recommender
    artifact: Path
    version: str                                  # short hash of manifest.json: changes with the artifact
    backend_share: float = 1.0                    # of a decode's time, the share inside the backend (GIL released)
    decode_seconds: float = 0.0                   # one solo decode (mid-length history, beam 20), best of 5
    pool: DecodePool | None = None                # decode processes, if any: they decode, ``rec`` parses
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

    def decode_batch(self, codes: list[np.ndarray], beam: int, ks: list[int], idle: bool = False,
                     timeout: float | None = None) -> list[list[tuple[int, float]]]:
        """Recommender.decode_batch, in a decode process when there is a pool (one that has not answered in
        ``timeout`` s is killed), except when the server is ``idle`` (a lone history, nothing queued): then
        the hop to a process costs more than the GIL it frees (measured on the demo at concurrency 1: 0.82x
        of decoding in the server's process). A decode process that cannot be started again leaves its
        batches to the server's process (same answers) until it can."""
        if self.pool is not None and not idle:
            try:
                return self.pool.decode_batch(codes, beam, ks, timeout)
            except DecodeProcessUnavailable:
                pass
        return self.rec.decode_batch(codes, beam, ks)

    def _close(self) -> None:
        log.info("closing model %s (%s)", self.version, self.artifact)
        if self.pool is not None:
            self.pool.close()
        self.rec.close()

    def info(self) -> dict:
        rec = self.rec
        return {"artifact": str(self.artifact), "version": self.version, "loaded_at": self.loaded_at, "backend": rec.backend,
                "precision": rec.precision, "max_batch": rec.max_batch, "max_beam": rec.max_beam,
                "max_history": rec.max_history, "levels": rec.levels, "items": rec.item_count,
                "backend_share": round(self.backend_share, 3), "decode_ms": round(1e3 * self.decode_seconds, 3),
                "decode_processes": self.pool.processes if self.pool else 0}


class Pending:
    """One request's histories in flight: results arrive per history from worker threads; ``on_done``
    is called once, from a worker thread, with (results, None) or (None, exception)."""

    def __init__(self, n: int, deadline: float, on_done: Callable):
        self.results: list = [None] * n
        self.remaining = n
        self.deadline = deadline
        self.on_done = on_done
        self.finished = False
        self._lock = threading.Lock()

    def set_result(self, index: int, result) -> None:
        with self._lock:
            if self.finished:
                return
            self.results[index] = result
            self.remaining -= 1
            if self.remaining:
                return
            self.finished = True
        self.on_done(self.results, None)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.finished:
                return
            self.finished = True
        self.on_done(None, error)


@dataclass
class Item:
    """One history to decode: its codes [n, L] int64, backbone tokens, beam, k, model, owner and index.
    Each holds its model (``model.acquire()`` at admission) until ``release``: by ``decode_items``, a queue
    that drops it, or an engine whose batching failed before the decode; only the first call releases."""

    codes: np.ndarray
    tokens: int
    beam: int
    k: int
    model: LoadedModel
    pending: Pending
    index: int
    arrived: float = field(default_factory=time.perf_counter)
    held: bool = True

    def release(self) -> None:
        with _RELEASING:
            held, self.held = self.held, False
        if held:
            self.model.release()


_RELEASING = threading.Lock()      # an Item's hold is released once, from a decode thread or the event loop


def check_room(waiting: int, n: int, max_queue: int) -> None:
    """Overloaded (429 at once: latency stays bounded, clients retry) when ``n`` more histories would put
    more than ``max_queue`` in wait."""
    if waiting + n > max_queue:
        raise Overloaded(f"queue full: {waiting} histories waiting, at most {max_queue} (--max-queue); retry later")


def plan_batch(queue: list[Item], max_batch: int) -> list[int]:
    """Positions in ``queue`` of the next batch: the first item, then the items of its model and beam in
    queue order, up to ``max_batch`` (1: batching off)."""
    first = queue[0]
    chosen = [0]
    for i in range(1, len(queue)):
        if len(chosen) >= max_batch:
            break
        if queue[i].model is first.model and queue[i].beam == first.beam:
            chosen.append(i)
    return chosen


def pick_seed(queue: list[Item], now: float, max_delay: float) -> int:
    """The item the next batch is built around: the oldest if it has waited ``max_delay`` seconds,
    else the oldest of the largest group of equal (model, beam), so that batches grow."""
    if now - queue[0].arrived >= max_delay:
        return 0
    groups: dict = {}
    for i, it in enumerate(queue):
        groups.setdefault((id(it.model), it.beam), []).append(i)
    return max(groups.values(), key=len)[0]


def decode_items(items: list[Item], max_batch: int, metrics, idle: bool = False) -> None:
    """Decode ``items`` in batches of one model and beam (``plan_batch``, in queue order) through each model's
    ``decode_batch``, record each batch in ``metrics`` (serve.metrics.Metrics), hand every history its
    answer (or its batch's failure: a 500), and release every item's model. Items whose request has already
    finished (deadline, client gone) are dropped. Runs in a worker thread. ``idle``: nothing else waits."""
    try:
        live = [it for it in items if not it.pending.finished]
        while live:
            chosen = set(plan_batch(live, max_batch))
            batch = [live[i] for i in sorted(chosen)]
            live = [it for i, it in enumerate(live) if i not in chosen]
            model, t0 = batch[0].model, time.perf_counter()
            # a decode process that outlives every deadline in the batch (+ a grace) is killed: no one waits
            timeout = max(max(it.pending.deadline for it in batch) - t0 + GRACE_S, GRACE_S)
            try:
                results = model.decode_batch([it.codes for it in batch], batch[0].beam, [it.k for it in batch],
                                             idle and len(batch) == 1 and not live, timeout)
            except Exception as e:                       # a bug or a backend failure: 500 for these requests
                log.exception("batch of %d failed", len(batch))
                for it in batch:
                    it.pending.fail(e)
                continue
            metrics.batch_size.observe(len(batch))
            metrics.batch_seconds.observe(time.perf_counter() - t0)
            metrics.tokens.inc(sum(it.tokens for it in batch))
            for it, result in zip(batch, results):
                it.pending.set_result(it.index, result)
    finally:
        for it in items:
            it.release()


class Batcher:
    """The uvicorn engine's bounded queue of Items and ``workers`` threads that decode them in batches
    (``decode_items``). A batch is built around the largest group of one model and beam waiting, unless the
    oldest history has waited ``max_delay`` seconds: then around it (bounded unfairness, larger batches).

    ``submit`` raises Overloaded at once when the queue would exceed ``max_queue`` histories and Unavailable
    once closing. ``max_wait`` (seconds) lets a worker hold a partial batch for more arrivals, but only while
    arrivals are frequent enough to fill it (so a lone client never waits). ``close()`` drains: queued items
    are still decoded, then the threads end."""

    def __init__(self, workers: int, max_batch: int, max_queue: int, metrics, max_wait: float = 0.0,
                 max_delay: float = 0.01):
        self.max_batch, self.max_queue, self.max_wait = max_batch, max_queue, max_wait
        self.max_delay, self.metrics = max_delay, metrics
        self._queue: deque[Item] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._rate = 0.0                                     # EWMA of arrivals per second
        self._last_arrival = time.perf_counter()
        self._threads = [threading.Thread(target=self._work, name=f"nezha-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, items: list[Item]) -> None:
        with self._cond:
            if self._closing:
                raise Unavailable("the server is shutting down")
            check_room(len(self._queue), len(items), self.max_queue)
            now = time.perf_counter()
            gap = max(now - self._last_arrival, 1e-6)
            self._rate = 0.8 * self._rate + 0.2 * (len(items) / gap)
            self._last_arrival = now
            self._queue.extend(items)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify(len(items))

    def _take(self) -> tuple[list[Item], bool] | None:
        """Block until a batch is ready -> (batch, whether nothing else waits); None once closing and empty."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                now = time.perf_counter()
                for it in self._queue:
                    if now > it.pending.deadline:
                        it.pending.fail(DeadlineExceeded("deadline passed while queued"))
                if any(it.pending.finished for it in self._queue):     # failed or timed out: drop them
                    for it in self._queue:
                        if it.pending.finished:
                            it.release()
                    self._queue = deque(it for it in self._queue if not it.pending.finished)
                if not self._queue:
                    continue
                queue = list(self._queue)
                seed = pick_seed(queue, now, self.max_delay)
                if seed:                                      # seed first, the rest in arrival order
                    queue.insert(0, queue.pop(seed))
                chosen = plan_batch(queue, self.max_batch)
                wait_left = queue[0].arrived + self.max_wait - now
                # Hold a partial batch only while enough arrivals are expected within the wait.
                if (len(chosen) < self.max_batch and wait_left > 0 and not self._closing
                        and self._rate * wait_left >= 1.0):
                    self._cond.wait(wait_left)
                    continue
                picked = set(chosen)
                self._queue = deque(it for i, it in enumerate(queue) if i not in picked)
                self.metrics.queue_depth.set(len(self._queue))
                return [queue[i] for i in chosen], not self._queue

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            decode_items(taken[0], self.max_batch, self.metrics, idle=taken[1])

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, decode what is queued, join the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
