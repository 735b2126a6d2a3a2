"""The Recommender: what services embed. Loads an artifact folder, answers "next items for these
histories". NumPy plus one inference library, imported lazily; never torch."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends.base import GraphSteps
from .catalog import Catalog
from .decode import beam_search, items_from_sids
from .encoding import encode_codes, history_codes
from .manifest import Manifest, ManifestError
from .verifier import Verifier
from nezha.runtime.errors import NezhaError

BACKENDS = ("onnxruntime", "tensorrt")


class RequestError(NezhaError, ValueError):
    """A request outside what the artifact allows (k, beam, types); the message says what is allowed."""


class Recommender:
    """``Recommender.load(artifact_dir)`` then ``recommend(histories, k=10, beam=20)``.

    Policies: histories keep their most recent ``max_history`` items; unknown item ids raise unless
    ``unknown='skip'``; an empty history raises; a batch larger than the artifact's ``max_batch`` is
    split; fewer valid items than k gives fewer results, never an invalid one. Thread-safe: each
    thread gets its own bound buffers (ONNX Runtime) or execution contexts (TensorRT), sized once for
    the largest request and kept until ``close()``: serve from a fixed pool of threads, and do not call
    ``close()`` while requests are running.
    """

    def __init__(self, manifest: Manifest, backend: str, precision: str, make_steps, shared=None,
                 dense_budget_bytes: int = 64 << 20):
        self.manifest, self.backend, self.precision = manifest, backend, precision
        self.layout = manifest.layout
        limits = manifest.limits
        self.max_history, self.max_batch, self.max_beam = limits["max_history"], limits["max_batch"], limits["max_beam"]
        self.catalog = Catalog(manifest.table("item_ids"), manifest.table("item_codes"))
        self.sid_table = (manifest.table("sid_keys"), manifest.table("sid_offsets"), manifest.table("sid_items"))
        self.verifier = Verifier(self.layout, [manifest.table(f"valid_prefixes_{i}") for i in range(self.layout.levels)],
                                 dense_budget_bytes)
        self._make_steps, self._shared = make_steps, shared
        self._local = threading.local()
        self._all_steps: list[GraphSteps] = []
        self._lock = threading.Lock()

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", device: str | None = None,
             precision: str | None = None, threads: int | None = None, verify: bool = True,
             dense_budget_bytes: int = 64 << 20) -> "Recommender":
        """Open an artifact. ``device``: cpu, cuda or cuda:N (default: cpu for onnxruntime, cuda for
        tensorrt). ``precision`` defaults to the artifact's first (fp32 if built); ``threads``
        sets ONNX Runtime's intra-op threads per session (default: its own choice); ``verify`` checks
        every file's sha256 against the manifest."""
        if backend == "cpp":                   # the C++ runtime (runtime/cpp): same API, its own loop and loader
            from .backends.cpp import CppRecommender
            return CppRecommender.load(artifact_dir, precision, threads, verify, dense_budget_bytes, device)
        manifest = Manifest.load(artifact_dir, verify=verify)
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        graph_names = ["backbone"] + [f"head_{i}" for i in range(manifest.layout.levels)]
        if backend == "onnxruntime":
            device = "cpu" if device is None else device
            precision = precision or manifest.precisions[0]
            entries = {g: manifest.graph(precision, g) for g in graph_names}
            if entries["backbone"].get("execution") == "cpu-only" and device != "cpu":
                raise ManifestError(f"precision {precision} is a CPU-only graph; load it with device='cpu'")
            from .backends.onnxruntime import HostBuffers, OrtRunner, open_sessions
            sessions = open_sessions({g: manifest.path(e["file"]) for g, e in entries.items()}, device, threads)

            def make_steps():
                buffers = HostBuffers(entries)
                return GraphSteps({g: OrtRunner(g, entries[g], sessions[g], buffers) for g in graph_names}, buffers)
            shared = sessions
        else:
            engines_by_precision = manifest.raw.get("engines", {})
            if not engines_by_precision:
                raise ManifestError(f"artifact {manifest.root} has no TensorRT engines: build with --backend tensorrt")
            precision = precision or next(iter(engines_by_precision))
            if precision not in engines_by_precision:
                raise ManifestError(f"artifact {manifest.root} has no {precision} engines; has {sorted(engines_by_precision)}")
            device = "cuda" if device is None else device
            if not device.startswith("cuda"):
                raise ValueError(f"device {device!r}; allowed with tensorrt: cuda, cuda:N")
            device_id = int(device.split(":")[1]) if ":" in device else 0
            from .backends.tensorrt import DeviceBuffers, Engines, TrtRunner, use_device
            engines = Engines({g: engines_by_precision[precision][g] for g in graph_names}, manifest.root, device_id)
            entries = {g: manifest.graph(precision, g) for g in graph_names}

            def make_steps():
                use_device(device_id)                                    # CUDA's current device is per thread
                buffers = DeviceBuffers(entries)
                return GraphSteps({g: TrtRunner(g, entries[g], engines.engines[g], buffers) for g in graph_names}, buffers)
            shared = engines
        return cls(manifest, backend, precision, make_steps, shared, dense_budget_bytes)

    @property
    def steps(self) -> GraphSteps:
        """This thread's runners (created on first use, then reused)."""
        steps = getattr(self._local, "steps", None)
        if steps is None:
            steps = self._local.steps = self._make_steps()
            with self._lock:
                self._all_steps.append(steps)
        return steps

    def encode(self, histories: Sequence[Sequence[int]], unknown: str = "error") -> dict[str, np.ndarray]:
        """Item-id histories -> backbone feed {input_ids, attention_mask} [B, T] int64."""
        return encode_codes(history_codes(histories, self.catalog, unknown), self.layout, self.max_history)

    def backbone(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Backbone only (the latency floor): feed -> [B, L+1, H] float32, a view into this thread's
        buffer that its next call overwrites (copy it to keep it)."""
        return self.steps.backbone(feed)

    def _default_beam(self, k) -> int:
        return min(max(k, 20), self.max_beam) if isinstance(k, (int, np.integer)) else self.max_beam

    def _check_request(self, n: int, k: int | None, beam: int) -> None:
        if not isinstance(beam, (int, np.integer)) or not 1 <= beam <= self.max_beam:
            raise RequestError(f"beam must be an integer in 1..{self.max_beam} (the artifact's max_beam), got {beam!r}")
        if k is not None and (not isinstance(k, (int, np.integer)) or not 1 <= k <= beam):
            raise RequestError(f"k must be an integer in 1..beam ({beam}), got {k!r}")
        if n == 0:
            raise RequestError("no histories given: pass a list of item-id lists")

    def decode_codes(self, code_histories: Sequence[np.ndarray], beam: int,
                     stages: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[n_b, L] code histories -> (sid_keys [B, K] uint64, scores [B, K] float32), best first.
        Batches larger than max_batch run in chunks."""
        self._check_request(len(code_histories), None, beam)
        keys, scores = [], []
        for i in range(0, len(code_histories), self.max_batch):
            t0 = time.perf_counter()
            feed = encode_codes(code_histories[i:i + self.max_batch], self.layout, self.max_history)
            if stages is not None:
                stages["encode"] = stages.get("encode", 0.0) + time.perf_counter() - t0
            k, s = beam_search(self.steps, feed, self.layout, self.verifier, beam, stages)
            keys.append(k)
            scores.append(s)
        width = max(k.shape[1] for k in keys)                     # chunks can differ when few SIDs exist
        pad = lambda a, v: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=v)
        return np.concatenate([pad(k, 0) for k in keys]), np.concatenate([pad(s, -np.inf) for s in scores])

    def decode(self, histories: Sequence[Sequence[int]], beam: int, stages: dict | None = None,
               unknown: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """Item-id histories -> (sid_keys [B, K] uint64, scores [B, K] float32), best first."""
        t0 = time.perf_counter()
        codes = history_codes(histories, self.catalog, unknown)
        if stages is not None:
            stages["encode"] = stages.get("encode", 0.0) + time.perf_counter() - t0
        return self.decode_codes(codes, beam, stages)

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, beam: int | None = None,
                  unknown: str = "error") -> list[list[tuple[int, float]]]:
        """Per history up to k (item id, summed log-prob) pairs, best first. ``beam`` defaults to
        max(k, 20) capped at the artifact's max_beam."""
        beam = self._default_beam(k) if beam is None else beam
        self._check_request(len(histories) if hasattr(histories, "__len__") else 1, k, beam)
        keys, scores = self.decode(histories, beam, unknown=unknown)
        return items_from_sids(keys, scores, self.sid_table, k)

    def recommend_codes(self, code_histories: Sequence[Sequence[Sequence[int]]], k: int = 10,
                        beam: int | None = None) -> list[list[tuple[int, float]]]:
        """SID-level variant: histories of code tuples (each of L codes) instead of item ids."""
        beam = self._default_beam(k) if beam is None else beam
        self._check_request(len(code_histories), k, beam)
        arrays = []
        for b, h in enumerate(code_histories):
            a = np.asarray(h, dtype=np.int64) if len(h) else np.zeros((0, self.layout.levels), np.int64)
            if a.ndim != 2 or a.shape[1] != self.layout.levels:
                raise RequestError(f"history {b}: each item needs {self.layout.levels} codes, got shape {a.shape}")
            if np.any(a < 0) or np.any(a >= np.asarray(self.layout.codes)):
                raise RequestError(f"history {b}: codes must lie in 0..codes-1 per level {list(self.layout.codes)}")
            arrays.append(a)
        keys, scores = self.decode_codes(arrays, beam)
        return items_from_sids(keys, scores, self.sid_table, k)

    def close(self) -> None:
        with self._lock:
            for steps in self._all_steps:
                steps.close()
            self._all_steps.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
