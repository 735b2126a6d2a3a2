"""Precisions at the ONNX level. TensorRT 10+ builds strongly typed networks, so the precision an
engine runs in is the one written in the graph: fp16 casts here, int8 Q/DQ nodes from calibration/.
int8-cpu (dynamic int8, MatMulInteger) is ONNX Runtime CPU only: never a TensorRT engine."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import onnx
from nezha.runtime.errors import NezhaError
from nezha.runtime.manifest import PRECISIONS, PrecisionEntry

from .graphs import save_onnx

# Precisions whose graphs only ONNX Runtime on CPU runs: no TensorRT engine, "execution": "cpu-only" in the manifest.
CPU_ONLY_PRECISIONS = ("int8-cpu",)

# Kept in float32 in fp16 graphs: the RMS norms (decomposed by the exporter into Pow -> ReduceMean ->
# Sqrt -> Reciprocal; a sum of squares overflows fp16), softmax / log-softmax, and the rotary angles.
FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "Softmax", "LogSoftmax", "Sin", "Cos",
            "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


class PrecisionError(NezhaError, ValueError):
    """A precision that is unknown or whose tooling is not available."""


def check_precisions(precisions: Iterable[str]) -> list[str]:
    """Validate and order precisions (fp32 first: every other one is derived from it and compared to torch)."""
    precisions = list(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise PrecisionError(f"unsupported precision(s) {unknown or '(none)'}; allowed: {', '.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p in precisions]


def precision_entry(precision: str, quantization: dict | None = None) -> PrecisionEntry:
    """The manifest's entry of a built precision."""
    return PrecisionEntry("cpu-only" if precision in CPU_ONLY_PRECISIONS else "any", quantization)


def fp16_from_onnx(src: Path, dst: Path) -> Path:
    """float32 graph -> float16 graph. Inputs/outputs keep their float32/int64 types (keep_io_types);
    the ops in FP32_OPS stay float32 with casts around them."""
    # onnxruntime's maintained copy of onnxconverter-common's converter: onnxconverter-common 1.16
    # writes graphs ONNX Runtime rejects (fp16 Cast outputs typed float after transformers' .to(float32))
    # and can loop forever once Cast is blocked. Its casts come out of order, hence the sort.
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_OPS))
    topological_sort(half.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(half, dst)
    onnx.checker.check_model(str(dst))
    return dst


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node follows the producers of its inputs (the ONNX
    checker and TensorRT's parser require it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        still = [n for n in pending if not all(i in ready for i in n.input)]
        placed = [n for n in pending if all(i in ready for i in n.input)]
        if not placed:
            raise PrecisionError(f"graph {graph.name!r} has a cycle or a dangling input at node {still[0].name!r}")
        for n in placed:
            ready.update(n.output)
        ordered.extend(placed)
        pending = still
    del graph.node[:]
    graph.node.extend(ordered)
