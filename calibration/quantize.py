"""INT8 graphs from fp32 graphs, with ONNX Runtime's quantization tooling.

* ``int8`` (static, explicit quantization): symmetric int8 Q/DQ pairs on the inputs of the MatMul/Gemm
  nodes that have a constant weight, per-channel weights, activation ranges calibrated on real histories
  (MinMax, Entropy or Percentile). Everything else (RMS norms, softmax, residual adds, rotary, the head's
  log-softmax) stays float: the placement TensorRT's explicit quantization expects, and what ONNX Runtime
  CPU/CUDA fuse into int8 MatMuls. A probe on a 100M Qwen3 backbone: quantizing every op gave cosine 0.66
  to the fp32 hidden states; MatMul/Gemm only gave 0.99.
* ``int8-cpu`` (dynamic): MatMul weights int8, activations quantized at run time (MatMulInteger). For
  ONNX Runtime on CPU only; TensorRT cannot build it (the manifest marks it ``"execution": "cpu-only"``).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort
from nezha.runtime.artifact import external_data_path, sha256
from nezha.runtime.errors import InputError
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import CalibrationCacheEncoder, TensorsData
from tqdm import tqdm

from .data import FeedList
from .sensitivity import node_sensitivity, sensitivity_table, weight_matmuls

# int8-cpu: MatMul weights int8 per channel with a 7-bit range. ONNX Runtime's dynamic MatMulInteger
# multiplies u8 activations by s8 weights; on x86 CPUs without VNNI (AVX2 only) its kernel sums pairs of
# products into int16 (vpmaddubsw), which saturates with full 8-bit weights: the same graph measured mean
# hidden-state cosine 0.984 on an AVX2-only AMD EPYC and 0.9998 with VNNI. reduce_range keeps every pair
# sum inside int16, so the graph gives the same answers on every x86-64 CPU (cosine 0.9995 on AVX2 only).
INT8_CPU_SETTINGS = {"kind": "dynamic", "op_types": ["MatMul"], "weight_type": "int8", "per_channel": True,
                     "reduce_range": True, "activations": "uint8, quantized at run time"}
OP_TYPES = ("MatMul", "Gemm")
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
PERCENTILE = 99.999
CACHE_FORMAT = "nezha-calibration-cache"
CACHE_VERSION = 1


def qdq_options() -> dict:
    """ONNX Runtime extra options of the static int8 graphs (see the module docstring)."""
    return {
        "ActivationSymmetric": True,            # zero point 0: TensorRT only takes symmetric int8
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": list(OP_TYPES),   # the Q/DQ sit on inputs, never on outputs
        "QuantizeBias": False,                  # Gemm biases stay float (TensorRT adds them in float)
        "DedicatedQDQPair": True,               # one Q/DQ pair per consumer, so any node can be left float
    }


# ---------------------------------------------------------------- calibration (tensor ranges + cache)

def _check_method(method: str) -> CalibrationMethod:
    if method not in METHODS:
        raise InputError(f"calibration method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method]


def graph_sha256(path: Path) -> str:
    """sha256 of a graph file, and of its external weights file when it has one."""
    data = external_data_path(path)
    return sha256(path) if not data.exists() else sha256(path) + ":" + sha256(data)


def feeds_sha256(feeds: FeedList) -> str:
    import hashlib
    h = hashlib.sha256()
    for feed in feeds.feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def cache_key(fp32_path: Path, feeds: FeedList, method: str) -> dict:
    """What a cached set of tensor ranges depends on: the graph, the calibration feeds and the settings."""
    return {"graph_sha256": graph_sha256(fp32_path), "feeds_sha256": feeds_sha256(feeds), "method": method,
            "percentile": PERCENTILE if method == "percentile" else None, "symmetric": True,
            "op_types": list(OP_TYPES), "onnxruntime": ort.__version__}


def _read_cache(cache_path: Path, key: dict) -> TensorsData | None:
    try:
        raw = json.loads(cache_path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"calibration cache {cache_path} is not valid JSON ({e}); delete it to recalibrate") \
            from None
    if raw.get("format") != CACHE_FORMAT or raw.get("version") != CACHE_VERSION or raw.get("key") != key:
        return None
    return TensorsData.from_dict(raw["ranges"])


def _write_cache(cache_path: Path, key: dict, ranges: TensorsData) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(cache_path.suffix + ".tmp")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key,
                               "ranges": ranges.to_dict()}, cls=CalibrationCacheEncoder))
    tmp.replace(cache_path)


def _not_quantizer_chatter(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "onnxruntime/quantization" not in record.pathname.replace("\\", "/")


@contextmanager
def _quiet_ort():
    """The quantizer logs a 'please pre-process' warning per call on the root logger: we quantize the
    exported graph as it is on purpose (ORT's pre-processing fuses norms into contrib ops that TensorRT
    cannot parse). Only the quantizer's own records below ERROR are dropped, and only while it runs; the
    root logger's level and everything else logged meanwhile are left alone."""
    root = logging.getLogger()
    root.addFilter(_not_quantizer_chatter)
    try:
        yield
    finally:
        root.removeFilter(_not_quantizer_chatter)


def calibrate_ranges(fp32_path: Path, feeds: FeedList, method: str = "entropy", cache_path: Path | None = None,
                     progress: bool = True) -> tuple[TensorsData, bool]:
    """Activation ranges of every MatMul/Gemm input of ``fp32_path`` over ``feeds``.

    Returns (ranges, cache_hit). With ``cache_path``, ranges are read from there when the cached key
    (graph sha256, feeds sha256, method, settings, onnxruntime version) matches, else computed and saved."""
    calibrate_method = _check_method(method)
    key = cache_key(fp32_path, feeds, method) if cache_path is not None else None
    if cache_path is not None:
        cached = _read_cache(Path(cache_path), key)
        if cached is not None:
            return cached, True
    extra = {"symmetric": True}
    if method == "percentile":
        extra["percentile"] = PERCENTILE
    with tempfile.TemporaryDirectory(prefix="nezha-calib.") as tmp, _quiet_ort():
        calibrator = create_calibrator(Path(fp32_path), list(OP_TYPES),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calibrate_method, extra_options=extra,
                                       providers=["CPUExecutionProvider"])
        # One batch per pass: the histogram collectors stack a pass's batches into one array (batches of
        # different lengths T do not stack), and it bounds the intermediate outputs held in memory.
        for feed in tqdm(feeds.feeds, desc=f"calibrate ({method})", unit="batch", disable=not progress, leave=False):
            with redirect_stdout(io.StringIO()):          # ORT prints a line per pass
                calibrator.collect_data(FeedList([feed]))
        with redirect_stdout(io.StringIO()):
            ranges = calibrator.compute_data()
        del calibrator
    if cache_path is not None:
        _write_cache(Path(cache_path), key, ranges)
    return ranges, False


# ---------------------------------------------------------------- Q/DQ graphs

def qdq_from_ranges(fp32_path: Path, out_path: Path, ranges: TensorsData, nodes_to_quantize: list[str] | None = None,
                    nodes_to_exclude: Iterable[str] = ()) -> Path:
    """Write the static int8 Q/DQ graph of ``fp32_path`` using precomputed ``ranges`` (no calibration run).
    ``nodes_to_quantize`` (None: every weight MatMul/Gemm) and ``nodes_to_exclude`` are node names."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if nodes_to_quantize is None:
        # Linear layers only: attention's two activation x activation MatMuls stay float (ORT's
        # MatMulConstBOnly applies to QOperator graphs only, so the nodes are named here).
        nodes_to_quantize = [n["node"] for n in weight_matmuls(fp32_path)]
    with tempfile.TemporaryDirectory(prefix="nezha-qdq.") as tmp, _quiet_ort():
        ort_cache = Path(tmp) / "ranges.json"
        ort_cache.write_text(json.dumps(ranges.to_dict(), cls=CalibrationCacheEncoder))
        quantize_static(str(fp32_path), str(out_path), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=list(nodes_to_quantize), nodes_to_exclude=list(nodes_to_exclude),
                        calibrate_method=ranges.calibration_method, extra_options=qdq_options(),
                        calibration_cache_path=ort_cache,
                        use_external_data_format=external_data_path(fp32_path).exists())
    onnx.checker.check_model(str(out_path))
    return out_path


def _copy_graph(src: Path, dst_dir: Path) -> Path:
    dst = Path(dst_dir) / Path(src).name
    if Path(src).resolve() != dst.resolve():
        shutil.copyfile(src, dst)
        if external_data_path(src).exists():
            shutil.copyfile(external_data_path(src), external_data_path(dst))
    return dst


def int8_from_onnx(fp32_graphs: dict[str, Path], out_dir: Path, feeds: Iterable[dict[str, np.ndarray]], *,
                   method: str = "entropy", exclude_sensitive: int = 0, cache_path: Path | None = None,
                   sensitivity_batches: int = 4, progress: bool = True,
                   log: Callable[[str], None] | None = print, report: dict | None = None) -> dict[str, Path]:
    """fp32 graphs {name: .onnx} -> static int8 Q/DQ graphs in ``out_dir`` {name: .onnx}.

    ``feeds``: backbone feeds (input_ids, attention_mask [B, T] int64, e.g. a CalibrationReader).
    ``method``: 'entropy' | 'minmax' | 'percentile' (99.999th). ``exclude_sensitive``: this many weight
    MatMuls, the ones whose quantization alone costs the most hidden-state cosine on the first
    ``sensitivity_batches`` feeds, stay float (the table goes to ``log`` and ``report``).
    ``cache_path``: JSON of the backbone's tensor ranges, reused when graph, feeds and settings match.
    Heads (``head_*``) are copied unchanged (fp32): they are small, their log-probs are the ranking itself,
    and quantizing them was measured not to pay (see calibration/int8_report.py).
    ``report`` (a dict, if given) receives what was done: method, cache hit, sensitivity rows, excluded nodes.
    """
    say = log or (lambda _m: None)
    if "backbone" not in fp32_graphs:
        raise InputError(f"int8_from_onnx needs the 'backbone' graph; got {sorted(fp32_graphs)}")
    _check_method(method)
    if not isinstance(exclude_sensitive, int) or exclude_sensitive < 0:
        raise InputError(f"exclude_sensitive must be a non-negative integer, got {exclude_sensitive!r}")
    # (not isinstance: ORT's reader base class claims every object with a get_next as a subclass)
    feeds = feeds if type(feeds) is FeedList else FeedList(feeds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(fp32_graphs["backbone"])
    t0 = time.perf_counter()
    ranges, hit = calibrate_ranges(src, feeds, method, cache_path, progress)
    say(f"  int8 backbone: {method} ranges {'from cache ' + str(cache_path) if hit else 'calibrated'} "
        f"on {sum(len(f['input_ids']) for f in feeds.feeds)} histories ({time.perf_counter() - t0:.1f} s)")
    rows, excluded = [], []
    if exclude_sensitive:
        rows = node_sensitivity(src, ranges, FeedList(feeds.feeds[:max(1, sensitivity_batches)]), progress=progress)
        excluded = [r["node"] for r in rows[:exclude_sensitive]]
        say(sensitivity_table(rows, excluded))
    paths = {"backbone": qdq_from_ranges(src, out_dir / src.name, ranges, nodes_to_exclude=excluded)}
    quantized = len(weight_matmuls(src)) - len(excluded)
    say(f"  int8 backbone: {quantized} weight MatMul/Gemm nodes in int8, {len(excluded)} kept float "
        f"{excluded if excluded else ''}".rstrip())
    for name, path in fp32_graphs.items():
        if name != "backbone":
            paths[name] = _copy_graph(Path(path), out_dir)
    if report is not None:
        report.update({"method": method, "cache_hit": hit, "excluded": excluded, "sensitivity": rows,
                       "quantized_nodes": quantized, "heads": "fp32 (copied unchanged)"})
    return paths


def int8_cpu_from_onnx(fp32_graphs: dict[str, Path], out_dir: Path, *,
                       log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """fp32 graphs -> the 'int8-cpu' set in ``out_dir``: the backbone with dynamically quantized MatMul
    weights (int8 per-channel, activations quantized at run time), the heads copied unchanged.
    ONNX Runtime CPU only: the manifest marks the precision "cpu-only". Settings: INT8_CPU_SETTINGS."""
    if "backbone" not in fp32_graphs:
        raise InputError(f"int8_cpu_from_onnx needs the 'backbone' graph; got {sorted(fp32_graphs)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(fp32_graphs["backbone"])
    dst = out_dir / src.name
    with _quiet_ort():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=INT8_CPU_SETTINGS["op_types"], per_channel=True,
                         reduce_range=INT8_CPU_SETTINGS["reduce_range"], weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True},
                         use_external_data_format=external_data_path(src).exists())
    onnx.checker.check_model(str(dst))
    if log:
        log(f"  int8-cpu backbone: {len(weight_matmuls(src))} MatMul weights int8 (dynamic; ONNX Runtime CPU only)")
    paths = {"backbone": dst}
    for name, path in fp32_graphs.items():
        if name != "backbone":
            paths[name] = _copy_graph(Path(path), out_dir)
    return paths
