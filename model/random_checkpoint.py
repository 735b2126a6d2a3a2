"""A random-weight NEZHA checkpoint of a chosen backbone shape, for latency runs (scores are meaningless).

    python -m nezha.model.random_checkpoint --out cache/bench/qwen3-768x12 --hidden-size 768 --num-layers 12 \\
        --num-heads 12 --num-kv-heads 4 --intermediate-size 3072          # the ~100M-param probe shape

The SID layout is Beauty's (4 x 256, code tokens after [pad, eos], as the demo trainer's) with
``--layout beauty``, or 3 x 512 random SIDs for the Beauty items with ``--layout 3x512``; the catalog is
written as ``ava_sid{L}.pt`` and as a LETTER ``items.index.json`` beside the checkpoint, so that
``export/build.py --index`` keeps the Beauty item ids."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SHAPE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4, "intermediate_size": 3072}


def layout_and_catalog(kind: str, data: Path, vocab: int, seed: int = 0):
    """("3x512" | "beauty") -> (SidLayout with code tokens after ``vocab`` tokens, Catalog of the Beauty items)."""
    from nezha.runtime.catalog import Catalog
    from nezha.runtime.data import find_pair
    from nezha.runtime.encoding import SidLayout

    beauty = Catalog.from_index_json(find_pair(data)[0])
    if kind == "beauty":
        catalog, codes = beauty, tuple(int(c) for c in beauty.item_codes.max(0) + 1)
    elif kind == "3x512":
        codes, rng = (512, 512, 512), np.random.default_rng(seed)
        catalog = Catalog(beauty.item_ids, np.stack([rng.integers(0, c, len(beauty.item_ids)) for c in codes], 1))
    else:
        raise ValueError(f"layout {kind!r}; allowed: 3x512, beauty")
    offsets = tuple(vocab + sum(codes[:i]) for i in range(len(codes)))
    return SidLayout(codes, offsets, placeholder_start=offsets[-1] + codes[-1], pad_token_id=0), catalog


def random_model(layout, shape: dict, seed: int = 0):
    """A random-weight NEZHA model (float32, eval) of the given backbone shape (``head_dim`` may differ from
    hidden_size / num_heads: Qwen3-0.6B has 16 heads x 128 in a hidden size of 1024)."""
    import torch
    from nezha.model.checkpoint import make_config
    from nezha.model.nezha import NezhaModel

    config = make_config(layout, "qwen3", **{k: shape[k] for k in SHAPE})
    config.head_dim = shape["head_dim"]
    torch.manual_seed(seed)
    return NezhaModel(config).float().eval()


def random_checkpoint(out: Path, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                      num_kv_heads: int = 4, head_dim: int | None = None, intermediate_size: int = 3072,
                      vocab: int = 2, layout: str = "beauty", data: Path | None = None, seed: int = 0) -> Path:
    """Write the checkpoint folder ``out`` (overwriting) and ``out``/../<name>.index.json; returns ``out``."""
    from nezha.model.checkpoint import save_checkpoint
    from nezha.runtime.data import DEFAULT_DATA

    sid_layout, catalog = layout_and_catalog(layout, data or DEFAULT_DATA, vocab, seed)
    shape = {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
             "num_kv_heads": num_kv_heads, "head_dim": head_dim or hidden_size // num_heads,
             "intermediate_size": intermediate_size}
    model = random_model(sid_layout, shape, seed)
    save_checkpoint(model, out, catalog, overwrite=True)
    index = catalog.to_index_json(Path(out).with_name(Path(out).name + ".index.json"))
    print(f"wrote {out} ({sum(p.numel() for p in model.model.parameters()) / 1e6:.1f}M backbone params) and {index}")
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    for name, default in SHAPE.items():                     # the backbone shape: random_checkpoint's arguments
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--head-dim", type=int, help="default: hidden_size / num_heads")
    p.add_argument("--vocab", type=int, default=2, help="tokens before the SID codes (Qwen3: 151669)")
    p.add_argument("--layout", default="beauty", choices=["beauty", "3x512"])
    p.add_argument("--data", type=Path, help="LETTER dataset folder (default: Beauty)")
    p.add_argument("--seed", type=int, default=0)
    random_checkpoint(**vars(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    from nezha.runtime.cli import guarded
    sys.exit(guarded("random_checkpoint", main))
