"""The Python graph backend of the Recommender contract (runtime/contract.py): onnxruntime or tensorrt runs
the graphs, the decode loop (runtime/decode.py) runs in NumPy. NumPy plus one inference library, imported
lazily; never torch."""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from .artifact import Artifact
from .backends.base import GraphSteps, parse_device
from .catalog import Catalog
from .contract import Recommender
from .decode import Verifier, backbone_by_length, beam_search, stage
from .encoding import codes_from_catalog, encode_codes, history_codes, items_from_sids
from .errors import ArtifactError, InputError, NezhaError
from .manifest import PRECISIONS, graph_names


class GraphRecommender(Recommender):
    """The contract over the artifact's graphs: ONNX Runtime (CPU or CUDA) or TensorRT engines. Each thread
    gets its own bound buffers (ONNX Runtime) or execution contexts (TensorRT), sized once for the
    largest request. Keeps, outside the contract, the lower-level steps that bench and validation time:
    ``encode``, ``backbone``, ``decode``, ``decode_codes``; and the artifact's ``catalog``, ``sid_table``,
    ``layout`` and ``verifier``.
    """

    def __init__(self, artifact: Artifact, backend: str, precision: str, make_steps, shared=None,
                 dense_budget_bytes: int = 64 << 20):
        self.artifact, self.manifest = artifact, artifact.manifest
        self.backend, self.precision, self.root = backend, precision, artifact.root
        self.layout, limits = self.manifest.layout, self.manifest.limits
        self.levels, self.codebook_sizes = self.layout.levels, tuple(self.layout.codes)
        self.max_history, self.max_batch, self.max_beam = limits.max_history, limits.max_batch, limits.max_beam
        tables = artifact.tables()
        self.catalog = Catalog(tables["item_ids"], tables["item_codes"])
        self.item_count = len(self.catalog.item_ids)
        self.sid_table = (tables["sid_keys"], tables["sid_offsets"], tables["sid_items"])
        self.verifier = Verifier(self.layout, [tables[f"valid_prefixes_{i}"] for i in range(self.layout.levels)],
                                 dense_budget_bytes)
        self._make_steps, self._shared = make_steps, shared
        self._local = threading.local()
        self._all_steps: list[GraphSteps] = []
        self._lock = threading.Lock()

    @classmethod
    def _open(cls, artifact_dir, backend, device, precision, threads, verify, dense_budget_bytes) -> "GraphRecommender":
        artifact = Artifact.open(artifact_dir, verify=verify)
        manifest = artifact.manifest
        names = graph_names(manifest.layout.levels)
        available = manifest.graphs if backend == "onnxruntime" else manifest.engines
        if not available:
            raise ArtifactError(f"artifact {artifact.root} has no TensorRT engines: build with --backend tensorrt")
        precision = precision or next(p for p in PRECISIONS if p in available)    # fp32 first if built
        if precision not in available:
            raise ArtifactError(f"artifact {artifact.root} has no {precision!r} {'graphs' if backend == 'onnxruntime' else 'engines'}; "
                                f"it has {sorted(available)}")
        entries = {g: manifest.graph(precision, g) for g in names}
        device = device or ("cpu" if backend == "onnxruntime" else "cuda")
        parse_device(device)
        if manifest.precisions[precision].execution == "cpu-only" and device != "cpu":
            raise ArtifactError(f"precision {precision} is a CPU-only graph; load it with device='cpu'")
        if backend == "onnxruntime":
            from .backends.onnxruntime import open_sessions, ort_steps
            shared = open_sessions({g: artifact.path(e.file) for g, e in entries.items()}, device, threads, entries)
            make_steps = lambda: ort_steps(entries, shared)
        else:
            kind, device_id = parse_device(device)
            if kind != "cuda":
                raise InputError(f"device {device!r}; allowed with tensorrt: cuda, cuda:N")
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
            raise ArtifactError(f"artifact {self.artifact.root}: manifest.json's layout (tokens up to "
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

    def _item_codes(self, items: np.ndarray, offsets: np.ndarray, skip: bool) -> list[np.ndarray]:
        return codes_from_catalog(items, offsets, self.catalog, skip)

    def _decode_batch(self, codes, beam, ks, stages):
        keys, scores = self.decode_codes(codes, beam, stages)
        return items_from_sids(keys, scores, self.sid_table, ks)

    def close(self) -> None:
        with self._lock:
            for steps in self._all_steps:
                steps.close()
            self._all_steps.clear()
        self._local = threading.local()

