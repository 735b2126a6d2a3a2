"""Quality of NEZHA and the AR baseline on a LETTER dataset's leave-one-out split:
Recall@5/10, NDCG@5/10 and the share of invalid SIDs when the verifier is off.

    python -m nezha.model.evaluate --checkpoint cache/demo/nezha --ar-checkpoint cache/demo/ar
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nezha.data import DEFAULT_DATA, find_pair, leave_one_out, read_interactions
from nezha.runtime.catalog import Catalog
from nezha.runtime.decode import items_from_sids

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


def evaluate(decoder, histories, targets: np.ndarray, beam: int = 20, batch_size: int = 256,
             invalid_share: bool = False, progress: bool = True) -> dict[str, float]:
    """Decode every history with ``decoder`` (Reference or ArDecoder) and score against ``targets``.
    With ``invalid_share`` (NEZHA only), also decode with the verifier off and report the share of the
    top-10 SIDs that name no real item."""
    recs: list[list[int]] = [[] for _ in histories]
    invalid = total = 0
    t0 = time.perf_counter()
    for idx in tqdm(list(batches_by_length(histories, batch_size)), desc="evaluate", disable=not progress):
        batch = [histories[i] for i in idx]
        keys, scores = decoder.decode(batch, beam)
        for i, r in zip(idx, items_from_sids(keys, scores, decoder.sid_table, max(KS))):
            recs[i] = [item for item, _ in r]
        if invalid_share:
            free_keys, _ = decoder.decode(batch, beam, verify=False)
            top = free_keys[:, :max(KS)]
            invalid += int((~np.isin(top, decoder.sid_table[0])).sum())
            total += top.size
    metrics = ranking_metrics(recs, targets)
    metrics["users"] = len(histories)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    if invalid_share:
        metrics["invalid_sid_share_without_verifier"] = invalid / max(total, 1)
    return metrics


def main(argv=None):
    from .ar import ArDecoder
    from .checkpoint import load_checkpoint
    from .reference import Reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="NEZHA checkpoint folder")
    p.add_argument("--ar-checkpoint", type=Path, help="AR baseline checkpoint folder")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LETTER dataset folder (default: Beauty)")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N users")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    a = p.parse_args(argv)
    if not a.checkpoint and not a.ar_checkpoint:
        p.error("give --checkpoint and/or --ar-checkpoint")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    index, inter = find_pair(a.data)
    catalog = Catalog.from_index_json(index)
    split = leave_one_out(read_interactions(inter), a.split)
    hist, targets = split.histories[:a.limit], split.targets[:a.limit]
    results = {"data": str(a.data), "split": a.split, "beam": a.beam}
    if a.checkpoint:
        ref = Reference(load_checkpoint(a.checkpoint), catalog, a.max_history)
        results["nezha"] = evaluate(ref, hist, targets, a.beam, invalid_share=True)
    if a.ar_checkpoint:
        ar = ArDecoder(load_checkpoint(a.ar_checkpoint), catalog, a.max_history)
        results["ar"] = evaluate(ar, hist, targets, a.beam)
    print(json.dumps(results, indent=2))
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
