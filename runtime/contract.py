"""The Recommender contract: what every backend offers and what services embed (``nezha.runtime.Recommender``).

One factory (``Recommender.load``) and one set of argument checks for the Python graph backend
(onnxruntime, tensorrt: runtime/recommender.py) and the C++ runtime (cpp: runtime/backends/cpp.py).
A backend supplies three steps: opening an artifact (``_open``), the catalog lookup (``_item_codes``) and
the decode of prepared histories (``_decode_batch``); everything a caller can get wrong is checked here,
so that the same mistake raises the same class with the same message on every backend."""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .decode import stage
from .encoding import check_batch, check_code_range, check_not_empty, check_unknown, flat_histories, integer_array
from .errors import InputError, clipped
from .manifest import PRECISIONS

BACKENDS = ("onnxruntime", "tensorrt", "cpp")
MAX_THREADS = 256               # intra-op threads per session; far beyond any machine's useful count


def check_load_options(backend, precision, threads, dense_budget_bytes) -> None:
    """The load options every backend takes, checked before the artifact is opened."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"backend {clipped(backend)}; allowed: {', '.join(BACKENDS)}")
    if threads is not None and (type(threads) is not int or not 1 <= threads <= MAX_THREADS):
        raise InputError(f"threads must be an integer in 1..{MAX_THREADS} or None, got {clipped(threads)}")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision {clipped(precision)}; allowed: {', '.join(PRECISIONS)} (or None: fp32 first if built)")
    if type(dense_budget_bytes) is not int or not 0 <= dense_budget_bytes < 2**63:    # int64 in the C ABI: never wrapped
        raise InputError(f"dense_budget_bytes must be an integer in 0..2^63-1, got {clipped(dense_budget_bytes)}")


def _integral(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class Recommender(contextlib.AbstractContextManager):
    """``Recommender.load(artifact_dir)`` then ``recommend(histories, k=10, beam=20)``.

    Attributes of every backend: ``backend``, ``precision``, ``root`` (the artifact folder), ``levels``,
    ``codebook_sizes`` (codes per level), ``item_count`` (items in the catalog), ``max_history``,
    ``max_batch``, ``max_beam``. Policies: histories keep their most recent ``max_history`` items;
    unknown item ids raise unless ``unknown='skip'``; an empty history raises; a batch larger than
    ``max_batch`` is split; fewer valid items than k gives fewer results, never an invalid one. Thread-safe:
    each thread gets its own buffers, sized once and kept until ``close()`` (serve from a fixed pool of
    threads; do not call ``close()`` while requests run).
    """

    backend: str
    precision: str
    root: Path
    levels: int
    codebook_sizes: tuple[int, ...]
    item_count: int
    max_history: int
    max_batch: int
    max_beam: int
    default_backend = "onnxruntime"

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str | None = None, device: str | None = None,
             precision: str | None = None, threads: int | None = None, verify: bool = True,
             dense_budget_bytes: int = 64 << 20) -> "Recommender":
        """Open an artifact with one backend: ``onnxruntime`` (the default; on a backend class, that
        class's own), ``tensorrt`` or ``cpp`` (the C++ runtime). ``device``: cpu, cuda or cuda:N (default:
        cpu, cuda for tensorrt); ``precision`` defaults to the first built of fp32, fp16, int8, int8-cpu;
        ``threads`` sets ONNX Runtime's intra-op threads per session (default: its own choice); ``verify``
        checks every file's sha256 against the manifest (``False`` only for trusted hot reloads);
        ``dense_budget_bytes`` bounds the verifier's dense bitmaps."""
        backend = cls.default_backend if backend is None else backend
        check_load_options(backend, precision, threads, dense_budget_bytes)
        if backend == "cpp":
            from .backends.cpp import CppRecommender as implementation
        else:
            from .recommender import GraphRecommender as implementation
        if not issubclass(implementation, cls):
            raise InputError(f"backend {backend!r} is not a {cls.__name__}: open it with nezha.runtime.Recommender.load")
        return implementation._open(artifact_dir, backend, device, precision, threads, verify, dense_budget_bytes)

    @classmethod
    @abc.abstractmethod
    def _open(cls, artifact_dir, backend: str, device, precision, threads, verify: bool,
              dense_budget_bytes: int) -> "Recommender":
        """The backend's loader, called with the options checked."""

    @abc.abstractmethod
    def _item_codes(self, items: np.ndarray, offsets: np.ndarray, skip: bool) -> list[np.ndarray]:
        """The catalog lookup: items [N] int64, history b = items[offsets[b]:offsets[b+1]] -> per history its
        known items' codes [n_b, L] int64; an unknown item raises InputError unless ``skip``."""

    @abc.abstractmethod
    def _decode_batch(self, codes: Sequence[np.ndarray], beam: int, ks: list[int],
                      stages: dict | None) -> list[list[tuple[int, float]]]:
        """``decode_batch`` with its arguments checked."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free every buffer and session; do not call it while requests run."""

    def __exit__(self, *exc):               # __enter__ (returns self): AbstractContextManager's
        self.close()

    # --- the checks, written once -----------------------------------------------------------------------

    def beam_for(self, k, beam) -> int:
        """Check k and beam (plain integers, never bools) before any work and return the beam to use:
        ``beam`` defaults to max(k, 20) capped at max_beam. InputError names what is allowed."""
        if beam is not None:
            self._check_beam(beam)
        self._check_k(k, self.max_beam if beam is None else beam)
        return int(min(max(int(k), 20), self.max_beam) if beam is None else beam)

    def _check_beam(self, beam) -> None:
        if not _integral(beam) or not 1 <= beam <= self.max_beam:
            raise InputError(f"beam must be an integer in 1..{self.max_beam} (the artifact's max_beam), got {clipped(beam)}")

    @staticmethod
    def _check_k(k, beam: int) -> None:
        if not _integral(k) or not 1 <= k <= beam:
            raise InputError(f"k must be an integer in 1..beam ({beam}), got {clipped(k)}")

    @staticmethod
    def _check_count(n: int) -> None:
        if n == 0:
            raise InputError("no histories given: pass a list of item-id lists")

    def prepare(self, histories: Sequence[Sequence[int]], unknown: str = "error") -> list[np.ndarray]:
        """One request's item-id histories, checked (a list of lists of int64 ids, the unknown-item policy
        "error" or "skip", no empty history) -> per history its items' codes [n_i, L] int64, oldest first."""
        check_batch(histories)
        self._check_count(len(histories))
        skip = check_unknown(unknown)
        codes = self._item_codes(*flat_histories(histories), skip)
        check_not_empty(codes)
        return codes

    def prepare_codes(self, code_histories: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """The SID-level variant: histories of code tuples (each of ``levels`` codes, within 0..codes-1 per
        level), checked -> per history [n_i, L] int64."""
        check_batch(code_histories)
        self._check_count(len(code_histories))
        arrays = []
        for b, h in enumerate(code_histories):
            check_batch(h, f"history {b}")
            rows = [integer_array(item, f"history {b} item {i}", "codes") for i, item in enumerate(h)]
            if any(len(r) != self.levels for r in rows):
                raise InputError(f"history {b}: each item needs {self.levels} codes, got {clipped([len(r) for r in rows])}")
            a = np.stack(rows) if rows else np.zeros((0, self.levels), np.int64)
            check_code_range(a, b, self.codebook_sizes)
            arrays.append(a)
        check_not_empty(arrays)
        return arrays

    def tokens(self, codes: np.ndarray) -> int:
        """Backbone tokens of one prepared history [n, L]: its most recent max_history items, then the L
        placeholders."""
        return (min(len(codes), self.max_history) + 1) * self.levels

    def decode_batch(self, codes: Sequence[np.ndarray], beam: int, ks: Sequence[int],
                     stages: dict | None = None) -> list[list[tuple[int, float]]]:
        """A batch of prepared histories ([n_i, L] int64 each, any lengths, from any requests), one beam and a
        k per history -> per history up to k (item id, summed log-prob) pairs, best first; bit for bit
        what the history gives alone. Batches above max_batch run in chunks. ``stages`` (a dict)
        accumulates seconds per stage of the decode."""
        self._check_beam(beam)
        self._check_count(len(codes))
        if len(ks) != len(codes):
            raise InputError(f"decode_batch needs one k per history: {len(codes)} histories, {len(ks)} ks")
        for k in ks:
            self._check_k(k, beam)
        for b, c in enumerate(codes):
            if not isinstance(c, np.ndarray) or c.dtype != np.int64 or c.ndim != 2 or c.shape[1] != self.levels:
                raise InputError(f"code history {b} must be an int64 array [items, {self.levels}] (from prepare), "
                                 f"got {type(c).__name__} {getattr(c, 'dtype', '')} {list(getattr(c, 'shape', ()))}")
        return self._decode_batch(codes, int(beam), [int(k) for k in ks], stages)

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, beam: int | None = None,
                  unknown: str = "error", stages: dict | None = None) -> list[list[tuple[int, float]]]:
        """Per history up to k (item id, summed log-prob) pairs, best first. ``beam`` defaults to max(k, 20)
        capped at the artifact's max_beam."""
        beam = self.beam_for(k, beam)
        with stage(stages, "encode"):
            codes = self.prepare(histories, unknown)
        return self.decode_batch(codes, beam, [k] * len(codes), stages)

    def recommend_codes(self, code_histories: Sequence[Sequence[Sequence[int]]], k: int = 10,
                        beam: int | None = None) -> list[list[tuple[int, float]]]:
        """SID-level variant: histories of code tuples (each of L codes) instead of item ids."""
        beam = self.beam_for(k, beam)
        codes = self.prepare_codes(code_histories)
        return self.decode_batch(codes, beam, [k] * len(codes))
