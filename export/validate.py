"""Validation of exported graphs against the PyTorch model, always run by the build.

Every graph runs in ONNX Runtime (CPU) on real histories; every output is compared with the torch
model's (max |diff| against a bound relative to the output's RMS, and the mean cosine of its vectors:
``Tolerance``) and the decoded top-k items are compared with the torch Reference. All results are
collected first; one StepError then lists every output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from nezha.model.evaluate import overlap_shares
from nezha.model.nezha import NezhaModel
from nezha.model.reference import Reference, TorchSteps
from nezha.runtime.backends.base import GraphSteps
from nezha.runtime.backends.onnxruntime import open_sessions, ort_steps
from nezha.runtime.catalog import Catalog
from nezha.runtime.data import read_interactions
from nezha.runtime.decode import beam_search
from nezha.runtime.encoding import encode_histories, items_from_sids
from nezha.runtime.errors import StepError
from nezha.runtime.manifest import EngineEntry, GraphEntry, Limits, token_range


@dataclass(frozen=True)
class Tolerance:
    """Bounds on every graph output (hidden states, states, log-probs) against the torch model, relative
    to the output's own scale (Polygraphy's comparator in spirit: an absolute and a relative term, plus a
    direction check), and on the decoded items.

    * max |ours - torch| <= ``atol`` + ``rtol`` x scale, where scale is the RMS of torch's output in that
      case: a bound that follows each output's magnitude (hidden states after a trained final norm, draft
      states and log-probs in nats differ by orders of magnitude) instead of one constant for all;
    * the mean cosine of the output's vectors (last axis) >= ``min_cosine``: the quality gate of the
      quantized precisions, insensitive to the few largest elements;
    * the mean top-k agreement (|ours & reference| / |reference| per history) >= ``min_topk_agreement``."""

    atol: float
    min_topk_agreement: float
    rtol: float = 0.0
    min_cosine: float = -1.0

    def allowed(self, scale: float) -> float:
        """The largest max |diff| allowed for an output whose reference has RMS ``scale``."""
        return self.atol + self.rtol * scale


# Why these values (docs/tensorrt.md, "Validation tolerances"): fp32 and fp16 differ from torch by rounding,
# so their bounds are tight; int8's per-element error is noise of about sqrt(2 (1 - cosine)) x RMS, and the
# largest of N such elements grows with N (batch, history, width): 0.52 x RMS for the 768x12 README model
# at --max-batch 8, 0.57 at 16, at mean cosine 0.994. Its max |diff| bound (2 x RMS) only catches gross
# errors (an overflow, a wrong tensor); the mean cosine, as in calibration's gate, is its quality bound.
TOLERANCES = {"fp32": Tolerance(1e-4, 1.0, 1e-3, 0.99999), "fp16": Tolerance(5e-2, 0.9, 5e-2, 0.999),
              "int8": Tolerance(0.0, 0.7, 2.0, 0.99), "int8-cpu": Tolerance(0.0, 0.7, 2.0, 0.99)}


def ort_validation_steps(entries: dict[str, GraphEntry], paths: dict[str, Path]) -> GraphSteps:
    """The runtime's own ONNX Runtime runners (CPU) over one precision's graphs: the build validates
    exactly what services run."""
    return ort_steps(entries, open_sessions(paths))


def trt_validation_steps(entries: dict[str, GraphEntry], engines: dict[str, EngineEntry],
                         paths: dict[str, Path]) -> GraphSteps:
    """The runtime's own TensorRT runners over freshly built engines (``paths``: graph -> plan file)."""
    from nezha.runtime.backends.tensorrt import Engines, trt_steps
    return trt_steps(entries, Engines(engines, paths))


def run_graph(steps: GraphSteps, name: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One graph's outputs, in manifest order, copied out of the runner's reused buffers."""
    runner = steps.runners[name]
    out = runner.run({k: np.ascontiguousarray(v) for k, v in feed.items()})
    return [out[t.name].copy() for t in runner.entry.outputs]


def histories_from_data(interactions: Path, catalog: Catalog, n: int, seed: int = 0) -> list[list[int]]:
    """n user histories sampled from a LETTER ``*.inter.json`` (all but each user's last item, items
    unknown to the catalog dropped)."""
    users = read_interactions(interactions)
    known = set(catalog.item_ids.tolist())
    pool = [[i for i in items[:-1] if i in known] for items in users.values()]
    pool = [h for h in pool if h]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]


def synthetic_histories(catalog: Catalog, n: int, max_history: int, seed: int = 0) -> list[list[int]]:
    """n random histories of 1 .. max_history + 2 catalog items (the longest ones get truncated)."""
    rng = np.random.default_rng(seed)
    lengths = np.resize([1, max_history + 2] + list(rng.integers(1, max_history + 3, n)), n)
    return [rng.choice(catalog.item_ids, size=int(k)).tolist() for k in lengths]


def validation_feeds(histories: Sequence[Sequence[int]], catalog: Catalog, model: NezhaModel,
                     limits: Limits) -> dict[str, dict[str, np.ndarray]]:
    """Backbone feeds covering the dynamic dims: one user (B=1), the batch left padded to its longest
    history, and the batch padded to the largest T the graphs accept."""
    encode = lambda h, pad_to=None: encode_histories(h, catalog, model.layout, limits.max_history, pad_to=pad_to)
    batch = list(histories[:limits.max_batch])
    return {"single": encode(batch[:1]), "batch": encode(batch),
            "batch_max_tokens": encode(batch, token_range(model.layout.levels, limits.max_history)[1])}


def graph_cases(model: NezhaModel, feeds: dict[str, dict[str, np.ndarray]], seed: int = 0):
    """Yield (graph name, case name, feed, torch outputs) for every graph. Head inputs follow the
    torch model's own trajectory: its hidden states, states and random codes."""
    torch_steps, rng = TorchSteps(model), np.random.default_rng(seed)
    for case, feed in feeds.items():
        hidden = torch_steps.backbone(feed)                               # [B, L+1, H]
        yield "backbone", case, feed, [hidden]
        parents, n = hidden[:, 0], len(hidden)
        for level, codes in enumerate(model.layout.codes):
            if level == 0:
                parent = code = None
                head_feed = {"root": parents}
            else:                                   # each beam picks a random parent row (repeats included)
                parent = rng.integers(0, len(parents), n)
                code = rng.integers(0, model.layout.codes[level - 1], n)
                head_feed = {"parent_state": parents, "parent": parent, "code": code}
            state, log_probs = torch_steps.head_step(level, parents, parent, code, hidden[:, level + 1])
            yield f"head_{level}", case, head_feed | {"hidden": hidden[:, level + 1]}, \
                [log_probs] + ([] if state is None else [state])
            parents = hidden[:, 0] if state is None else state


def output_errors(got: np.ndarray, want: np.ndarray) -> dict:
    """One output in one case: max |got - want|, the RMS of ``want`` (its scale) and the mean and worst
    cosine of the vectors along the last axis. A wrong shape or a NaN/inf gives inf and cosine -1."""
    if got.shape != want.shape or not np.isfinite(got).all():
        return {"max_abs_diff": float("inf"), "scale": 0.0, "mean_cosine": -1.0, "min_cosine": -1.0}
    g, w = got.astype(np.float64).reshape(-1, got.shape[-1]), want.astype(np.float64).reshape(-1, want.shape[-1])
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)
    cosine = np.where(norms > 0, (g * w).sum(1) / np.maximum(norms, 1e-300), 1.0)     # two zero vectors agree
    return {"max_abs_diff": float(np.max(np.abs(g - w))), "scale": float(np.sqrt(np.mean(w * w))),
            "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}


def merge_errors(total: dict, case: dict, tol: Tolerance) -> None:
    """Fold one case's ``output_errors`` into an output's running record: the worst case by its share
    of the allowed max |diff| gives max_abs_diff, scale and allowed; the cosines are the worst case's."""
    allowed = tol.allowed(case["scale"])
    share = case["max_abs_diff"] / allowed if allowed > 0 else (0.0 if case["max_abs_diff"] == 0 else float("inf"))
    if not total or share > total["share"]:
        total.update(max_abs_diff=case["max_abs_diff"], scale=case["scale"], allowed=allowed, share=share)
    total["mean_cosine"] = min(total.get("mean_cosine", 1.0), case["mean_cosine"])
    total["min_cosine"] = min(total.get("min_cosine", 1.0), case["min_cosine"])
    total["ok"] = total["share"] <= 1.0 and total["mean_cosine"] >= tol.min_cosine


def topk_agreement(ours: list[list[tuple[int, float]]], reference: list[list[tuple[int, float]]]) -> float:
    """Mean over histories of |our top-k items & reference top-k items| / |reference top-k items|."""
    return float(np.mean(overlap_shares([[i for i, _ in r] for r in ours], [[i for i, _ in r] for r in reference])))


def validate_artifact(model: NezhaModel, catalog: Catalog, steps: dict[str, GraphSteps],
                      histories: Sequence[Sequence[int]], limits: Limits,
                      tolerances: dict[str, Tolerance] | None = None, k: int = 10, beam: int = 20,
                      history_source: str = "synthetic", what: str = "exported graphs") -> dict:
    """Compare each precision's runners {precision: GraphSteps} with ``model`` on ``histories``
    (``ort_validation_steps`` for ONNX graphs, ``trt_validation_steps`` for TensorRT engines).

    Returns the report (validation.json); raises StepError listing every output (max |diff| and
    tolerance) if any output or top-k agreement is out of bounds.
    """
    tolerances = {**TOLERANCES, **(tolerances or {})}
    beam = min(beam, limits.max_beam)
    k = min(k, beam)
    feeds = validation_feeds(histories, catalog, model, limits)
    cases = list(graph_cases(model, feeds))
    reference = Reference(model, catalog, limits.max_history)
    with torch.inference_mode():
        expected_items = reference.recommend(list(histories[:limits.max_batch]), k=k, beam=beam)
    report = {"histories": len(histories), "history_source": history_source, "k": k, "beam": beam,
              "cases": {c: list(f["input_ids"].shape) for c, f in feeds.items()}, "precisions": {}}
    lines, ok = [], True
    for precision, precision_steps in steps.items():
        tol, stats = tolerances[precision], {}
        for name, case, feed, want in cases:
            got = run_graph(precision_steps, name, feed)
            names = [t.name for t in precision_steps.runners[name].entry.outputs]
            for out_name, g, w in zip(names, got, want):
                merge_errors(stats.setdefault(f"{name}.{out_name}", {}), output_errors(g, w), tol)
        keys, scores = beam_search(precision_steps, feeds["batch"], model.layout, reference.verifier, beam)
        agreement = topk_agreement(items_from_sids(keys, scores, reference.sid_table, k), expected_items)
        entry = {"tolerance": {"atol": tol.atol, "rtol": tol.rtol, "min_cosine": tol.min_cosine},
                 "min_topk_agreement": tol.min_topk_agreement, "topk_agreement": agreement, "outputs": stats}
        entry["ok"] = all(o["ok"] for o in stats.values()) and agreement >= tol.min_topk_agreement
        ok &= entry["ok"]
        report["precisions"][precision] = entry
        for key, o in stats.items():
            lines.append(f"  {'ok  ' if o['ok'] else 'FAIL'} {precision} {key}: max |diff| {o['max_abs_diff']:.3g} "
                         f"(allowed {o['allowed']:.3g} = {tol.atol:g} + {tol.rtol:g} x RMS {o['scale']:.3g}), "
                         f"mean cosine {o['mean_cosine']:.5f} (at least {tol.min_cosine:g})")
        lines.append(f"  {'ok  ' if agreement >= tol.min_topk_agreement else 'FAIL'} {precision} top-{k} items: "
                     f"agreement {agreement:.3f} (at least {tol.min_topk_agreement:g})")
    report["ok"] = ok
    if not ok:
        raise StepError(f"{what} disagree with the PyTorch model:\n" + "\n".join(lines), report)
    return report
