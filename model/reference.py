"""The reference NEZHA decoder (the oracle every backend is compared to): the torch model feeds the
runtime's own decode loop, so a parity failure points at a graph, never at two loops that drifted."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from nezha.runtime.catalog import Catalog
from nezha.runtime.decode import Verifier, beam_search
from nezha.runtime.encoding import encode_histories, items_from_sids

from .nezha import NezhaModel


class TorchSteps:
    """DecodeSteps over a NezhaModel (numpy in, numpy out)."""

    def __init__(self, model: NezhaModel, device: str = "cpu"):
        if model.mtp_head is None:
            raise ValueError("this model has no draft head (use_mtp=False): decode it with the AR baseline")
        self.model, self.device = model, torch.device(device)

    @torch.inference_mode()
    def backbone(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        ids = torch.from_numpy(feed["input_ids"]).to(self.device)
        mask = torch.from_numpy(feed["attention_mask"]).to(self.device)
        return self.model.nezha_hidden(ids, mask).float().cpu().numpy()

    @torch.inference_mode()
    def head_step(self, level, parents, parent, code, hidden):
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        state, logp = self.model.mtp_head.parent_step(level, t(parents), t(parent), t(code), t(hidden))
        return None if state is None else state.float().cpu().numpy(), logp.cpu().numpy()


class SidDecoder:
    """What both torch decoders (``Reference`` and the AR baseline) share: the catalog's verifier and SID
    table, and ``recommend`` on top of their ``decode(histories, beam)``."""

    def __init__(self, model: NezhaModel, catalog: Catalog, max_history: int = 20):
        catalog.check_layout(model.layout)
        self.model, self.catalog, self.max_history = model, catalog, max_history
        self.layout = model.layout
        self.verifier = Verifier(self.layout, catalog.valid_prefixes(self.layout))
        self.sid_table = catalog.sid_table(self.layout)

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, beam: int = 20) -> list[list[tuple[int, float]]]:
        """Per history up to k (item id, summed log-prob) pairs, best first."""
        if not 1 <= k <= beam:
            raise ValueError(f"need 1 <= k <= beam, got k={k}, beam={beam}")
        keys, scores = self.decode(histories, beam)
        return items_from_sids(keys, scores, self.sid_table, k)


class Reference(SidDecoder):
    """recommend() with the torch model: one backbone pass, beam search in the head, the verifier.
    ``steps`` replaces the torch steps (e.g. an artifact's graphs) to decode the same way with them."""

    def __init__(self, model: NezhaModel, catalog: Catalog, max_history: int = 20, device: str = "cpu",
                 steps=None):
        super().__init__(model, catalog, max_history)
        self.steps = steps or TorchSteps(model, device)

    def decode(self, histories: Sequence[Sequence[int]], beam: int, verify: bool = True, stages: dict | None = None):
        """-> (sid_keys [B, K] uint64, scores [B, K] float32), best first (``stages``: seconds per stage)."""
        feed = encode_histories(histories, self.catalog, self.layout, self.max_history)
        return beam_search(self.steps, feed, self.layout, self.verifier if verify else None, beam, stages)
