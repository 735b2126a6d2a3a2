"""What int8 costs on a real model: Recall@10 / NDCG@10 on the test users of fp32, static int8 and
int8-cpu graphs decoded by the runtime's beam search over plain ONNX Runtime sessions, their top-10
overlap with fp32, and the backbone latency of each on ONNX Runtime CPU (interleaved rounds).

    python -m nezha.calibration.int8_report --checkpoint checkpoints/demo/nezha \\
        --index data/beauty/Beauty.index.json.gz --work /tmp/int8-report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from nezha.calibration.data import CalibrationReader
from nezha.calibration.quantize import int8_cpu_from_onnx, int8_from_onnx
from nezha.calibration.validate import cpu_session, validate_int8
from nezha.export.validate import ort_validation_steps
from nezha.runtime.data import DEFAULT_DATA, find_pair, leave_one_out, read_interactions
from nezha.runtime.encoding import encode_histories


def interleaved_latency(sessions: dict, feeds: dict[str, dict], rounds: int) -> dict:
    """Median backbone ms per precision and feed, the precisions run in rotating order each round."""
    names = list(sessions)
    times = {(p, f): [] for p in names for f in feeds}
    for p in names:                                             # warm-up
        for feed in feeds.values():
            sessions[p].run(None, feed)
    for r in range(rounds):
        for p in names[r % len(names):] + names[:r % len(names)]:
            for f, feed in feeds.items():
                t0 = time.perf_counter()
                sessions[p].run(None, feed)
                times[(p, f)].append(time.perf_counter() - t0)
    return {f: {p: 1e3 * float(np.median(times[(p, f)])) for p in names} for f in feeds}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--index", type=Path, default=None, help="LETTER *.index.json (default: the checkpoint's ava_sid)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder with the test users")
    p.add_argument("--calibration-data", type=Path, default=None, help="interactions file (default: Beauty train)")
    p.add_argument("--calibration-size", type=int, default=512)
    p.add_argument("--calibration-method", default="entropy")
    p.add_argument("--exclude-sensitive", type=int, default=2)
    p.add_argument("--users", type=int, default=0, help="first N test users (0: all)")
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    p.add_argument("--work", type=Path, default=Path("/tmp/nezha-int8-report"))
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p


def int8_graphs(a, model, catalog, limits) -> tuple[dict, dict, dict, CalibrationReader]:
    """fp32, int8 and int8-cpu graphs of ``model`` -> (graphs, calibration report, hidden-state cosines, reader)."""
    from nezha.export.graphs import onnx_from_model

    fp32 = onnx_from_model(model, a.work / "fp32", limits)
    reader = CalibrationReader.from_file(a.calibration_data, catalog, model.layout, a.max_history, a.calibration_size)
    report: dict = {}
    graphs = {"fp32": fp32,
              "int8": int8_from_onnx(fp32, a.work / "int8", reader, method=a.calibration_method,
                                     exclude_sensitive=a.exclude_sensitive, cache_path=a.work / "calibration.json",
                                     report=report),
              "int8-cpu": int8_cpu_from_onnx(fp32, a.work / "int8-cpu")}
    check = list(reader)[:4]
    validation = {p: validate_int8(fp32["backbone"], graphs[p]["backbone"], check, min_mean_cosine=0,
                                   min_cosine=0, max_relative_error=1e9)["hidden"] for p in ("int8", "int8-cpu")}
    return graphs, report, validation, reader


def quality(a, model, catalog, limits, graphs, histories, targets) -> tuple[dict, dict]:
    """Recall/NDCG per precision, top-10 overlap with fp32 -> (metrics, the heads' share of decode time)."""
    from nezha.export.graphs import graph_specs
    from nezha.model.evaluate import decode_all, overlap_shares, ranking_metrics
    from nezha.model.reference import Reference

    recs, metrics, stages = {}, {}, {}
    for prec, paths in graphs.items():
        t0, stages[prec] = time.perf_counter(), {}
        decoder = Reference(model, catalog, a.max_history, steps=ort_validation_steps(graph_specs(model, limits), paths))
        recs[prec] = [[i for i, _ in r] for r in decode_all(decoder, histories, a.beam, 10, a.batch_size, True, prec,
                                                             stages[prec])]
        metrics[prec] = {**ranking_metrics(recs[prec], targets), "seconds": round(time.perf_counter() - t0, 1)}
        if prec != "fp32":
            metrics[prec]["top10_overlap_with_fp32"] = float(np.mean(overlap_shares(recs[prec], recs["fp32"])))
            metrics[prec]["identical_top10_share"] = float(np.mean([r == f for r, f in zip(recs[prec], recs["fp32"])]))
    return metrics, {p: sum(v for k, v in s.items() if k.startswith("head_")) / sum(s.values()) for p, s in stages.items()}


def main(argv=None):
    import torch
    from nezha.export.graphs import model_limits
    from nezha.model.checkpoint import load_catalog, load_checkpoint

    a = parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_checkpoint(a.checkpoint)
    layout = model.layout
    catalog = load_catalog(a.index, a.checkpoint, layout)
    limits = model_limits(model, a.max_history, a.batch_size, max(a.beam, 1))
    graphs, report, validation, reader = int8_graphs(a, model, catalog, limits)
    split = leave_one_out(read_interactions(find_pair(a.data)[1]), "test")
    histories, targets = split.histories, split.targets
    if a.users:
        histories, targets = histories[:a.users], targets[:a.users]
    metrics, head_share = quality(a, model, catalog, limits, graphs, histories, targets)
    sessions = {p: cpu_session(g["backbone"], a.threads) for p, g in graphs.items()}
    lengths = sorted(histories, key=len)
    latency = interleaved_latency(sessions, {
        f"B=1 T={a.max_history * layout.levels + layout.levels}": encode_histories([lengths[-1]], catalog, layout, a.max_history),
        "B=64 (longest test users)": encode_histories(lengths[-64:], catalog, layout, a.max_history)}, a.rounds)

    print(f"\nusers {len(histories)}, beam {a.beam}, calibration {a.calibration_method} on {reader.samples} "
          f"train histories, {len(report['excluded'])} sensitive MatMuls kept float, ORT CPU threads {a.threads}")
    print(f"{'precision':<10} {'R@10':>7} {'NDCG@10':>8} {'R@5':>7} {'overlap@10':>10} {'same top10':>10} "
          f"{'cos(h)':>8} {'heads %':>8}")
    for prec, m in metrics.items():
        v = validation.get(prec, {})
        print(f"{prec:<10} {m['recall@10']:>7.4f} {m['ndcg@10']:>8.4f} {m['recall@5']:>7.4f} "
              f"{m.get('top10_overlap_with_fp32', 1.0):>10.4f} {m.get('identical_top10_share', 1.0):>10.4f} "
              f"{v.get('mean_cosine', 1.0):>8.5f} {100 * head_share[prec]:>7.1f}%")
    print("backbone latency, ms (median, interleaved):")
    for f, row in latency.items():
        print(f"  {f:<28} " + "  ".join(f"{p} {ms:.3f}" for p, ms in row.items())
              + f"   int8/fp32 {row['int8'] / row['fp32']:.2f}  int8-cpu/fp32 {row['int8-cpu'] / row['fp32']:.2f}")
    if a.out:
        a.out.write_text(json.dumps({"metrics": metrics, "validation": validation, "latency_ms": latency,
                                     "head_share_of_decode": head_share, "sensitivity": report["sensitivity"],
                                     "excluded": report["excluded"], "args": {k: str(v) for k, v in vars(a).items()}},
                                    indent=2))


if __name__ == "__main__":
    from nezha.runtime.cli import guarded
    sys.exit(guarded("int8_report", main))
