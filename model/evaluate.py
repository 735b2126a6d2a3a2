"""Quality of NEZHA and the AR baseline on a LETTER dataset's leave-one-out split: Recall@5/10,
NDCG@5/10, the share of invalid SIDs when the verifier is off and, with --artifact, the same through
the runtime with its top-10 agreement with the torch reference.

    python -m nezha.model.evaluate --checkpoint checkpoints/demo/nezha --ar-checkpoint checkpoints/demo/ar \
        --artifact artifacts/nezha
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from nezha.runtime.catalog import Catalog
from nezha.runtime.data import DEFAULT_DATA, find_pair, leave_one_out, read_interactions
from nezha.runtime.encoding import items_from_sids
from nezha.runtime.errors import NezhaError
from tqdm import tqdm

KS = (5, 10)


def ranking_metrics(recs: list[list[int]], targets: np.ndarray, ks=KS) -> dict[str, float]:
    """Recall@k and NDCG@k for one held-out target per user (rank r, 0-based: NDCG = 1/log2(r+2))."""
    out = {}
    ranks = np.array([r.index(t) if t in r else -1 for r, t in zip(recs, targets.tolist())])
    for k in ks:
        hit = (ranks >= 0) & (ranks < k)
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0).mean())
    return out


def batches_by_length(histories, batch_size: int):
    """Index batches of similar history length (less padding), in a fixed order."""
    order = np.argsort([len(h) for h in histories], kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def decode_all(decoder, histories, beam: int = 20, k: int = max(KS), batch_size: int = 256, progress: bool = True,
               desc: str = "decode", stages: dict | None = None) -> list[list[tuple[int, float]]]:
    """Top-k (item, score) per history with any decoder that has ``decode(histories, beam)`` and
    ``sid_table`` (Reference, ArDecoder, the runtime's Recommender); ``stages`` collects seconds per stage
    from decoders that report them."""
    recs: list = [None] * len(histories)
    for idx in tqdm(list(batches_by_length(histories, batch_size)), desc=desc, disable=not progress):
        batch = [histories[i] for i in idx]
        keys, scores = decoder.decode(batch, beam) if stages is None else decoder.decode(batch, beam, stages=stages)
        for i, r in zip(idx, items_from_sids(keys, scores, decoder.sid_table, k)):
            recs[i] = r
    return recs


def invalid_share(reference, histories, beam: int = 20, k: int = max(KS), batch_size: int = 256) -> float:
    """Share of the top-k SIDs that name no real item when the verifier is off (NEZHA reference only)."""
    invalid = total = 0
    for idx in batches_by_length(histories, batch_size):
        keys, _ = reference.decode([histories[i] for i in idx], beam, verify=False)
        invalid += int((~np.isin(keys[:, :k], reference.sid_table[0])).sum())
        total += keys[:, :k].size
    return invalid / max(total, 1)


def overlap_shares(ours: list[list[int]], reference: list[list[int]]) -> list[float]:
    """Per history, |our top-k items & the reference's| / |the reference's| (1.0 when both are empty)."""
    return [len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(ours, reference)]


def agreement(recs, reference_recs) -> dict[str, float]:
    """How a decoder's top-k lists compare to the reference's: identical lists (items and order), mean
    item overlap, and the max score difference over items ranked at the same place."""
    same = [[i for i, _ in a] == [i for i, _ in b] for a, b in zip(recs, reference_recs)]
    overlap = overlap_shares([[i for i, _ in r] for r in recs], [[i for i, _ in r] for r in reference_recs])
    diffs = [abs(x[1] - y[1]) for a, b, s in zip(recs, reference_recs, same) if s for x, y in zip(a, b)]
    return {"identical_topk_share": float(np.mean(same)), "topk_overlap": float(np.mean(overlap)),
            "max_score_diff_when_identical": float(max(diffs, default=0.0))}


def evaluate(decoder, histories, targets: np.ndarray, beam: int = 20, batch_size: int = 256,
             progress: bool = True, desc: str = "evaluate") -> tuple[dict[str, float], list]:
    """Decode every history and score against ``targets`` -> (metrics, the top-10 lists)."""
    t0 = time.perf_counter()
    recs = decode_all(decoder, histories, beam, max(KS), batch_size, progress, desc)
    metrics = ranking_metrics([[i for i, _ in r] for r in recs], targets)
    metrics.update(users=len(histories), seconds=round(time.perf_counter() - t0, 1))
    return metrics, recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="NEZHA checkpoint folder (the torch reference)")
    p.add_argument("--ar-checkpoint", type=Path, help="AR baseline checkpoint folder")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LETTER dataset folder (default: Beauty)")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N users")
    p.add_argument("--artifact", type=Path, help="also evaluate this artifact through the runtime (ONNX Runtime "
                   "CPU) and compare its top-10 lists with the torch reference of --checkpoint")
    p.add_argument("--precision", nargs="+", default=None, help="artifact precisions to evaluate (default: all)")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    a = p.parse_args(argv)
    if not (a.checkpoint or a.ar_checkpoint or a.artifact):
        p.error("give --checkpoint, --ar-checkpoint and/or --artifact")
    try:
        results = run(a)
    except NezhaError as e:          # checkpoint, catalog, data, artifact: say what, no traceback
        p.exit(e.exit_code, f"error: {e}\n")
    print(json.dumps(results, indent=2))
    for kind, record in results.get("training", {}).items():
        print(f"{kind} training: {training_line(record)}")
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


def training_record(checkpoint: Path) -> dict:
    """What the trainer recorded of a checkpoint (steps, whether it finished, the time), beside the figures."""
    raw = json.loads((Path(checkpoint) / "training.json").read_text())
    steps = raw.get("config", {}).get("steps")
    return {"steps": raw.get("steps"), "of_steps": steps, "train_seconds": raw.get("train_seconds"),
            "completed": raw.get("completed", raw.get("steps") == steps), "stopped_by": raw.get("stopped_by")}


def training_line(r: dict) -> str:
    done = "completed" if r["completed"] else f"STOPPED EARLY ({r['stopped_by'] or 'before its schedule ended'})"
    return f"{r['steps']} of {r['of_steps']} steps, {r['train_seconds']} s, {done}"


def run(a) -> dict:
    from .ar import ArDecoder
    from .checkpoint import load_checkpoint
    from .reference import Reference

    index, inter = find_pair(a.data)
    catalog = Catalog.from_index_json(index)
    split = leave_one_out(read_interactions(inter), a.split)
    hist, targets = split.histories[:a.limit], split.targets[:a.limit]
    results = {"data": str(a.data), "split": a.split, "beam": a.beam}
    results["training"] = {kind: training_record(path) for kind, path in (("nezha", a.checkpoint), ("ar", a.ar_checkpoint))
                           if path is not None and (Path(path) / "training.json").is_file()}
    if a.checkpoint:
        ref = Reference(load_checkpoint(a.checkpoint), catalog, a.max_history)
        results["nezha"], ref_recs = evaluate(ref, hist, targets, a.beam, desc="nezha (torch)")
        results["nezha"]["invalid_sid_share_without_verifier"] = invalid_share(ref, hist, a.beam)
    if a.ar_checkpoint:
        ar = ArDecoder(load_checkpoint(a.ar_checkpoint), catalog, a.max_history)
        results["ar"], _ = evaluate(ar, hist, targets, a.beam, desc="ar (torch)")
    if a.artifact:
        from nezha.runtime import Recommender
        from nezha.runtime.artifact import Artifact
        for precision in a.precision or list(Artifact.open(a.artifact).manifest.precisions):
            with Recommender.load(a.artifact, precision=precision) as rec:
                m, recs = evaluate(rec, hist, targets, a.beam, desc=f"runtime {precision}")
            if a.checkpoint:
                m.update(agreement(recs, ref_recs))
            results[f"runtime_{precision}"] = m
    return results


if __name__ == "__main__":
    main()
