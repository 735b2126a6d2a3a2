"""Dynamic batching that never pays for padding.

Every history of every request becomes one ``Item``; worker threads (never the event loop) pull items
from one bounded queue and run them as one batch through ``Recommender.decode_codes``. A batch holds
items of one model and one beam (beam changes the search), of any lengths: the runtime runs the
backbone once per history length with no padding token (``backbone_by_length``) and the draft head over
all of them at once. So a batch costs its real tokens plus one head loop, never more than its histories
one by one (equal-length backbone runs and a wider head loop only amortize fixed costs), and every
answer is bit for bit the history's solo answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from nezha.runtime.decode import items_from_sids

from .pool import GRACE_S
from .protocol import DeadlineExceeded, Overloaded, Unavailable

log = logging.getLogger("nezha.serve")


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
    """One history to decode: its codes [n, L] int64, backbone tokens, beam, k, model, owner and index."""

    codes: np.ndarray
    tokens: int
    beam: int
    k: int
    model: object                    # serve.model.LoadedModel
    pending: Pending
    index: int
    arrived: float = field(default_factory=time.perf_counter)


def tokens_of(codes: np.ndarray, max_history: int, levels: int) -> int:
    """Backbone tokens of one encoded history: its kept items' codes plus L placeholders."""
    return (min(len(codes), max_history) + 1) * levels


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


class Batcher:
    """A bounded queue of Items and ``workers`` threads that decode them in batches.

    A batch is built around the largest group of one model and beam waiting, unless the oldest history
    has waited ``max_delay`` seconds: then around it (bounded unfairness, larger batches).

    Each submitted item must hold its model (``item.model.acquire()``); the batcher releases it once
    the item is decoded or dropped, so that a reloaded-away model closes only when nothing uses it.

    ``submit`` raises Overloaded at once when the queue would exceed ``max_queue`` histories and
    Unavailable once closing. ``max_wait`` (seconds) lets a worker hold a partial batch for more
    arrivals, but only while arrivals are frequent enough to fill it (so a lone client never waits).
    ``close()`` drains: queued items are still decoded, then the threads end.
    """

    def __init__(self, workers: int, max_batch: int, max_queue: int, max_wait: float = 0.0,
                 observe: Callable | None = None, max_delay: float = 0.01):
        self.max_batch, self.max_queue, self.max_wait = max_batch, max_queue, max_wait
        self.max_delay = max_delay
        self.observe = observe or (lambda **kw: None)       # metrics hook: batch sizes, tokens, queue depth
        self._queue: deque[Item] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = 0
        self._rate = 0.0                                     # EWMA of arrivals per second
        self._last_arrival = time.perf_counter()
        self._threads = [threading.Thread(target=self._work, name=f"nezha-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return self._busy

    def submit(self, items: list[Item]) -> None:
        with self._cond:
            if self._closing:
                raise Unavailable("the server is shutting down")
            if len(self._queue) + len(items) > self.max_queue:
                raise Overloaded(f"queue full: {len(self._queue)} histories waiting, at most {self.max_queue} "
                                 f"(--max-queue); retry later")
            now = time.perf_counter()
            gap = max(now - self._last_arrival, 1e-6)
            self._rate = 0.8 * self._rate + 0.2 * (len(items) / gap)
            self._last_arrival = now
            self._queue.extend(items)
            self.observe(queue_depth=len(self._queue))
            self._cond.notify(len(items))

    def _take(self) -> list[Item] | None:
        """Block until a batch is ready (or closing with an empty queue: None)."""
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
                            it.model.release()
                    self._queue = deque(it for it in self._queue if not it.pending.finished)
                if not self._queue:
                    continue
                queue = list(self._queue)
                seed = pick_seed(queue, now, self.max_delay)
                if seed:                                      # seed first, the rest in arrival order
                    queue.insert(0, queue.pop(seed))
                first = queue[0]
                chosen = plan_batch(queue, self.max_batch)
                wait_left = first.arrived + self.max_wait - now
                # Hold a partial batch only while enough arrivals are expected within the wait.
                if (len(chosen) < self.max_batch and wait_left > 0 and not self._closing
                        and self._rate * wait_left >= 1.0):
                    self._cond.wait(wait_left)
                    continue
                picked = set(chosen)
                batch = [queue[i] for i in chosen]
                self._queue = deque(it for i, it in enumerate(queue) if i not in picked)
                self._busy += 1
                self.observe(queue_depth=len(self._queue))
                return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _run(self, batch: list[Item]) -> None:
        try:
            self._decode(batch)
        finally:
            for it in batch:                                 # each queued item holds its model open
                it.model.release()

    def _decode(self, batch: list[Item]) -> None:
        model = batch[0].model
        t0 = time.perf_counter()
        try:
            idle = len(batch) == 1 and not self._queue     # a lone history, nothing waiting
            # a decode process that outlives every deadline in the batch (+ a grace) is killed: no one waits
            timeout = max(it.pending.deadline for it in batch) - time.perf_counter() + GRACE_S
            keys, scores = model.decode_codes([it.codes for it in batch], batch[0].beam, idle, max(timeout, GRACE_S))
        except Exception as e:                               # a bug or a backend failure: 500 for these requests
            log.exception("batch of %d failed", len(batch))
            for it in batch:
                it.pending.fail(e)
            return
        self.observe(batch_size=len(batch), seconds=time.perf_counter() - t0, tokens=sum(it.tokens for it in batch))
        for j, it in enumerate(batch):               # SIDs -> items here, not on the event loop
            it.pending.set_result(it.index, items_from_sids(keys[j:j + 1], scores[j:j + 1], model.rec.sid_table, it.k)[0])

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, decode what is queued, join the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
