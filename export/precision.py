"""Precisions at the ONNX level. TensorRT 10+ builds strongly typed networks, so the precision an
engine runs in is the one written in the graph: fp16 casts here, int8 Q/DQ nodes from calibration/.
int8-cpu (dynamic int8, MatMulInteger) is ONNX Runtime CPU only: never a TensorRT engine.

One precision, two graphs for int8 (``INT8_BACKENDS``): ONNX Runtime runs the artifact's ``graphs.int8``,
Q/DQ pairs on the fp32 graph (its CPU kernels have no fp16 MatMul: an fp16 graph there only adds casts),
while TensorRT's int8 engines are built from the same Q/DQ pairs on the fp16 graph
(``int8_tensorrt_graphs``): in a strongly typed network every op that is not quantized (attention, the
residual adds, the unquantized MatMuls, the heads) then runs in fp16 as in the fp16 engine, not in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import onnx
from onnx import version_converter
from nezha.runtime.errors import InputError
from nezha.runtime.manifest import PRECISIONS, PrecisionEntry

from .graphs import save_onnx

# Precisions whose graphs only ONNX Runtime on CPU runs: no TensorRT engine, "execution": "cpu-only" in the manifest.
CPU_ONLY_PRECISIONS = ("int8-cpu",)
# Which graphs serve which backend for int8 (recorded in the manifest's precisions.int8.quantization).
INT8_BACKENDS = {"onnxruntime": "graphs.int8: Q/DQ on the fp32 graph",
                 "tensorrt": "engines.int8: the same Q/DQ on the fp16 graph (fp16 scales, opset 19+)"}
# DequantizeLinear writes float16 (its scale's type) from opset 19; before, only float32.
QDQ_FP16_OPSET = 19

# Kept in float32 in fp16 graphs: the RMS norms (decomposed by the exporter into Pow -> ReduceMean ->
# Sqrt -> Reciprocal; a sum of squares overflows fp16), softmax / log-softmax, and the rotary angles.
FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "Softmax", "LogSoftmax", "Sin", "Cos",
            "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


def check_precisions(precisions: Iterable[str]) -> list[str]:
    """Validate and order precisions (fp32 first: every other one is derived from it and compared to torch)."""
    precisions = list(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise InputError(f"unsupported precision(s) {unknown or '(none)'}; allowed: {', '.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p in precisions]


def precision_entry(precision: str, quantization: dict | None = None) -> PrecisionEntry:
    """The manifest's entry of a built precision."""
    return PrecisionEntry("cpu-only" if precision in CPU_ONLY_PRECISIONS else "any", quantization)


def fp16_from_onnx(src: Path, dst: Path, min_opset: int | None = None) -> Path:
    """float32 graph -> float16 graph. Inputs/outputs keep their float32/int64 types (keep_io_types);
    the ops in FP32_OPS stay float32 with casts around them. ``min_opset``: raise the graph's default
    opset to at least this first (Q/DQ graphs: QDQ_FP16_OPSET, so their scales can become float16)."""
    # onnxruntime's maintained copy of onnxconverter-common's converter: onnxconverter-common 1.16
    # writes graphs ONNX Runtime rejects (fp16 Cast outputs typed float after transformers' .to(float32))
    # and can loop forever once Cast is blocked. Its casts come out of order, hence the sort.
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if min_opset and opset < min_opset:
        model = version_converter.convert_version(model, min_opset)
    half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_OPS))
    topological_sort(half.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(half, dst)
    onnx.checker.check_model(str(dst))
    return dst


def int8_tensorrt_graphs(int8_graphs: dict[str, Path], fp32_graphs: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """The graphs TensorRT's int8 engines are built from: the int8 backbone's Q/DQ pairs (scales become
    float16) on the fp16 graph, and the fp16 heads (the int8 precision keeps its heads unquantized).
    {graph name: .onnx in ``out_dir``}."""
    out_dir = Path(out_dir)
    return {name: fp16_from_onnx(Path(int8_graphs[name] if name == "backbone" else path), out_dir / Path(path).name,
                                 QDQ_FP16_OPSET if name == "backbone" else None)
            for name, path in fp32_graphs.items()}


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node follows the producers of its inputs (the ONNX
    checker and TensorRT's parser require it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        still = [n for n in pending if not all(i in ready for i in n.input)]
        placed = [n for n in pending if all(i in ready for i in n.input)]
        if not placed:
            raise InputError(f"graph {graph.name!r} has a cycle or a dangling input at node {still[0].name!r}")
        for n in placed:
            ready.update(n.output)
        ordered.extend(placed)
        pending = still
    del graph.node[:]
    graph.node.extend(ordered)
