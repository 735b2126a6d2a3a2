"""The contract every backend runner meets: it knows its graph's tensors (from the manifest), checks a
feed against them, runs over buffers allocated once for the largest shapes, and closes with ``with``."""

from __future__ import annotations

import numpy as np
from nezha.runtime.errors import NezhaError


class RunnerError(NezhaError, ValueError):
    """A feed that does not match the graph (names, dtypes, ranks, dims outside the built ranges)."""


class GraphRunner:
    """One graph of an artifact on one thread. Subclasses implement ``_bind`` and ``_execute``.

    ``run(feed)`` returns output arrays that are views into this runner's buffers: valid until the next
    ``run`` of the same runner (copy what must outlive it). Counters for the zero-allocation evidence:
    ``allocations`` (buffers created) and ``rebinds`` (shape changes).
    """

    def __init__(self, name: str, entry: dict):
        self.name, self.entry = name, entry
        self.inputs = {t["name"]: t for t in entry["inputs"]}
        self.outputs = {t["name"]: t for t in entry["outputs"]}
        self.dynamic = {k: tuple(v) for k, v in entry.get("dynamic", {}).items()}
        self.allocations = 0
        self.rebinds = 0
        self._bound_dims: dict | None = None

    def max_shape(self, tensor: dict) -> tuple[int, ...]:
        return tuple(self.dynamic[d][1] if isinstance(d, str) else int(d) for d in tensor["shape"])

    def shape(self, tensor: dict, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else int(d) for d in tensor["shape"])

    def check(self, feed: dict[str, np.ndarray]) -> dict[str, int]:
        """Validate ``feed``; return the values of the named dynamic dims."""
        missing, extra = set(self.inputs) - set(feed), set(feed) - set(self.inputs)
        if missing or extra:
            raise RunnerError(f"graph {self.name}: feed has {sorted(feed)}, expected inputs {sorted(self.inputs)}")
        dims: dict[str, int] = {}
        for name, spec in self.inputs.items():
            a = feed[name]
            if a.dtype != np.dtype(spec["dtype"]):
                raise RunnerError(f"graph {self.name}: input {name} has dtype {a.dtype}, expected {spec['dtype']}")
            if a.ndim != len(spec["shape"]):
                raise RunnerError(f"graph {self.name}: input {name} has shape {a.shape}, expected {spec['shape']}")
            for size, d in zip(a.shape, spec["shape"]):
                if isinstance(d, str):
                    if dims.setdefault(d, size) != size:
                        raise RunnerError(f"graph {self.name}: dim {d} is {dims[d]} in one input, {size} in {name}")
                    lo, hi = self.dynamic.get(d, (1, size))
                    if not lo <= size <= hi:
                        raise RunnerError(f"graph {self.name}: input {name} dim {d} = {size} is outside the "
                                          f"built range [{lo}, {hi}]")
                elif size != d:
                    raise RunnerError(f"graph {self.name}: input {name} has shape {a.shape}, expected {spec['shape']}")
        return dims

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dims = self.check(feed)
        if dims != self._bound_dims:
            self._bind(dims)
            self._bound_dims = dims
            self.rebinds += 1
        return self._execute(feed)

    def _bind(self, dims: dict[str, int]) -> None:
        raise NotImplementedError

    def _execute(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def buffer_pointers(self) -> dict[str, int]:
        """Address of every bound buffer (the zero-allocation evidence: they never change)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def buffer_group(graph: str) -> str:
    """Graphs whose buffers one thread may share: the heads run one after another, and the decode loop
    consumes a head's outputs before the next head runs. The backbone's output lives through all levels."""
    return "head" if graph.startswith("head_") else graph


def shared_buffer_sizes(entries: dict[str, dict]) -> dict[tuple[str, str, str], int]:
    """(group, tensor name, dtype) -> elements of the largest shape any graph of the group needs."""
    sizes: dict[tuple[str, str, str], int] = {}
    for graph, entry in entries.items():
        ranges = {k: v[1] for k, v in entry.get("dynamic", {}).items()}
        for t in entry["inputs"] + entry["outputs"]:
            n = int(np.prod([ranges[d] if isinstance(d, str) else int(d) for d in t["shape"]]))
            key = (buffer_group(graph), t["name"], t["dtype"])
            sizes[key] = max(sizes.get(key, 0), n)
    return sizes


def prefix_view(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous view of the first prod(shape) elements of a flat buffer."""
    return buffer[:int(np.prod(shape))].reshape(shape)


class GraphSteps:
    """DecodeSteps over one runner per graph (``backbone``, ``head_0`` ..)."""

    def __init__(self, runners: dict[str, GraphRunner], buffers=None):
        self.runners, self.buffers = runners, buffers          # buffers: the thread's pool, freed on close

    def backbone(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.runners["backbone"].run(feed)["hidden"]

    def head_step(self, level, state, code, hidden):
        feed = {"state": state, "hidden": hidden} if code is None else {"state": state, "code": code, "hidden": hidden}
        out = self.runners[f"head_{level}"].run(feed)
        return out["next_state"], out["log_probs"]

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        if hasattr(self.buffers, "free"):
            self.buffers.free()
