"""TensorRT engines from the ONNX graphs: a thin builder over the TensorRT 10.8+ Python API.

Networks are strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED): every layer runs in the
type the ONNX graph gives it, so an fp16 or int8 (Q/DQ) engine comes from an fp16 or int8 graph and
no builder precision flag is set (int8 engines come from ``precision.int8_tensorrt_graphs``: Q/DQ on
the fp16 graph). TensorRT is imported lazily: the rest of the build runs without it, and a missing
piece (TensorRT, Polygraphy, the CUDA runtime, a GPU) is one Unavailable the build turns into
"engines skipped".

Each engine has one optimization profile: min and max from the manifest's ranges (the --max-* options),
opt at a typical request (``typical_dims``: one history of the median length, beam 20), where kernels
are tuned. The timing cache is read from and written back to one file the caller names (the build
keeps it in the artifact and starts a --force rebuild from the previous artifact's)."""

from __future__ import annotations

import os
from pathlib import Path
from statistics import median
from typing import Sequence

from nezha.runtime.backends import cuda as C
from nezha.runtime.backends.tensorrt import HARDWARE_LEVELS, Compatibility, load_tensorrt, version_tuple
from nezha.runtime.errors import StepError, Unavailable
from nezha.runtime.manifest import EngineEntry, GraphEntry, Limits

TYPICAL_BEAM = 20
SAME_CC_SINCE = (10, 9)        # HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY appeared in TensorRT 10.9


def gpu_for_engines(device_id: int = 0):
    """Everything an engine build needs, or Unavailable naming the missing piece -> (tensorrt
    module, the GPU's C.Device)."""
    try:
        trt = load_tensorrt()
        return trt, C.device(device_id)
    except Unavailable as e:
        raise Unavailable(str(e)) from None


def typical_dims(levels: int, limits: Limits, history_lengths: Sequence[int] = ()) -> dict[str, int]:
    """The request the engines are tuned for (each profile's opt): one history of the median length of
    ``history_lengths`` (capped at max_history; half of max_history if none are given) at beam 20
    (capped at max_beam). Dim names are the manifest's: batch, tokens, beams, parents."""
    history = min(limits.max_history, int(median(history_lengths)) if history_lengths else max(1, limits.max_history // 2))
    beams = min(TYPICAL_BEAM, limits.max_beam)
    # a history of h items is h code groups of L tokens plus the L placeholders
    return {"batch": 1, "tokens": (max(1, history) + 1) * levels, "beams": beams, "parents": beams}


def profile_shapes(graph: GraphEntry, typical: dict[str, int] | None = None) -> dict[str, list[list[int]]]:
    """Manifest graph entry -> {input name: [min, opt, max] shapes}: min and max are the manifest's
    range of each named dim, opt its ``typical`` value clamped into the range (max when not given)."""
    typical = typical or {}
    shapes = {}
    for t in graph.inputs:
        dims = []
        for d in t.shape:
            if isinstance(d, str):
                lo, hi = graph.dynamic[d]
                dims.append([lo, min(hi, max(lo, typical.get(d, hi))), hi])
            else:
                dims.append([d, d, d])
        shapes[t.name] = [[d[k] for d in dims] for k in range(3)]
    return shapes


def set_timing_cache(trt, config, timing_cache: Path | None):
    """Give ``config`` the timing cache read from ``timing_cache`` (a new one when the file is missing or
    TensorRT refuses it, e.g. written by another GPU or version) -> (cache, note or None)."""
    data = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache, None
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise StepError("TensorRT refused a new, empty timing cache")
    return cache, f"timing cache {timing_cache} was refused by TensorRT (another GPU or version?): started a new one"


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def engine_entry(file: str, compatibility: Compatibility, profiles: tuple[dict, ...]) -> EngineEntry:
    """The manifest's engine entry: the file, its profiles and the compatibility record the runtime enforces."""
    return EngineEntry(file, compatibility.device.compute_capability, compatibility.tensorrt, True, profiles,
                       {"name": compatibility.device.name, "uuid": compatibility.device.uuid}, compatibility.hardware)


def engine_from_onnx(onnx_path: Path, plan_path: Path, graph: GraphEntry, file: str, timing_cache: Path | None = None,
                     workspace_bytes: int | None = None, typical: dict[str, int] | None = None,
                     hardware: str = "none", notes: list | None = None) -> EngineEntry:
    """Parse ``onnx_path`` into a strongly typed network, build an engine for the input ranges of the
    manifest ``graph`` entry (opt at ``typical``) and write ``plan_path`` atomically. ``timing_cache`` is
    read if present and written back. ``hardware``: a HARDWARE_LEVELS key. Returns the manifest's engine
    entry (``file``: the plan's path in the artifact); Unavailable when a piece is missing."""
    trt, device = gpu_for_engines()
    if hardware not in HARDWARE_LEVELS:
        raise StepError(f"hardware compatibility {hardware!r}; allowed: {', '.join(HARDWARE_LEVELS)}")
    if hardware == "same_compute_capability" and version_tuple(trt.__version__) < SAME_CC_SINCE:
        raise StepError(f"hardware compatibility same_compute_capability needs TensorRT 10.9+, "
                        f"this is {trt.__version__}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):          # from the file: external weights resolve beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StepError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_LEVELS[hardware])
    shapes = profile_shapes(graph, typical)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise StepError(f"TensorRT refused the optimization profile {shapes} of {onnx_path}")
    cache, note = set_timing_cache(trt, config, timing_cache)
    if note and notes is not None:
        notes.append(note)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StepError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    write_atomically(plan_path, bytes(serialized))
    if timing_cache is not None:
        write_atomically(timing_cache, bytes(cache.serialize()))
    return engine_entry(file, Compatibility(trt.__version__, device, hardware),
                        ({name: {"min": lo, "opt": opt, "max": hi} for name, (lo, opt, hi) in shapes.items()},))


def engine_sources(graphs: dict[str, dict[str, Path]], fp32: dict[str, Path], scratch: Path) -> dict[str, dict[str, Path]]:
    """precision -> graph -> the ONNX file its engine is built from: the artifact's own ``graphs``, except
    int8, whose engines come from its Q/DQ pairs on the fp16 version of the ``fp32`` graphs (written
    under ``scratch``)."""
    from .precision import CPU_ONLY_PRECISIONS, int8_tensorrt_graphs

    sources = {p: g for p, g in graphs.items() if p not in CPU_ONLY_PRECISIONS}
    if "int8" in sources:
        sources["int8"] = int8_tensorrt_graphs(graphs["int8"], fp32, scratch / "int8")
    return sources


def engines_from_sources(sources: dict[str, dict[str, Path]], specs: dict[str, GraphEntry], root: Path,
                         timing_cache: Path, typical: dict[str, int], hardware: str = "none",
                         notes: list | None = None) -> dict[str, dict[str, EngineEntry]]:
    """Build every engine of ``sources`` (engine_sources) into ``root``/engines/<precision>/<graph>.plan,
    sharing one ``timing_cache`` -> precision -> graph -> manifest engine entry."""
    engines: dict[str, dict[str, EngineEntry]] = {}
    for p, graphs in sources.items():
        for name, onnx_path in graphs.items():
            plan = root / "engines" / p / f"{name}.plan"
            engines.setdefault(p, {})[name] = engine_from_onnx(
                onnx_path, plan, specs[name], plan.relative_to(root).as_posix(), timing_cache=timing_cache,
                typical=typical, hardware=hardware, notes=notes)
    return engines
