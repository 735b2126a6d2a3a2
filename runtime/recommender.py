"""The Recommender: what services embed. Loads an artifact folder, answers "next items for these
histories". NumPy plus one inference library, imported lazily; never torch."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifact import Artifact
from .backends.base import GraphSteps, parse_device
from .catalog import Catalog
from .decode import backbone_by_length, beam_search, items_from_sids, stage
from .encoding import check_batch, encode_codes, history_codes, integer_array
from .errors import NezhaError, OptionError, clipped
from .manifest import PRECISIONS, ManifestError, graph_names
from .verifier import Verifier

BACKENDS = ("onnxruntime", "tensorrt")
MAX_THREADS = 256               # intra-op threads per session; far beyond any machine's useful count


class RequestError(NezhaError, ValueError):
    """A request outside what the artifact allows (k, beam, types); the message says what is allowed."""


def check_load_options(precision, threads, dense_budget_bytes) -> None:
    """The load options every runtime (Python or C++) takes, checked before the artifact is opened."""
    if threads is not None and (type(threads) is not int or not 1 <= threads <= MAX_THREADS):
        raise OptionError(f"threads must be an integer in 1..{MAX_THREADS} or None, got {clipped(threads)}")
    if precision is not None and precision not in PRECISIONS:
        raise OptionError(f"precision {precision!r}; allowed: {', '.join(PRECISIONS)} (or None: fp32 first if built)")
    if type(dense_budget_bytes) is not int or not 0 <= dense_budget_bytes < 2**63:    # int64 in the C ABI: never wrapped
        raise OptionError(f"dense_budget_bytes must be an integer in 0..2^63-1, got {clipped(dense_budget_bytes)}")


class Recommender:
    """``Recommender.load(artifact_dir)`` then ``recommend(histories, k=10, beam=20)``.

    Policies: histories keep their most recent ``max_history`` items; unknown item ids raise unless
    ``unknown='skip'``; an empty history raises; a batch larger than the artifact's ``max_batch`` is
    split; fewer valid items than k gives fewer results, never an invalid one. Thread-safe: each
    thread gets its own bound buffers (ONNX Runtime) or execution contexts (TensorRT), sized once for
    the largest request and kept until ``close()``: serve from a fixed pool of threads, and do not call
    ``close()`` while requests are running.
    """

    def __init__(self, artifact: Artifact, backend: str, precision: str, make_steps, shared=None,
                 dense_budget_bytes: int = 64 << 20):
        self.artifact, self.manifest = artifact, artifact.manifest
        self.backend, self.precision = backend, precision
        self.layout, limits = self.manifest.layout, self.manifest.limits
        self.max_history, self.max_batch, self.max_beam = limits.max_history, limits.max_batch, limits.max_beam
        tables = artifact.tables()
        self.catalog = Catalog(tables["item_ids"], tables["item_codes"])
        self.sid_table = (tables["sid_keys"], tables["sid_offsets"], tables["sid_items"])
        self.verifier = Verifier(self.layout, [tables[f"valid_prefixes_{i}"] for i in range(self.layout.levels)],
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
        tensorrt). ``precision`` defaults to the first built of fp32, fp16, int8, int8-cpu; ``threads``
        sets ONNX Runtime's intra-op threads per session (default: its own choice); ``verify`` checks
        every file's sha256 against the manifest (``False`` only for trusted hot reloads)."""
        if backend == "cpp":                   # the C++ runtime (runtime/cpp): same API, its own loop and loader
            from .backends.cpp import CppRecommender
            return CppRecommender.load(artifact_dir, precision, threads, verify, dense_budget_bytes, device)
        if backend not in BACKENDS:
            raise OptionError(f"backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        check_load_options(precision, threads, dense_budget_bytes)
        artifact = Artifact.open(artifact_dir, verify=verify)
        manifest = artifact.manifest
        names = graph_names(manifest.layout.levels)
        available = manifest.graphs if backend == "onnxruntime" else manifest.engines
        if not available:
            raise ManifestError(f"artifact {artifact.root} has no TensorRT engines: build with --backend tensorrt")
        precision = precision or next(p for p in PRECISIONS if p in available)    # fp32 first if built
        if precision not in available:
            raise ManifestError(f"artifact {artifact.root} has no {precision!r} {'graphs' if backend == 'onnxruntime' else 'engines'}; "
                                f"it has {sorted(available)}")
        entries = {g: manifest.graph(precision, g) for g in names}
        device = device or ("cpu" if backend == "onnxruntime" else "cuda")
        parse_device(device)
        if manifest.precisions[precision].execution == "cpu-only" and device != "cpu":
            raise ManifestError(f"precision {precision} is a CPU-only graph; load it with device='cpu'")
        if backend == "onnxruntime":
            from .backends.onnxruntime import open_sessions, ort_steps
            shared = open_sessions({g: artifact.path(e.file) for g, e in entries.items()}, device, threads, entries)
            make_steps = lambda: ort_steps(entries, shared)
        else:
            kind, device_id = parse_device(device)
            if kind != "cuda":
                raise OptionError(f"device {device!r}; allowed with tensorrt: cuda, cuda:N")
            from .backends.tensorrt import Engines, trt_steps
            engine_entries = manifest.engines[precision]
            shared = Engines(engine_entries, {g: artifact.path(e.file) for g, e in engine_entries.items()}, device_id,
                             graphs=entries)                 # each engine's tensors checked at load
            make_steps = lambda: trt_steps(entries, shared, device_id)
        recommender = cls(artifact, backend, precision, make_steps, shared, dense_budget_bytes)
        recommender._check_layout_fits_backbone()
        return recommender

    def _check_layout_fits_backbone(self) -> None:
        """Run the backbone once on the highest tokens the layout names (each level's last code, then the
        placeholders), so that a layout reaching past the graph's vocabulary (manifest.json edited with
        contract.json forged to match) is refused here, not by the backend at the first request."""
        layout = self.layout
        feed = encode_codes([np.array([[c - 1 for c in layout.codes]])], layout, self.max_history)
        steps = self._make_steps()
        try:
            steps.backbone(feed)
        except NezhaError as e:
            raise ManifestError(f"artifact {self.artifact.root}: manifest.json's layout (tokens up to "
                                f"{layout.vocab_size - 1}) does not fit the backbone graph: {e}") from None
        finally:
            steps.close()

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
        """Backbone only (the latency floor), once per history length as the decode runs it: feed ->
        [B, L+1, H] float32, for one length a view into this thread's buffer that its next call
        overwrites (copy it to keep it)."""
        return backbone_by_length(self.steps, feed)

    def beam_for(self, k, beam) -> int:
        """Check k and beam (plain integers, never bools) before any work and return the beam to use:
        ``beam`` defaults to max(k, 20) capped at max_beam. RequestError names what is allowed."""
        integral = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        if beam is not None:
            self._check_beam(beam)
        if not integral(k) or not 1 <= k <= (self.max_beam if beam is None else beam):
            raise RequestError(f"k must be an integer in 1..beam ({self.max_beam if beam is None else beam}), got {clipped(k)}")
        beam = min(max(int(k), 20), self.max_beam) if beam is None else beam
        self._check_beam(beam)
        if k > beam:
            raise RequestError(f"k must be an integer in 1..beam ({beam}), got {clipped(k)}")
        return int(beam)

    def _check_beam(self, beam) -> None:
        if isinstance(beam, (bool, np.bool_)) or not isinstance(beam, (int, np.integer)) or not 1 <= beam <= self.max_beam:
            raise RequestError(f"beam must be an integer in 1..{self.max_beam} (the artifact's max_beam), got {clipped(beam)}")

    @staticmethod
    def _check_count(n: int) -> None:
        if n == 0:
            raise RequestError("no histories given: pass a list of item-id lists")

    def decode_codes(self, code_histories: Sequence[np.ndarray], beam: int,
                     stages: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[n_b, L] code histories -> (sid_keys [B, K] uint64, scores [B, K] float32), best first.
        Batches larger than max_batch run in chunks."""
        self._check_beam(beam)
        self._check_count(len(code_histories))
        keys, scores = [], []
        for i in range(0, len(code_histories), self.max_batch):
            with stage(stages, "encode"):
                feed = encode_codes(code_histories[i:i + self.max_batch], self.layout, self.max_history)
            k, s = beam_search(self.steps, feed, self.layout, self.verifier, beam, stages)
            keys.append(k)
            scores.append(s)
        width = max(k.shape[1] for k in keys)                     # chunks can differ when few SIDs exist
        pad = lambda a, v: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=v)
        return np.concatenate([pad(k, 0) for k in keys]), np.concatenate([pad(s, -np.inf) for s in scores])

    def decode(self, histories: Sequence[Sequence[int]], beam: int, stages: dict | None = None,
               unknown: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """Item-id histories -> (sid_keys [B, K] uint64, scores [B, K] float32), best first."""
        with stage(stages, "encode"):
            codes = history_codes(histories, self.catalog, unknown)
        return self.decode_codes(codes, beam, stages)

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, beam: int | None = None,
                  unknown: str = "error") -> list[list[tuple[int, float]]]:
        """Per history up to k (item id, summed log-prob) pairs, best first. ``beam`` defaults to
        max(k, 20) capped at the artifact's max_beam."""
        beam = self.beam_for(k, beam)
        check_batch(histories)
        self._check_count(len(histories))
        keys, scores = self.decode(histories, beam, unknown=unknown)
        return items_from_sids(keys, scores, self.sid_table, k)

    def recommend_codes(self, code_histories: Sequence[Sequence[Sequence[int]]], k: int = 10,
                        beam: int | None = None) -> list[list[tuple[int, float]]]:
        """SID-level variant: histories of code tuples (each of L codes) instead of item ids."""
        beam = self.beam_for(k, beam)
        check_batch(code_histories)
        self._check_count(len(code_histories))
        arrays = []
        for b, h in enumerate(code_histories):
            check_batch(h, f"history {b}")
            rows = [integer_array(item, f"history {b} item {i}", "codes") for i, item in enumerate(h)]
            if any(len(r) != self.layout.levels for r in rows):
                raise RequestError(f"history {b}: each item needs {self.layout.levels} codes, got "
                                   f"{clipped([len(r) for r in rows])}")
            a = np.stack(rows) if rows else np.zeros((0, self.layout.levels), np.int64)
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
