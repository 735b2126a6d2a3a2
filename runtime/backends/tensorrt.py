"""TensorRT backend (TensorRT 10+, engines built by export/tensorrt.py): each engine is deserialized
once; every thread gets its own execution contexts (one per graph, each with its stream), device
buffers allocated once for the largest shapes, tensor addresses set once, input shapes set only when
they change.

Device memory and copies go through Polygraphy's thin CUDA wrapper (``polygraphy.cuda``), so the
runtime needs neither torch nor pycuda. Imports are lazy: this module loads without TensorRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, NezhaError
from ..manifest import EngineEntry, GraphEntry
from .base import GraphRunner, GraphSteps, buffer_key, prefix_view, shared_buffer_sizes


class EngineMismatchError(NezhaError, RuntimeError):
    """An engine built for another GPU or TensorRT version: it must be rebuilt, not loaded."""


def _trt():
    try:
        import tensorrt
        from polygraphy import cuda  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable("the tensorrt backend needs TensorRT 10+ and Polygraphy on a CUDA machine: "
                          "pip install 'nezha-deploy[tensorrt]'") from e
    return tensorrt


def _cuda_call(name: str, *args) -> None:
    from polygraphy import cuda
    status = getattr(cuda.wrapper().handle, name)(*args)
    if status != 0:
        raise BackendUnavailable(f"CUDA runtime call {name} failed with error {status}")


def use_device(device_id: int) -> None:
    """Make GPU ``device_id`` this thread's current CUDA device (contexts and buffers follow it)."""
    _cuda_call("cudaSetDevice", device_id)


def device_compute_capability(device_id: int = 0) -> str:
    """'major.minor' of GPU ``device_id``, from the CUDA runtime."""
    import ctypes
    major, minor = ctypes.c_int(), ctypes.c_int()
    # cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76
    _cuda_call("cudaDeviceGetAttribute", ctypes.byref(major), 75, device_id)
    _cuda_call("cudaDeviceGetAttribute", ctypes.byref(minor), 76, device_id)
    return f"{major.value}.{minor.value}"


def check_engine(entry: EngineEntry, device_id: int = 0) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU compute capability."""
    trt = _trt()
    problems = []
    if entry.tensorrt != trt.__version__:
        problems.append(f"built with TensorRT {entry.tensorrt}, this is {trt.__version__}")
    cc = device_compute_capability(device_id)
    if entry.compute_capability != cc:
        problems.append(f"built for compute capability {entry.compute_capability}, this GPU is {cc}")
    if problems:
        raise EngineMismatchError(f"engine {entry.file}: " + "; ".join(problems) +
                                  ": rebuild it with python export/build.py --backend tensorrt on this machine")


class Engines:
    """Deserialized engines of one precision, shared by all threads. ``paths``: graph -> engine file."""

    def __init__(self, entries: dict[str, EngineEntry], paths: dict[str, Path], device_id: int = 0):
        trt = _trt()
        use_device(device_id)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {}
        for name, entry in entries.items():
            check_engine(entry, device_id)
            engine = self.runtime.deserialize_cuda_engine(Path(paths[name]).read_bytes())
            if engine is None:
                raise EngineMismatchError(f"TensorRT could not deserialize {entry.file}")
            self.engines[name] = engine


class DeviceBuffers:
    """One thread's device buffers and pinned-free host staging buffers, allocated once for the largest
    shapes and shared by its heads (they run one after another on one stream)."""

    def __init__(self, entries: dict[str, GraphEntry]):
        from polygraphy import cuda
        sizes = shared_buffer_sizes(entries)
        self.device = {key: cuda.DeviceArray(shape=(n,), dtype=np.dtype(key[2])) for key, n in sizes.items()}
        self.host = {key: np.empty(n, dtype=key[2]) for key, n in sizes.items()}

    def get(self, graph: str, tensor):
        key = buffer_key(graph, tensor)
        return self.device[key], self.host[key]

    def free(self) -> None:
        for buf in self.device.values():
            buf.free()


class TrtRunner(GraphRunner):
    """One engine on one thread: its own execution context and stream (each runner of a thread has
    one; they run one after another), addresses of the thread's device buffers set once."""

    def __init__(self, name: str, entry: GraphEntry, engine, buffers: DeviceBuffers):
        from polygraphy import cuda
        super().__init__(name, entry)
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self._device, self._host = {}, {}
        self._views: dict[str, np.ndarray] = {}
        for t in entry.inputs + entry.outputs:
            self._device[t.name], self._host[t.name] = buffers.get(name, t)
            # addresses never change: the buffers hold the largest shape
            self.context.set_tensor_address(t.name, self._device[t.name].ptr)

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
            self._device[name].resize(view.shape)          # a shared buffer: set its shape; never reallocates
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
        self.stream.free()


def trt_steps(entries: dict[str, GraphEntry], engines: Engines, device_id: int = 0) -> GraphSteps:
    """One thread's runners over shared ``engines``: the graphs of ``entries`` bound to one buffer set."""
    use_device(device_id)                                    # CUDA's current device is per thread
    buffers = DeviceBuffers(entries)
    return GraphSteps({g: TrtRunner(g, e, engines.engines[g], buffers) for g, e in entries.items()}, buffers)
