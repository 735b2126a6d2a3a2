"""TensorRT backend (TensorRT 10.8+, engines built by export/engines.py): each engine is deserialized
once, checked against the machine (``check_compatibility``) and against the manifest (``check_engine_io``:
every tensor's name, mode, dtype, dims and profile); every thread gets its own execution contexts (one
per graph, each with its stream), device buffers allocated once for the largest shapes, page-locked host
buffers, tensor addresses set once, input shapes set only when they change. Every TensorRT call that
reports failure by its return value is checked.

Device memory and copies go through Polygraphy's thin CUDA wrapper (``polygraphy.cuda``), so the
runtime needs neither torch nor pycuda. Imports are lazy: this module loads without TensorRT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, Unavailable
from ..manifest import EngineEntry, GraphEntry
from . import cuda as C
from .base import GraphRunner, GraphSteps, buffer_key, prefix_view, shared_buffer_sizes

MIN_TENSORRT = (10, 8)
# TensorRT's HardwareCompatibilityLevel, as the manifest spells it. "none": the engine runs on the GPU model
# it was built on; "same_compute_capability" (TensorRT >= 10.9): any GPU of that compute capability;
# "ampere_plus": any GPU of compute capability 8.0 or newer.
HARDWARE_LEVELS = {"none": "NONE", "same_compute_capability": "SAME_COMPUTE_CAPABILITY", "ampere_plus": "AMPERE_PLUS"}


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def load_tensorrt():
    """Import tensorrt (>= 10.8) and Polygraphy and find the CUDA runtime -> the tensorrt module.
    Each missing piece is one Unavailable naming it (no GPU is needed to import; see require_gpu)."""
    try:
        import tensorrt
    except ImportError as e:
        raise Unavailable(f"TensorRT is not installed ({e}): {C.INSTALL}") from None
    if version_tuple(tensorrt.__version__) < MIN_TENSORRT:
        raise Unavailable(f"TensorRT {tensorrt.__version__} found; nezha-deploy needs "
                          f"{'.'.join(map(str, MIN_TENSORRT))}+ (strongly typed networks): {C.INSTALL}")
    C.cudart()                          # Polygraphy importable and libcudart loadable, else Unavailable
    return tensorrt


def use_device(device_id: int) -> None:
    C.call("cudaSetDevice", device_id)            # the thread's current GPU: contexts and buffers follow it


# ---------------------------------------------------------------- what an engine needs of the machine

@dataclass(frozen=True)
class Compatibility:
    """The build's record of where an engine runs: the exact TensorRT version, the GPU it was built on
    and the hardware-compatibility level it was built with."""

    tensorrt: str
    device: C.Device
    hardware: str = "none"


def check_compatibility(built: Compatibility, tensorrt_version: str, here: C.Device) -> list[str]:
    """Why an engine built as ``built`` cannot run with TensorRT ``tensorrt_version`` on GPU ``here``
    (empty: it can). TensorRT deserializes only plans of its own exact version; a plan built without a
    hardware-compatibility level runs on the GPU model it was built for (same name and compute
    capability; the UUID, one physical GPU, is recorded but another GPU of the same model is accepted)."""
    problems = []
    if built.tensorrt != tensorrt_version:
        problems.append(f"built with TensorRT {built.tensorrt}, this is {tensorrt_version} (plans are tied "
                        "to the exact version)")
    want, have = built.device, here
    if built.hardware not in HARDWARE_LEVELS:
        problems.append(f"unknown hardware-compatibility level {built.hardware!r}; allowed: {', '.join(HARDWARE_LEVELS)}")
    elif built.hardware == "ampere_plus":
        if version_tuple(have.compute_capability) < (8, 0):
            problems.append(f"built for Ampere or newer GPUs, this GPU ({have.name}) has compute capability "
                            f"{have.compute_capability}")
    elif want.compute_capability != have.compute_capability:
        problems.append(f"built for compute capability {want.compute_capability}, this GPU is "
                        f"{have.compute_capability}" + (f" ({want.name} vs {have.name})" if want.name else ""))
    elif built.hardware == "none" and want.name != have.name:
        problems.append(f"built on a {want.name}, this GPU is a {have.name} (build with hardware compatibility "
                        "same_compute_capability to share engines between GPU models)")
    return problems


def compatibility_of(entry: EngineEntry) -> Compatibility:
    """The compatibility record of a manifest engine entry (the GPU it was built on, the TensorRT version and
    the hardware-compatibility level)."""
    return Compatibility(entry.tensorrt, C.Device(entry.device["name"], entry.device["uuid"], entry.compute_capability),
                         entry.hardware_compatibility)


def check_engine(entry: EngineEntry, device_id: int = 0) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU (ArtifactError)."""
    trt = load_tensorrt()
    built, here = compatibility_of(entry), C.device(device_id)
    if not built.device.name:                   # an entry without the GPU's name (tests): compare the rest
        here = C.Device("", here.uuid, here.compute_capability)
    if problems := check_compatibility(built, trt.__version__, here):
        raise ArtifactError(f"engine {entry.file}: " + "; ".join(problems) +
                            ": rebuild it with python export/build.py --backend tensorrt on this machine")


# ---------------------------------------------------------------- what an engine holds vs the manifest

@dataclass(frozen=True)
class EngineTensor:
    """One I/O tensor of a deserialized engine: mode 'input' or 'output', NumPy dtype name, dims (-1:
    dynamic) and, for inputs, the (min, opt, max) shapes of optimization profile 0."""

    name: str
    mode: str
    dtype: str
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], ...] | None = None


def describe_engine(engine, trt) -> tuple[int, list[EngineTensor]]:
    """A deserialized engine -> (number of optimization profiles, its I/O tensors in engine order)."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        profile = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, 0)) if is_input else None
        tensors.append(EngineTensor(name, "input" if is_input else "output",
                                    np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
                                    tuple(engine.get_tensor_shape(name)), profile))
    return engine.num_optimization_profiles, tensors


def engine_io_problems(profiles: int, tensors: list[EngineTensor], graph: GraphEntry, entry: EngineEntry) -> list[str]:
    """Every way an engine's tensors differ from what the manifest's graph entry (names, order-free
    modes, dtypes, dims) and engine entry (profile shapes) promise the runtime's buffers; empty if none.
    Each problem names its tensor."""
    problems = [] if profiles == len(entry.profiles) == 1 else [
        f"{profiles} optimization profiles, the manifest records {len(entry.profiles)} (expected 1)"]
    want = {t.name: ("input", t) for t in graph.inputs} | {t.name: ("output", t) for t in graph.outputs}
    have = {t.name: t for t in tensors}
    problems += [f"tensor {n!r} ({want[n][0]}) is missing" for n in want if n not in have]
    problems += [f"tensor {n!r} ({have[n].mode}) is not in the manifest" for n in have if n not in want]
    recorded = entry.profiles[0] if entry.profiles else {}
    for name in [n for n in want if n in have]:
        mode, spec = want[name]
        t = have[name]
        if t.mode != mode or t.dtype != spec.dtype:
            problems.append(f"tensor {name!r} is {t.mode} {t.dtype}, the manifest says {mode} {spec.dtype}")
            continue
        dims_ok = len(t.shape) == len(spec.shape) and all(
            e == d if isinstance(d, int) else e == -1 or graph.dynamic[d][0] == e == graph.dynamic[d][1]
            for e, d in zip(t.shape, spec.shape))
        if not dims_ok:
            problems.append(f"tensor {name!r} has dims {list(t.shape)}, the manifest says {list(spec.shape)}")
            continue
        if mode == "input":
            lo, hi = tuple(graph.dynamic[d][0] if isinstance(d, str) else d for d in spec.shape), graph.max_shape(spec)
            r = recorded.get(name)
            if t.profile is None or len(t.profile) != 3 or any(a > b for a, b in zip(t.profile[0], lo)) \
                    or any(a < b for a, b in zip(t.profile[2], hi)):
                problems.append(f"tensor {name!r} accepts shapes {t.profile} (min, opt, max), the manifest's "
                                f"range is {list(lo)} .. {list(hi)}")
            elif r is None or [list(s) for s in t.profile] != [list(r["min"]), list(r["opt"]), list(r["max"])]:
                problems.append(f"tensor {name!r} has profile {[list(s) for s in t.profile]}, the manifest "
                                f"records {r}")
    return problems


def check_engine_io(engine, trt, graph: GraphEntry, entry: EngineEntry) -> None:
    """ArtifactError listing every tensor of ``engine`` that differs from the manifest."""
    if problems := engine_io_problems(*describe_engine(engine, trt), graph, entry):
        raise ArtifactError(f"engine {entry.file} does not match the manifest: {'; '.join(problems)}: rebuild it")


# ---------------------------------------------------------------- engines, buffers, runners

class Engines:
    """Deserialized engines of one precision, shared by all threads. ``paths``: graph -> engine file.
    With ``graphs`` (graph -> manifest entry) every engine's tensors are checked here, at load;
    otherwise by the first ``trt_steps``."""

    def __init__(self, entries: dict[str, EngineEntry], paths: dict[str, Path], device_id: int = 0,
                 graphs: dict[str, GraphEntry] | None = None):
        trt = self.trt = load_tensorrt()
        C.require_gpu(device_id)
        use_device(device_id)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.entries, self.engines, self.checked = entries, {}, False
        for name, entry in entries.items():
            check_engine(entry, device_id)
            engine = self.runtime.deserialize_cuda_engine(Path(paths[name]).read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT could not deserialize {entry.file} (see the log above)")
            self.engines[name] = engine
        if graphs is not None:
            self.check(graphs)

    def check(self, graphs: dict[str, GraphEntry]) -> None:
        if not self.checked:
            for name, engine in self.engines.items():
                check_engine_io(engine, self.trt, graphs[name], self.entries[name])
            self.checked = True


class DeviceBuffers:
    """One thread's device buffers and page-locked host staging buffers, allocated once for the largest
    shapes and shared by its heads (they run one after another on one stream)."""

    def __init__(self, entries: dict[str, GraphEntry]):
        from polygraphy import cuda
        sizes = shared_buffer_sizes(entries)
        self.device, self.pinned = {}, {}
        try:
            for key, n in sizes.items():
                self.device[key] = cuda.DeviceArray(shape=(n,), dtype=np.dtype(key[2]))
                self.pinned[key] = C.PinnedBuffer(n, key[2])
        except BaseException:
            self.free()
            raise

    def get(self, graph: str, tensor):
        key = buffer_key(graph, tensor)
        return self.device[key], self.pinned[key].array

    def free(self) -> None:
        for buf in self.device.values():
            buf.free()
        for buf in self.pinned.values():
            buf.free()
        self.device, self.pinned = {}, {}


class TrtRunner(GraphRunner):
    """One engine on one thread: its own execution context and stream (each runner of a thread has
    one; they run one after another), addresses of the thread's device buffers set once."""

    def __init__(self, name: str, entry: GraphEntry, engine, buffers: DeviceBuffers):
        from polygraphy import cuda
        super().__init__(name, entry)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise Unavailable(f"TensorRT could not create an execution context for {name} (GPU memory?)")
        self.stream = cuda.Stream()
        self._device, self._host = {}, {}
        self._views: dict[str, np.ndarray] = {}
        for t in entry.inputs + entry.outputs:
            self._device[t.name], self._host[t.name] = buffers.get(name, t)
            # addresses never change: the buffers hold the largest shape
            if not self.context.set_tensor_address(t.name, self._device[t.name].ptr):
                raise ArtifactError(f"graph {name}: TensorRT refused the address of tensor {t.name!r}")

    def _bind(self, dims):
        for name, t in self.inputs.items():
            shape = self.shape(t, dims)
            if not self.context.set_input_shape(name, shape):
                raise ArtifactError(f"graph {self.name}: TensorRT refused shape {list(shape)} for input "
                                    f"{name!r} (outside the engine's profile?)")
            self._views[name] = prefix_view(self._host[name], shape)
        for name, t in self.outputs.items():
            shape = self.shape(t, dims)
            engine_shape = tuple(self.context.get_tensor_shape(name))
            if engine_shape != shape:                   # the buffers and copies assume the manifest's shape
                raise ArtifactError(f"graph {self.name}: output {name!r} has shape {list(engine_shape)} "
                                    f"for these inputs, the manifest says {list(shape)}")
            self._views[name] = prefix_view(self._host[name], shape)

    def _execute(self, feed):
        for name in self.inputs:
            view = self._views[name]
            np.copyto(view, feed[name])
            self._device[name].resize(view.shape)          # a shared buffer: set its shape; never reallocates
            self._device[name].copy_from(view, self.stream)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"TensorRT failed to run graph {self.name} (see the TensorRT log)")
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
    engines.check(entries)                                   # once per Engines, if its loader could not
    use_device(device_id)                                    # CUDA's current device is per thread
    buffers = DeviceBuffers(entries)
    return GraphSteps({g: TrtRunner(g, e, engines.engines[g], buffers) for g, e in entries.items()}, buffers)
