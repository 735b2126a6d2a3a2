"""Which weight MatMuls hurt most when quantized: quantize one node at a time (with the ranges already
calibrated) and measure the backbone's hidden states against fp32 on a few calibration batches."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from .data import FeedList


def weight_matmuls(path: Path) -> list[dict]:
    """The MatMul/Gemm nodes of a graph with a constant weight (the ones int8 quantizes):
    [{node, op, weight, shape}] in graph order."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in shapes:
            out.append({"node": node.name, "op": node.op_type, "weight": node.input[1],
                        "shape": shapes[node.input[1]]})
    return out


def _run_all(session, feeds: FeedList) -> list[np.ndarray]:
    return [session.run(None, f)[0] for f in feeds.feeds]


def node_sensitivity(fp32_path: Path, ranges, feeds: FeedList, progress: bool = True) -> list[dict]:
    """Per weight MatMul/Gemm of ``fp32_path``: the error of the first output when only that node is int8.

    Returns rows {node, op, weight, shape, mean_cosine, min_cosine, max_abs_error}, worst (lowest mean
    cosine) first. ``ranges`` are the calibrated activation ranges (quantize.calibrate_ranges)."""
    from .quantize import qdq_from_ranges
    from .validate import cpu_session, output_errors

    reference = _run_all(cpu_session(fp32_path), feeds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nezha-sens.") as tmp:
        for i, node in enumerate(tqdm(weight_matmuls(fp32_path), desc="sensitivity", unit="node",
                                      disable=not progress, leave=False)):
            path = qdq_from_ranges(fp32_path, Path(tmp) / f"one_{i}.onnx", ranges, nodes_to_quantize=[node["node"]])
            e = output_errors(reference, _run_all(cpu_session(path), feeds))
            rows.append({**node, "mean_cosine": e["mean_cosine"], "min_cosine": e["min_cosine"],
                         "max_abs_error": e["max_abs_error"]})
            Path(path).unlink()
    return sorted(rows, key=lambda r: (r["mean_cosine"], r["min_cosine"]))


def sensitivity_table(rows: list[dict], excluded: list[str] = ()) -> str:
    """The rows as a fixed-width text table; excluded nodes (kept float) are marked."""
    lines = [f"  {'node':<40} {'weight shape':>13} {'mean cos':>10} {'worst cos':>10} {'max |err|':>10}  kept float"]
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"  {r['node'][:40]:<40} {shape:>13} {r['mean_cosine']:>10.6f} {r['min_cosine']:>10.6f} "
                     f"{r['max_abs_error']:>10.4g}  {'yes' if r['node'] in excluded else ''}")
    return "\n".join(lines)
