"""int8 graphs against their fp32 graph: per-vector cosine and absolute error of every output, with
thresholds that fail the build. Sessions come from the runtime's one session factory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort
from nezha.runtime.backends.onnxruntime import open_session
from nezha.runtime.errors import InputError, StepError



def cpu_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    return open_session(path, "cpu", threads)


def output_errors(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Per-vector cosine (over the last axis) and absolute error of candidate vs reference outputs."""
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
    cand = np.concatenate([c.reshape(-1, c.shape[-1]) for c in candidate]).astype(np.float64)
    cos = (ref * cand).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1), 1e-30)
    err = np.abs(ref - cand)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "max_abs_error": float(err.max()),
            "mean_abs_error": float(err.mean()), "max_abs_reference": float(np.abs(ref).max())}


def validate_int8(fp32_path: Path, int8_path: Path, feeds: Iterable[dict[str, np.ndarray]], *,
                  min_mean_cosine: float = 0.99, min_cosine: float = 0.95, max_relative_error: float = 0.25,
                  threads: int | None = None) -> dict:
    """Run both graphs on ``feeds`` and compare every output, vector by vector (last axis: the hidden
    size H for the backbone's hidden [B, L+1, H]). Checks, per output: mean cosine >= min_mean_cosine,
    worst cosine >= min_cosine, max |int8 - fp32| <= max_relative_error * max |fp32|.

    Returns {output name: {mean_cosine, min_cosine, max_abs_error, mean_abs_error, max_abs_reference,
    tolerances, ok}}; raises StepError listing every output when one fails. The inputs and
    outputs of the two graphs must match (names, dtypes, ranks)."""
    fp32, int8 = cpu_session(fp32_path, threads), cpu_session(int8_path, threads)
    io = lambda s: ([(a.name, a.type, len(a.shape)) for a in s.get_inputs()],
                    [(a.name, a.type, len(a.shape)) for a in s.get_outputs()])
    if io(fp32) != io(int8):
        raise StepError(f"{int8_path} has inputs/outputs {io(int8)}, the fp32 graph {io(fp32)}")
    names = [o.name for o in fp32.get_outputs()]
    outs32, outs8 = {n: [] for n in names}, {n: [] for n in names}
    count = 0
    for feed in feeds:
        for n, a, b in zip(names, fp32.run(names, feed), int8.run(names, feed)):
            outs32[n].append(a)
            outs8[n].append(b)
        count += 1
    if not count:
        raise InputError("validate_int8: no feeds to compare on")
    result, failures = {}, []
    for n in names:
        e = output_errors(outs32[n], outs8[n])
        tol = {"min_mean_cosine": min_mean_cosine, "min_cosine": min_cosine,
               "max_abs_error": max_relative_error * e["max_abs_reference"]}
        e["tolerances"] = tol
        e["ok"] = (e["mean_cosine"] >= min_mean_cosine and e["min_cosine"] >= min_cosine
                   and e["max_abs_error"] <= tol["max_abs_error"])
        result[n] = e
        if not e["ok"]:
            failures.append(n)
    if failures:
        lines = [f"  {n}: mean cosine {r['mean_cosine']:.5f} (>= {min_mean_cosine}), worst cosine "
                 f"{r['min_cosine']:.5f} (>= {min_cosine}), max abs error {r['max_abs_error']:.4g} "
                 f"(<= {r['tolerances']['max_abs_error']:.4g} = {max_relative_error} x max |fp32| "
                 f"{r['max_abs_reference']:.4g}){'' if r['ok'] else '  FAILED'}" for n, r in result.items()]
        raise StepError(f"int8 graph {int8_path} differs from {fp32_path} beyond tolerance:\n"
                        + "\n".join(lines))
    return result
