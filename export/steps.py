"""The build's steps. Each turns the build state into the next one and is named for what it makes;
``export/build.py`` declares which run (by the options) and reports their progress."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nezha.calibration import (
    INT8_CPU_SETTINGS,
    CalibrationReader,
    int8_cpu_from_onnx,
    int8_from_onnx,
    validate_int8,
)
from nezha.model.checkpoint import load_catalog, load_checkpoint
from nezha.runtime.artifact import external_data_path, write_manifest
from nezha.runtime.manifest import (
    MAX_TENSOR_BYTES,
    EngineEntry,
    Manifest,
    TableEntry,
    largest_tensor,
)
from nezha.runtime.contract import Recommender
from nezha.runtime.errors import InputError, StepError, Unavailable

from .engines import engine_sources, engines_from_sources, gpu_for_engines, typical_dims
from .graphs import graph_specs, model_limits, onnx_from_model
from .options import BuildOptions
from .precision import CPU_ONLY_PRECISIONS, INT8_BACKENDS, fp16_from_onnx, precision_entry
from .tables import tables_from_catalog
from .validate import (
    histories_from_data,
    ort_validation_steps,
    synthetic_histories,
    trt_validation_steps,
    validate_artifact,
    validation_feeds,
)

VALIDATION = "validation.json"
CALIBRATION_CACHE = "calibration/cache.json"      # inside the artifact; a --force rebuild starts from it
CALIBRATION_SEED = 0
TIMING_CACHE = "engines/timing.cache"             # inside the artifact; a --force rebuild starts from it


@dataclass
class State:
    """What the steps have made so far, in the staging folder ``tmp``."""

    options: BuildOptions
    tmp: Path
    model: object = None
    catalog: object = None
    limits: object = None
    reader: CalibrationReader | None = None
    tables: dict[str, TableEntry] = field(default_factory=dict)
    graphs: dict[str, dict[str, Path]] = field(default_factory=dict)          # precision -> graph -> file
    quantization: dict[str, dict] = field(default_factory=dict)               # precision -> manifest settings
    histories: list = field(default_factory=list)
    history_source: str = "synthetic"
    hidden_state: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    engines: dict[str, dict[str, EngineEntry]] = field(default_factory=dict)
    engines_note: dict[str, str] = field(default_factory=dict)                # precision or "all" -> why none
    manifest: Manifest | None = None


def model_from_checkpoint(s: State, notes: list) -> State:
    o = s.options
    s.model = load_checkpoint(o.checkpoint)
    s.catalog = load_catalog(o.index, o.checkpoint, s.model.layout)
    s.limits = model_limits(s.model, o.max_history, o.max_batch, o.max_beam)
    tensor, size = largest_tensor(s.model.layout, s.limits)
    if size > MAX_TENSOR_BYTES:                # say so before the export, not when validation allocates
        raise InputError(f"--max-batch {o.max_batch} x --max-beam {o.max_beam}: {tensor} would need "
                         f"{size / 2**30:.1f} GiB at its largest shape (limit {MAX_TENSOR_BYTES >> 30} GiB)")
    if o.index is None:          # the reference format stores SIDs only: item ids become positions in that file
        notes.append(f"no --index: item ids are positions 0..{len(s.catalog.item_ids) - 1} in "
                     f"ava_sid{s.model.layout.levels}.pt; pass the item index to serve real item ids")
    if isinstance(o.histories, Path):
        s.history_source = f"data:{o.histories.name}"
        s.histories = histories_from_data(o.histories, s.catalog, o.validation_users)
    elif o.histories is None:
        s.histories = synthetic_histories(s.catalog, o.validation_users, o.max_history)
    else:
        s.history_source, s.histories = "given", list(o.histories)
    return s


def calibration_feeds_from_data(s: State, notes: list) -> State:
    o = s.options
    s.reader = CalibrationReader.from_file(o.calibration_data, s.catalog, s.model.layout, o.max_history,
                                           o.calibration_size, seed=CALIBRATION_SEED, progress=False)
    notes.append(f"{s.reader.samples} histories from {o.calibration_data} (train split, seed {CALIBRATION_SEED}), "
                 f"{len(s.reader)} batches")
    return s


def tables_from_catalog_step(s: State, notes: list) -> State:
    s.tables = {n: TableEntry(e["file"], e["dtype"], tuple(e["shape"]))
                for n, e in tables_from_catalog(s.catalog, s.model.layout, s.tmp).items()}
    return s


def onnx_from_checkpoint_model(s: State, notes: list) -> State:
    o = s.options
    s.graphs["fp32"] = onnx_from_model(s.model, s.tmp / "graphs" / "fp32", s.limits, o.opset, o.exporter,
                                       log=notes.append)
    return s


def fp16_from_fp32(s: State, notes: list) -> State:
    s.graphs["fp16"] = {n: fp16_from_onnx(p, s.tmp / "graphs" / "fp16" / p.name) for n, p in s.graphs["fp32"].items()}
    return s


def int8_from_fp32(s: State, notes: list) -> State:
    o, cache = s.options, s.tmp / CALIBRATION_CACHE
    previous = o.out / CALIBRATION_CACHE
    reused = o.force and previous.is_file() and not previous.is_symlink()
    if reused:                   # --force over an int8 artifact: its ranges are reused if graph, data and settings match
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(previous, cache)
    done: dict = {}
    s.graphs["int8"] = int8_from_onnx(
        s.graphs["fp32"], s.tmp / "graphs" / "int8", s.reader, method=o.calibration_method,
        exclude_sensitive=o.calibration_exclude, cache_path=cache, progress=False,
        log=lambda m: notes.append(m.replace(str(s.tmp) + os.sep, "")), report=done)
    if reused:
        notes.append(f"calibration cache of {o.out.name}: reused (hit)" if done["cache_hit"] else
                     f"calibration cache of {o.out.name}: stale (graph, data or settings changed), recalibrated")
    s.quantization["int8"] = {
        "kind": "static-qdq", "method": o.calibration_method, "size": o.calibration_size,
        "samples": s.reader.samples, "data": str(o.calibration_data), "split": "train", "seed": CALIBRATION_SEED,
        "batch_size": s.reader.batch_size, "exclude_sensitive": o.calibration_exclude, "excluded": done["excluded"],
        "quantized_nodes": done["quantized_nodes"], "heads": done["heads"], "cache": CALIBRATION_CACHE,
        "cache_hit": done["cache_hit"], "backends": dict(INT8_BACKENDS)}
    return s


def int8_cpu_from_fp32(s: State, notes: list) -> State:
    s.graphs["int8-cpu"] = int8_cpu_from_onnx(s.graphs["fp32"], s.tmp / "graphs" / "int8-cpu", log=notes.append)
    s.quantization["int8-cpu"] = dict(INT8_CPU_SETTINGS)
    return s


def validate_int8_hidden_states(s: State, notes: list) -> State:
    """Each int8 backbone against the fp32 one on the validation feeds (held out from calibration);
    checks every precision, then raises one StepError."""
    feeds, failures = validation_feeds(s.histories, s.catalog, s.model, s.limits), []
    for p in [p for p in s.options.precision if p.startswith("int8")]:
        try:
            s.hidden_state[p] = validate_int8(s.graphs["fp32"]["backbone"], s.graphs[p]["backbone"], list(feeds.values()))
        except StepError as e:
            failures.append(f"{p}: {e}")
            continue
        h = s.hidden_state[p]["hidden"]
        notes.append(f"{p} vs fp32 hidden states: mean cosine {h['mean_cosine']:.5f} "
                     f"(>= {h['tolerances']['min_mean_cosine']}), worst {h['min_cosine']:.5f} "
                     f"(>= {h['tolerances']['min_cosine']})")
    if failures:
        raise StepError("\n".join(failures))
    return s


def validate_against_torch(s: State, notes: list) -> State:
    """Every precision asked for, through the runtime's own runners, against the PyTorch model."""
    specs = graph_specs(s.model, s.limits)
    steps = {p: ort_validation_steps(specs, s.graphs[p]) for p in s.options.precision}
    try:
        s.report = validate_artifact(s.model, s.catalog, steps, s.histories, s.limits, history_source=s.history_source)
    finally:
        for st in steps.values():
            st.close()
    if s.hidden_state:
        s.report["hidden_state_vs_fp32"] = s.hidden_state
    return s


def engines_from_onnx(s: State, notes: list) -> State:
    """TensorRT engines of every GPU precision, validated against torch through the runtime's TensorRT
    runners; skipped with one message when TensorRT, Polygraphy, the CUDA runtime or a GPU is missing."""
    o, specs, cache = s.options, graph_specs(s.model, s.limits), s.tmp / TIMING_CACHE
    for p in [p for p in o.precision if p in CPU_ONLY_PRECISIONS]:
        s.engines_note[p] = "cpu-only graphs (dynamic int8, MatMulInteger): TensorRT cannot build them; use int8"
        notes.append(f"{p}: skipped, {s.engines_note[p]}")
    try:
        gpu_for_engines()
    except Unavailable as e:
        s.engines_note["all"] = str(e)
        notes.append(f"skipped: {e}")
        return s
    previous = o.out / TIMING_CACHE
    if o.force and previous.is_file() and not previous.is_symlink():      # a rebuild starts from the last timings
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(previous, cache)
    scratch = s.tmp / "engines" / "onnx"                      # graphs only engines are built from; not kept
    sources = engine_sources({p: s.graphs[p] for p in o.precision}, s.graphs["fp32"], scratch)
    if "int8" in sources:                                     # the fp16-based Q/DQ graph on CPU before any engine
        feeds = list(validation_feeds(s.histories, s.catalog, s.model, s.limits).values())
        check = validate_int8(s.graphs["fp32"]["backbone"], sources["int8"]["backbone"], feeds)["hidden"]
        s.hidden_state["int8-tensorrt-graph"] = {"hidden": check}
        notes.append(f"int8 for TensorRT (Q/DQ on the fp16 graph) vs fp32 hidden states: mean cosine "
                     f"{check['mean_cosine']:.5f}")
    typical = typical_dims(s.model.layout.levels, s.limits, [len(h) for h in s.histories])
    s.engines = engines_from_sources(sources, specs, s.tmp, cache, typical, notes=notes)
    shutil.rmtree(scratch, ignore_errors=True)
    steps = {p: trt_validation_steps(specs, es, {g: s.tmp / e.file for g, e in es.items()}) for p, es in s.engines.items()}
    try:
        s.report["tensorrt"] = validate_artifact(s.model, s.catalog, steps, s.histories, s.limits,
                                                 history_source=s.history_source, what="TensorRT engines")
    finally:
        for st in steps.values():
            st.close()
    notes.append(f"profiles tuned (opt) for {typical}; engines validated against PyTorch: top-k agreement " + ", ".join(
        f"{p} {e['topk_agreement']:.3f}" for p, e in s.report["tensorrt"]["precisions"].items()))
    return s


def machine() -> dict:
    """The build machine and the instruction-set extensions its CPU offers (the int8 kernels depend on them)."""
    from nezha.runtime.machine import cpu       # the one description, shared with the benchmarks

    return cpu()


def write_manifest_step(s: State, notes: list) -> State:
    o, specs = s.options, graph_specs(s.model, s.limits)
    if "fp32" not in o.precision:                         # exported always; kept only if asked for
        shutil.rmtree(s.tmp / "graphs" / "fp32")
    (s.tmp / VALIDATION).write_text(json.dumps(s.report, indent=2))
    rel = lambda path: path.relative_to(s.tmp).as_posix()
    graphs = {p: {n: dataclasses.replace(specs[n], file=rel(path), external_data=(
        rel(external_data_path(path)) if external_data_path(path).exists() else None))
        for n, path in s.graphs[p].items()} for p in o.precision}
    s.manifest = Manifest(
        layout=s.model.layout, limits=s.limits,
        precisions={p: precision_entry(p, s.quantization.get(p)) for p in o.precision}, graphs=graphs,
        engines=s.engines, tables=s.tables, versions=_versions(),
        source={"checkpoint": str(o.checkpoint.resolve()), "architecture": s.model.config.model_type,
                "index": str(Path(o.index).resolve()) if o.index is not None else None,
                "item_ids": "index" if o.index is not None else "positions"},
        machine=machine(), validation=VALIDATION, files={})
    write_manifest(s.tmp, s.manifest)
    return s


def load_with_runtime(s: State, notes: list) -> State:
    """The runtime reads what the build wrote: every ONNX precision loads (checksums verified) and
    decodes the validation histories to the same items as the validation did."""
    histories = s.histories[:4]
    for p in s.options.precision:
        with Recommender.load(s.tmp, precision=p, threads=1) as rec:
            got = rec.recommend(histories, k=min(10, rec.max_beam), beam=min(20, rec.max_beam))
        if len(got) != len(histories) or not all(got):
            raise InputError(f"the runtime loaded the {p} graphs but decoded no items for {len(histories)} "
                             "validation histories: the model's scores are not usable (non-finite?)")
    notes.append(f"Recommender.load + recommend: {len(s.options.precision)} precision(s), {len(histories)} histories")
    return s


def _versions() -> dict:
    from importlib.metadata import version
    import onnx
    import onnxruntime
    import torch
    import transformers
    try:
        import tensorrt
        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tensorrt": trt_version, "nezha-deploy": version("nezha-deploy")}
