"""The contract every backend runner meets: it knows its graph's tensors (from the manifest), checks a
feed against them, runs over buffers allocated once for the largest shapes, and closes with ``with``.
Here too the runner over host buffers that ONNX Runtime binds (``OrtRunner``; its sessions are opened in
backends/onnxruntime.py), so that a request runs through one module of runners; TensorRT's runner, over
device buffers, is in backends/tensorrt.py."""

from __future__ import annotations

import contextlib
import re

import numpy as np

from ..errors import GraphRunError, InputError
from ..manifest import GraphEntry, Tensor


_DEVICE = re.compile(r"(cpu|cuda)(?::([0-9]{1,3}))?")


def parse_device(device) -> tuple[str, int]:
    """'cpu', 'cuda' or 'cuda:N' -> (kind, index)."""
    m = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if not m or (m.group(1) == "cpu" and m.group(2)):
        raise InputError(f"device {device!r}; allowed: cpu, cuda, cuda:N")
    return m.group(1), int(m.group(2) or 0)


class GraphRunner(contextlib.AbstractContextManager):
    """One graph of an artifact on one thread. Subclasses implement ``_bind`` and ``_execute``.

    ``run(feed)`` returns output arrays that are views into this thread's buffers (allocated once by
    the backend's buffer pool): valid until the next ``run`` of a graph of the same buffer group (copy
    what must outlive it). ``rebinds`` counts shape changes (the only time bindings are touched).
    """

    def __init__(self, name: str, entry: GraphEntry):
        self.name, self.entry = name, entry
        self.inputs = {t.name: t for t in entry.inputs}
        self.outputs = {t.name: t for t in entry.outputs}
        self.dynamic = entry.dynamic
        self.rebinds = 0
        self._bound_dims: dict | None = None

    def shape(self, tensor: Tensor, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in tensor.shape)

    def check(self, feed: dict[str, np.ndarray]) -> dict[str, int]:
        """Validate ``feed``; return the values of the named dynamic dims."""
        missing, extra = set(self.inputs) - set(feed), set(feed) - set(self.inputs)
        if missing or extra:
            raise InputError(f"graph {self.name}: feed has {sorted(feed)}, expected inputs {sorted(self.inputs)}")
        dims: dict[str, int] = {}
        for name, spec in self.inputs.items():
            a = feed[name]
            if a.dtype != np.dtype(spec.dtype):
                raise InputError(f"graph {self.name}: input {name} has dtype {a.dtype}, expected {spec.dtype}")
            if a.ndim != len(spec.shape):
                raise InputError(f"graph {self.name}: input {name} has shape {a.shape}, expected {list(spec.shape)}")
            for size, d in zip(a.shape, spec.shape):
                if isinstance(d, str):
                    if dims.setdefault(d, size) != size:
                        raise InputError(f"graph {self.name}: dim {d} is {dims[d]} in one input, {size} in {name}")
                    lo, hi = self.dynamic.get(d, (1, size))
                    if not lo <= size <= hi:
                        raise InputError(f"graph {self.name}: input {name} dim {d} = {size} is outside the "
                                         f"built range [{lo}, {hi}]")
                elif size != d:
                    raise InputError(f"graph {self.name}: input {name} has shape {a.shape}, expected {list(spec.shape)}")
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

    def close(self) -> None:
        pass

    def __exit__(self, *exc):               # __enter__ (returns self): AbstractContextManager's
        self.close()


def buffer_group(graph: str) -> str:
    """Graphs whose buffers one thread may share: the heads run one after another, and the decode loop
    consumes a head's outputs before the next head runs. The backbone's output lives through all levels."""
    return "head" if graph.startswith("head_") else graph


def buffer_key(graph: str, tensor: Tensor) -> tuple[str, str, str]:
    return buffer_group(graph), tensor.name, tensor.dtype


def shared_buffer_sizes(entries: dict[str, GraphEntry]) -> dict[tuple[str, str, str], int]:
    """(group, tensor name, dtype) -> elements of the largest shape any graph of the group needs."""
    sizes: dict[tuple[str, str, str], int] = {}
    for graph, entry in entries.items():
        for t in entry.inputs + entry.outputs:
            key = buffer_key(graph, t)
            sizes[key] = max(sizes.get(key, 0), int(np.prod(entry.max_shape(t))))
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

    def head_step(self, level, parents, parent, code, hidden):
        feed = {"root": parents, "hidden": hidden} if level == 0 else \
            {"parent_state": parents, "parent": parent, "code": code, "hidden": hidden}
        out = self.runners[f"head_{level}"].run(feed)
        return out.get("state"), out["log_probs"]

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        if self.buffers is not None:
            self.buffers.free()


class HostBuffers:
    """One thread's flat host buffers, allocated once for the largest shapes and shared by its heads."""

    def __init__(self, entries: dict[str, GraphEntry]):
        self.buffers = {key: np.empty(n, dtype=key[2]) for key, n in shared_buffer_sizes(entries).items()}

    def get(self, graph: str, tensor) -> np.ndarray:
        return self.buffers[buffer_key(graph, tensor)]

    def free(self) -> None:
        self.buffers = {}


class OrtRunner(GraphRunner):
    """One graph on one thread: its IOBinding points ONNX Runtime at views of the thread's buffers, so
    inputs are copied in place and outputs are written in place (no output is allocated per run)."""

    def __init__(self, name: str, entry: GraphEntry, session, buffers: HostBuffers):
        super().__init__(name, entry)
        self.session = session
        self.binding = session.io_binding()
        self._buffers = {t.name: buffers.get(name, t) for t in entry.inputs + entry.outputs}
        self._views: dict[str, np.ndarray] = {}

    def _bind(self, dims):
        """Bind the tensors whose shape changed (all at first; then e.g. only a head's parent_state)."""
        for tensors, bind in ((self.inputs, self.binding.bind_input), (self.outputs, self.binding.bind_output)):
            for name, t in tensors.items():
                shape = self.shape(t, dims)
                if name in self._views and self._views[name].shape == shape:
                    continue
                view = self._views[name] = prefix_view(self._buffers[name], shape)
                bind(name, "cpu", 0, view.dtype, view.shape, view.ctypes.data)

    def _execute(self, feed):
        for name in self.inputs:
            np.copyto(self._views[name], feed[name])
        try:
            self.session.run_with_iobinding(self.binding)
        except RuntimeError as e:          # ONNX Runtime's kernel failures (e.g. a Gather index out of range)
            raise GraphRunError(f"graph {self.name} failed in ONNX Runtime: {' '.join(str(e).split())}") from None
        return {name: self._views[name] for name in self.outputs}
