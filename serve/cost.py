"""The batching cost model: seconds of ``Recommender.decode_codes`` for one and for B histories at three
token lengths, measured on the loaded model at start; a history joins a batch only if the grown batch
costs less than the batch plus that history alone (serve/batching.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Measured seconds to decode a batch, per probe token length T_j: ``solo[j]`` for one history and
    ``marginal[j]`` for each further one. cost(B, T) = solo(T) + (B - 1) * marginal(T), interpolated
    linearly in T between the probes (and held flat beyond them)."""

    tokens: tuple[int, ...]
    solo: tuple[float, ...]
    marginal: tuple[float, ...]

    def cost(self, batch: int, tokens: int) -> float:
        solo = float(np.interp(tokens, self.tokens, self.solo))
        return solo + (batch - 1) * float(np.interp(tokens, self.tokens, self.marginal))

    def worth_adding(self, batch: int, longest: int, tokens: int) -> bool:
        """Is a batch of ``batch`` histories (longest ``longest`` tokens) plus one of ``tokens`` tokens
        cheaper than the batch and that history run alone?"""
        grown = self.cost(batch + 1, max(longest, tokens))
        return grown < self.cost(batch, longest) + self.cost(1, tokens)

    def as_dict(self) -> dict:
        return {"tokens": list(self.tokens), "solo_ms": [round(x * 1e3, 4) for x in self.solo],
                "marginal_ms": [round(x * 1e3, 4) for x in self.marginal]}


def tokens_of(codes: np.ndarray, max_history: int, levels: int) -> int:
    """Backbone tokens of one encoded history: its kept items' codes plus L placeholders."""
    return (min(len(codes), max_history) + 1) * levels


def measure_cost(rec, beam: int = 20, repeats: int = 5, max_probe_batch: int = 8, budget_s: float = 0.5,
                 clock=time.perf_counter) -> CostModel:
    """Time ``rec.decode_codes`` for 1 and B histories at three lengths (1, max_history/2, max_history
    items), best of at least ``repeats`` (more while under ``budget_s`` per length: on a busy machine the
    minimum needs more tries) after a warm-up, interleaved so that machine drift hits both alike.
    ``clock=time.thread_time`` measures this thread's CPU time, immune to preemption on a shared machine:
    right when ONNX Runtime runs in the calling thread (one intra-op thread)."""
    codes = rec.catalog.item_codes
    B = max(2, min(rec.max_batch, max_probe_batch))
    beam = min(beam, rec.max_beam)
    lengths = sorted({1, max(1, rec.max_history // 2), rec.max_history})
    tokens, solo, marginal = [], [], []
    for n_items in lengths:
        history = codes[np.arange(n_items) % len(codes)]
        best = {1: float("inf"), B: float("inf")}
        for batch in best:
            rec.decode_codes([history] * batch, beam)                   # warm-up: binds buffers for the shape
        started, tries = time.perf_counter(), 0
        while tries < repeats or (time.perf_counter() - started < budget_s and tries < 50):
            tries += 1
            for batch in best:
                t0 = clock()
                rec.decode_codes([history] * batch, beam)
                best[batch] = min(best[batch], clock() - t0)
        tokens.append(tokens_of(history, rec.max_history, rec.layout.levels))
        solo.append(best[1])
        marginal.append(max(best[B] - best[1], 0.0) / (B - 1))
    return CostModel(tuple(tokens), tuple(solo), tuple(marginal))
