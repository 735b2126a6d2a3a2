"""TensorRT engines from the ONNX graphs: a thin builder over the TensorRT 10+ Python API.

Networks are strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED): every layer runs in the
type the ONNX graph gives it, so an fp16 or int8 (Q/DQ) engine comes from an fp16 or int8 graph and
no builder precision flag is set. TensorRT is imported lazily: the rest of the build runs without it.
"""

from __future__ import annotations

from pathlib import Path

from nezha.runtime.errors import NezhaError
from nezha.runtime.manifest import EngineEntry, GraphEntry

MIN_MAJOR = 10


class TensorRTUnavailable(NezhaError, RuntimeError):
    """TensorRT or a CUDA GPU is missing here; the engine step is skipped, the build goes on."""


class EngineBuildError(NezhaError, RuntimeError):
    """TensorRT could not parse a graph or build its engine; the message carries the parser's errors."""


def load_tensorrt():
    """Import tensorrt (10+) and check for a GPU -> (module, compute capability "major.minor")."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT is not installed ({e}); pip install 'nezha-deploy[tensorrt]' "
                                  "on a machine with an NVIDIA GPU") from None
    major = int(trt.__version__.split(".")[0])
    if major < MIN_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; nezha-deploy needs {MIN_MAJOR}+ "
                                  "(strongly typed networks)")
    import torch  # the build already depends on torch; it is the simplest way to ask about the GPU

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU visible (torch.cuda.is_available() is False): engines must be "
                                  "built on the GPU they will run on")
    cc = torch.cuda.get_device_capability(0)
    return trt, f"{cc[0]}.{cc[1]}"


def profile_shapes(graph: GraphEntry) -> dict[str, list[list[int]]]:
    """Manifest graph entry -> {input name: [min, opt, max] shapes}. opt is max: one profile tuned
    for the largest request is the safe default for a latency-bound service with dynamic batches."""
    shapes = {}
    for t in graph.inputs:
        dims = [[*graph.dynamic[d], graph.dynamic[d][1]] if isinstance(d, str) else [d, d, d] for d in t.shape]
        shapes[t.name] = [[d[k] for d in dims] for k in range(3)]
    return shapes


def engine_from_onnx(onnx_path: Path, plan_path: Path, graph: GraphEntry, file: str, timing_cache: Path | None = None,
                     workspace_bytes: int | None = None) -> EngineEntry:
    """Parse ``onnx_path`` into a strongly typed network, build an engine for the input ranges of the
    manifest ``graph`` entry and write ``plan_path``. ``timing_cache`` is read if present and written
    back. Returns the manifest's engine entry (``file``: the plan's path in the artifact)."""
    trt, compute_capability = load_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):          # from the file: external weights resolve beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    shapes = profile_shapes(graph)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if timing_cache:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return EngineEntry(file, compute_capability, trt.__version__, True,
                       ({name: {"min": lo, "opt": opt, "max": hi} for name, (lo, opt, hi) in shapes.items()},))
