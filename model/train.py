"""Demo trainer: a NEZHA model and the AR baseline, same backbone config, from scratch on a LETTER dataset
(leave-one-out: training uses each user's items before the last two), on CPU, for a fixed number of steps.

    python -m nezha.model.train --out checkpoints/demo --threads 1    # both models on Beauty, ~20 min each

NEZHA samples are packed (the NEZHA paper, arXiv 2511.18793): one sequence = a window of history codes followed, for each
target, by its own group of L placeholders; a 4-D boolean mask lets each group see only the codes before
its target and its own earlier placeholders, with positions continuing from the target's slot."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nezha.runtime.catalog import Catalog
from nezha.runtime.data import DEFAULT_DATA, find_pair, leave_one_out, read_interactions
from nezha.runtime.encoding import SidLayout
from tqdm import tqdm

from .checkpoint import make_config, save_checkpoint
from .evaluate import evaluate
from .nezha import NezhaModel

PAD = 0


def demo_layout(catalog: Catalog) -> SidLayout:
    """Vocabulary of a from-scratch model: [pad, eos], the code tokens, the placeholders."""
    codes = tuple(int(c) for c in catalog.item_codes.max(0) + 1)
    offsets = tuple(int(2 + sum(codes[:i])) for i in range(len(codes)))
    return SidLayout(codes, offsets, placeholder_start=offsets[-1] + codes[-1], pad_token_id=PAD)


def windows(sequences: list[list[int]], size: int) -> list[list[int]]:
    """Cut each item sequence into windows of at most ``size`` items, from the end, overlapping by one
    item so that every item after the first is a target once."""
    out = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            out.append(seq[max(0, end - size):end])
            end -= size - 1
    return out


def nezha_batch(item_windows, catalog: Catalog, layout: SidLayout):
    """Packed NEZHA batch. Window w_1..w_m: history codes of w_1..w_{m-1} ((m-1)L tokens), then for each
    target j = 2..m a group of L placeholders. Returns ids [B, S], mask [B, 1, S, S] bool, positions
    [B, S], root index [G] and placeholder index [G, L] into the flattened [B*S] states, target codes [G, L]."""
    L = layout.levels
    lengths = [2 * (len(w) - 1) * L for w in item_windows]
    S = max(lengths)
    B = len(item_windows)
    ids = torch.full((B, S), layout.pad_token_id, dtype=torch.long)
    pos = torch.zeros((B, S), dtype=torch.long)
    mask = torch.eye(S, dtype=torch.bool).repeat(B, 1, 1)         # padding attends to itself only
    roots, groups, targets = [], [], []
    ph = torch.as_tensor(layout.placeholder_tokens())
    for b, w in enumerate(item_windows):
        codes, _ = catalog.codes_of(np.asarray(w))
        codes = torch.as_tensor(codes)
        n_hist = (len(w) - 1) * L
        ids[b, :n_hist] = torch.as_tensor(layout.code_tokens(codes[:-1].numpy())).reshape(-1)
        pos[b, :n_hist] = torch.arange(n_hist)
        mask[b, :n_hist, :n_hist] = torch.tril(torch.ones(n_hist, n_hist, dtype=torch.bool))
        for j in range(1, len(w)):                                 # target w[j], history w[:j]
            start = n_hist + (j - 1) * L
            seen = j * L                                           # history tokens before the target
            ids[b, start:start + L] = ph
            pos[b, start:start + L] = seen + torch.arange(L)
            mask[b, start:start + L, :seen] = True
            mask[b, start:start + L, start:start + L] = torch.tril(torch.ones(L, L, dtype=torch.bool))
            roots.append(b * S + seen - 1)
            groups.append(b * S + start + torch.arange(L))
            targets.append(codes[j])
    return ids, mask[:, None], pos, torch.tensor(roots), torch.stack(groups), torch.stack(targets)


def ar_batch(item_windows, catalog: Catalog, layout: SidLayout):
    """AR batch: all codes of the window, right padded; labels are the next code tokens from item 2 on."""
    L = layout.levels
    S = max(len(w) for w in item_windows) * L
    ids = torch.full((len(item_windows), S), layout.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, w in enumerate(item_windows):
        codes, _ = catalog.codes_of(np.asarray(w))
        toks = torch.as_tensor(layout.code_tokens(codes)).reshape(-1)
        ids[b, :len(toks)], mask[b, :len(toks)] = toks, 1
        labels[b, L - 1:len(toks) - 1] = toks[L:]                  # position t predicts token t+1
    return ids, mask, labels


def nezha_loss(model: NezhaModel, batch) -> torch.Tensor:
    ids, mask, pos, roots, groups, targets = batch
    hidden = model.last_hidden(ids, mask, pos).reshape(-1, model.config.hidden_size)   # [B*S, H]
    logits = model.mtp_head(hidden[roots], hidden[groups], targets)                    # L x [G, C_i]
    return sum(F.cross_entropy(lg, targets[:, i]) for i, lg in enumerate(logits))


def ar_loss(model: NezhaModel, batch) -> torch.Tensor:
    ids, mask, labels = batch
    hidden = model.last_hidden(ids, mask, torch.arange(ids.shape[1])[None].expand_as(ids))
    return F.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100) \
        * model.layout.levels                                        # summed over levels, like NEZHA's


def train(kind: str, data_dir: Path, out: Path, steps: int = 2400, minutes: float | None = None, batch_size: int = 64,
          lr: float = 2e-3, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
          architecture: str = "qwen3", max_history: int = 20, eval_every: int = 300, eval_users: int = 2000,
          seed: int = 0, log=print) -> dict:
    """Train one model ('nezha' or 'ar') for ``steps`` steps (warm-up, then the cosine schedule that the
    steps set) and keep the weights of the best validation Recall@10. Steps decide the result, so it is the
    same on a busy or a quiet machine; ``minutes`` (off by default) caps the time, and a run it stops is
    said loudly and recorded in training.json (``stopped_by``)."""
    from .ar import ArDecoder
    from .reference import Reference

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    index, inter = find_pair(data_dir)
    catalog, interactions = Catalog.from_index_json(index), read_interactions(inter)
    layout = demo_layout(catalog)
    samples = windows([items[:-2] for items in interactions.values() if len(items) >= 4], max_history + 1)
    valid = leave_one_out(interactions, "valid")
    pick = rng.choice(len(valid.users), size=min(eval_users, len(valid.users)), replace=False)
    model = NezhaModel(make_config(layout, architecture, hidden_size, num_layers, num_heads, max(1, num_heads // 2),
                                   use_mtp=kind == "nezha"))
    decoder = lambda: (Reference if kind == "nezha" else ArDecoder)(model, catalog, max_history)
    tracker = BestOnValidation(model, decoder, [valid.histories[i] for i in pick], valid.targets[pick])
    make_batch, loss_fn = (nezha_batch, nezha_loss) if kind == "nezha" else (ar_batch, ar_loss)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    t0, step, stopped_by = time.perf_counter(), 0, None
    bar = tqdm(desc=f"train {kind}", total=steps, unit="step", mininterval=2.0)
    while step < steps and stopped_by is None:
        order = rng.permutation(len(samples))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            if step >= steps:
                break
            if minutes is not None and time.perf_counter() - t0 >= minutes * 60:
                stopped_by = (f"time cap of {minutes:g} min at step {step} of {steps}: the cosine schedule did not "
                              "finish, so this model is not comparable with a full run")
                break
            batch = make_batch([samples[j] for j in order[i:i + batch_size]], catalog, layout)
            loss = optimizer_step(model, opt, loss_fn(model, batch), lr * schedule(step, steps))
            step += 1
            bar.update(1)
            bar.set_description(f"train {kind} loss {loss.item():.3f}", refresh=False)
            if step % eval_every == 0:
                bar.set_postfix_str(tracker.check(step, time.perf_counter() - t0))
    tracker.check(step, time.perf_counter() - t0)
    bar.close()
    if stopped_by:
        log(f"WARNING: {kind} stopped early by the {stopped_by}")
    tracker.restore_best()
    save_checkpoint(model, out, catalog, overwrite=True)
    summary = {"kind": kind, "train_seconds": round(time.perf_counter() - t0), "steps": step, "completed": stopped_by is None,
               "stopped_by": stopped_by, "best_valid": tracker.best, "history": tracker.history,
               "config": {"architecture": architecture, "hidden_size": hidden_size, "num_layers": num_layers,
                          "num_heads": num_heads, "batch_size": batch_size, "lr": lr, "steps": steps, "minutes": minutes,
                          "max_history": max_history, "seed": seed, "data": str(data_dir)}}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def schedule(step: int, steps: int) -> float:
    """The learning-rate factor: 100 warm-up steps, then cosine decay to 0 at ``steps``."""
    return min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))


def optimizer_step(model, opt, loss, lr: float):
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


class BestOnValidation:
    """Validation Recall@10 (beam 20) at checkpoints of training; keeps the best weights and the history."""

    def __init__(self, model, decoder, histories, targets):
        self.model, self.decoder, self.histories, self.targets = model, decoder, histories, targets
        self.best, self.best_state, self.history = {"recall@10": -1.0}, None, []

    def check(self, step: int, seconds: float) -> str:
        self.model.eval()
        m, _ = evaluate(self.decoder(), self.histories, self.targets, beam=20, progress=False)
        self.model.train()
        self.history.append({"step": step, "seconds": round(seconds), **m})
        if m["recall@10"] > self.best["recall@10"]:
            self.best = {**m, "step": step}
            self.best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        return f"val R@10 {m['recall@10']:.4f} (best {self.best['recall@10']:.4f})"

    def restore_best(self) -> None:
        self.model.load_state_dict(self.best_state)
        self.model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LETTER dataset folder (default: Beauty)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/demo"), help="writes OUT/nezha and OUT/ar")
    p.add_argument("--model", choices=["nezha", "ar", "both"], default="both")
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps per model (sets the lr schedule)")
    p.add_argument("--minutes", type=float, default=None,
                   help="optional time cap per model (off by default: the steps decide, so results do not depend on "
                        "machine load); a run it stops is reported and recorded in training.json")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--architecture", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=300, help="steps between validation Recall@10 checks")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    kinds = ["nezha", "ar"] if a.model == "both" else [a.model]
    for kind in kinds:
        s = train(kind, a.data, a.out / kind, a.steps, a.minutes, a.batch_size, a.lr, a.hidden_size, a.num_layers,
                  a.num_heads, a.architecture, a.max_history, a.eval_every, seed=a.seed)
        print(json.dumps({k: s[k] for k in ("kind", "train_seconds", "steps", "completed", "stopped_by", "best_valid")},
                         indent=2))


if __name__ == "__main__":
    main()
