"""TensorRT backend (TensorRT 10+, engines built by export/tensorrt.py): each engine is deserialized
once; every thread gets its own execution context, device buffers allocated once for the largest
shapes, tensor addresses set once, input shapes set only when they change, and one CUDA stream.

Device memory and copies go through Polygraphy's thin CUDA wrapper (``polygraphy.cuda``), so the
runtime needs neither torch nor pycuda. Imports are lazy: this module loads without TensorRT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import GraphRunner, prefix_view


class EngineMismatchError(RuntimeError):
    """An engine built for another GPU or TensorRT version: it must be rebuilt, not loaded."""


def _trt():
    try:
        import tensorrt
        from polygraphy import cuda  # noqa: F401
    except ImportError as e:
        raise ImportError("the tensorrt backend needs TensorRT 10+ and Polygraphy on a CUDA machine: "
                          "pip install 'nezha-deploy[tensorrt]'") from e
    return tensorrt


def device_compute_capability() -> str:
    """'major.minor' of GPU 0, from the CUDA runtime."""
    from polygraphy import cuda
    import ctypes
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib = cuda.wrapper().handle
    # cudaDevAttrComputeCapabilityMajor = 75, Minor = 76
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)
    return f"{major.value}.{minor.value}"


def check_sidecar(sidecar_path: Path) -> dict:
    """Refuse an engine whose sidecar names another TensorRT version or GPU compute capability."""
    trt = _trt()
    sidecar = json.loads(Path(sidecar_path).read_text())
    problems = []
    if sidecar.get("tensorrt") != trt.__version__:
        problems.append(f"built with TensorRT {sidecar.get('tensorrt')}, this is {trt.__version__}")
    cc = device_compute_capability()
    if sidecar.get("compute_capability") != cc:
        problems.append(f"built for compute capability {sidecar.get('compute_capability')}, this GPU is {cc}")
    if problems:
        raise EngineMismatchError(f"engine {sidecar_path}: " + "; ".join(problems) +
                                  ": rebuild it with python export/build.py --backend tensorrt on this machine")
    return sidecar


class Engines:
    """Deserialized engines of one precision, shared by all threads."""

    def __init__(self, engine_entries: dict[str, dict], root: Path):
        trt = _trt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {}
        for name, e in engine_entries.items():
            check_sidecar(root / e["sidecar"])
            engine = self.runtime.deserialize_cuda_engine((root / e["file"]).read_bytes())
            if engine is None:
                raise EngineMismatchError(f"TensorRT could not deserialize {root / e['file']}")
            self.engines[name] = engine


class TrtRunner(GraphRunner):
    def __init__(self, name: str, entry: dict, engine):
        from polygraphy import cuda
        super().__init__(name, entry)
        self._cuda = cuda
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self._device: dict[str, object] = {}
        self._host: dict[str, np.ndarray] = {}
        self._views: dict[str, np.ndarray] = {}
        for t in list(self.inputs.values()) + list(self.outputs.values()):
            shape = self.max_shape(t)
            self._device[t["name"]] = cuda.DeviceArray(shape=shape, dtype=np.dtype(t["dtype"]))
            self._host[t["name"]] = np.empty(int(np.prod(shape)), dtype=t["dtype"])
            self.allocations += 2
            # addresses never change: the buffers hold the largest shape
            self.context.set_tensor_address(t["name"], self._device[t["name"]].ptr)

    def _bind(self, dims):
        for name, t in self.inputs.items():
            shape = self.shape(t, dims)
            self.context.set_input_shape(name, shape)
            self._views[name] = prefix_view(self._host[name], shape)
        for name, t in self.outputs.items():
            self._views[name] = prefix_view(self._host[name], self.shape(t, dims))

    def _execute(self, feed):
        for name in self.inputs:
            view = self._views[name]
            np.copyto(view, feed[name])
            self._device[name].resize(view.shape)          # shrinks the view; never reallocates
            self._device[name].copy_from(view, self.stream)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"TensorRT failed to run graph {self.name}")
        for name in self.outputs:
            view = self._views[name]
            self._device[name].resize(view.shape)
            self._device[name].copy_to(view, self.stream)
        self.stream.synchronize()
        return {name: self._views[name] for name in self.outputs}

    def close(self):
        for buf in self._device.values():
            buf.free()
        self.stream.free()
