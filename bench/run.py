"""The benchmark loop: contenders side by side on the same requests, interleaved round-robin.

For every (batch size, beam) configuration, request i is one batch of real histories; every contender
runs it back to back, in an order that rotates with i, so that machine drift (a neighbour's job, clock
changes) hits all contenders alike and cancels in the paired ratios. The first ``warmup`` requests are
run and discarded."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from nezha.runtime.errors import InputError

from . import stats
from .contenders import Contender
from .report import document


def load_histories(data: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[list[int]]:
    """Real request histories: the leave-one-out test histories of a LETTER dataset (default: Beauty),
    shuffled with ``seed`` (so that a request mixes users of all lengths), the first ``limit`` of them."""
    from nezha.runtime.data import DEFAULT_DATA, find_pair, leave_one_out, read_interactions

    _, inter = find_pair(DEFAULT_DATA if data is None else data)
    hist = leave_one_out(read_interactions(inter), "test").histories
    order = np.random.default_rng(seed).permutation(len(hist))
    return [hist[i] for i in order[:limit]]


def requests_of(histories: Sequence[Sequence[int]], batch_size: int, n: int) -> list[list[list[int]]]:
    """n requests of batch_size histories each, taken in order and wrapping around."""
    if not histories:
        raise InputError("no histories to benchmark on")
    return [[list(histories[(r * batch_size + j) % len(histories)]) for j in range(batch_size)] for r in range(n)]


def ratio_specs(names: Sequence[str]) -> list[stats.RatioSpec]:
    """Every ratio the run can report, from the contender names present:
    nezha[e] / floor[e] (overhead over the same engine's backbone pass), ar / nezha[e] and
    reference / nezha[e] (speed-ups), and on the torch side reference / floor and ar / reference."""
    names = list(names)
    by_kind: dict[str, list[str]] = {}
    for n in names:
        by_kind.setdefault(n.split("[", 1)[0], []).append(n)
    specs = []
    for kind, faster in (("nezha", ("ar", "reference", "hf-generate")), ("reference", ("ar", "hf-generate"))):
        for n in by_kind.get(kind, []):
            floor = "floor" + n[len(kind):]
            if floor in names:
                specs.append(stats.RatioSpec(n, floor, higher_is_better=False))
        specs += [stats.RatioSpec(o, n, higher_is_better=True) for other in faster
                  for o in by_kind.get(other, []) for n in by_kind.get(kind, [])]
    return specs


def measure(contenders: Sequence[Contender], histories: Sequence[Sequence[int]], batch_size: int, beam: int,
            requests: int, warmup: int, progress=None) -> dict:
    """One configuration: ``warmup`` + ``requests`` requests, each run by every contender (rotating order).

    Returns {"batch_size", "beam", "contenders": {name: {"latency": summarize(...) (seconds),
    "stages": mean seconds per stage incl. "host", "seconds": [per request], "peak_rss_mb"}},
    "skipped": {name: reason}, "ratios": {ratio name: {"value", "higher_is_better", "p50_over_p50"}}}."""
    active = [c for c in contenders if c.skip_reason(batch_size, beam) is None]
    skipped = {c.name: c.skip_reason(batch_size, beam) for c in contenders if c not in active}
    if not active:
        raise InputError(f"no contender can run batch {batch_size} beam {beam}: {skipped}")
    reqs = requests_of(histories, batch_size, warmup + requests)
    totals = {c.name: [] for c in active}
    stage_sums: dict[str, dict[str, float]] = {c.name: {} for c in active}
    for r, req in enumerate(reqs):
        shift = r % len(active)
        for c in active[shift:] + active[:shift]:
            t0 = time.perf_counter()
            stages = c.run(req, beam)
            total = time.perf_counter() - t0
            if r < warmup:
                continue
            totals[c.name].append(total)
            acc = stage_sums[c.name]
            for k, v in stages.items():
                acc[k] = acc.get(k, 0.0) + v
            acc["host"] = acc.get("host", 0.0) + max(total - sum(stages.values()), 0.0)
        if progress:
            progress(r + 1, len(reqs))
    out = {}
    for c in active:
        peak = _peak_rss_mb(c, reqs[0], beam)
        out[c.name] = {"kind": c.kind, "engine": c.engine, "note": c.note,
                       "latency": stats.summarize(totals[c.name], batch_size),
                       "stages": {k: v / requests for k, v in stage_sums[c.name].items()},
                       "seconds": totals[c.name], "peak_rss_mb": peak}
    ratios = {}
    for spec in ratio_specs(out):
        ratios[spec.name] = {
            "value": stats.paired_ratio(totals[spec.numerator], totals[spec.denominator]),
            "p50_over_p50": out[spec.numerator]["latency"]["p50"] / out[spec.denominator]["latency"]["p50"],
            "higher_is_better": spec.higher_is_better}
    return {"batch_size": batch_size, "beam": beam, "requests": requests, "warmup": warmup,
            "contenders": out, "skipped": skipped, "ratios": ratios}


def _peak_rss_mb(c: Contender, request, beam: int) -> float | None:
    """Peak RSS of the whole process (all contenders loaded) while ``c`` runs one request, in MiB;
    None where the peak mark cannot be reset (then only the process peak is meaningful)."""
    if not stats.reset_peak_rss():
        return None
    c.run(request, beam)
    return round(stats.peak_rss_bytes() / 2**20, 1)


def benchmark(contenders: Sequence[Contender], histories: Sequence[Sequence[int]], batch_sizes: Sequence[int] = (1,),
              beams: Sequence[int] = (20,), requests: int = 30, warmup: int = 3, description: dict | None = None,
              progress: bool = False) -> dict:
    """Measure every (batch size, beam) configuration; the result is the JSON document (see measure)."""
    if not contenders:
        raise InputError("no contenders to benchmark")
    if requests < 1 or warmup < 0:
        raise InputError(f"need requests >= 1 and warmup >= 0, got requests={requests}, warmup={warmup}")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise InputError(f"contender names must be unique, got {names}")
    rss_start = stats.current_rss_bytes()

    def tick(b, k):
        return lambda i, n: (sys.stderr.isatty() or i == n) and print(
            f"\r  batch {b} beam {k}: request {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    configs = [measure(contenders, histories, b, k, requests, warmup, tick(b, k) if progress else None)
               for b in batch_sizes for k in beams]
    return document("nezha-bench", machine=stats.machine(),
                    setup={**(description or {}), "batch_sizes": list(batch_sizes), "beams": list(beams),
                           "requests": requests, "warmup": warmup, "histories": len(histories),
                           "mean_history_items": float(np.mean([len(h) for h in histories])),
                           "contenders": {c.name: c.note for c in contenders}},
                    memory={"rss_start_mb": None if rss_start is None else round(rss_start / 2**20, 1),
                            "process_peak_rss_mb": round(stats.peak_rss_bytes() / 2**20, 1)},
                    seconds=round(time.perf_counter() - t0, 2), configs=configs)


def flat_ratios(result: dict) -> dict[str, dict]:
    """{"batch=B beam=K: A / B": {"value", "higher_is_better"}} over every configuration of a result."""
    return {f"batch={c['batch_size']} beam={c['beam']}: {name}": r
            for c in result["configs"] for name, r in c["ratios"].items()}
