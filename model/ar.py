"""The AR baseline (TIGER/LETTER style): the backbone's LM head over the SID tokens, L steps of
constrained beam search with a KV cache. Prefill once per user, then all beams advance as one batch."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nezha.runtime.catalog import Catalog
from nezha.runtime.decode import expand, select
from nezha.runtime.encoding import encode_histories
from transformers import DynamicCache

from .nezha import NezhaModel, positions_from_mask
from .reference import SidDecoder


class ArDecoder(SidDecoder):
    def __init__(self, model: NezhaModel, catalog: Catalog, max_history: int = 20, device: str = "cpu"):
        super().__init__(model, catalog, max_history)
        self.device = torch.device(device)

    def _level_logp(self, hidden_last: torch.Tensor, level: int) -> np.ndarray:
        """[N, H] -> [N, codes_level] log-probs of the level's code tokens (softmax over the full vocabulary)."""
        logp = F.log_softmax(self.model.lm_head(hidden_last).float(), dim=-1)
        lo = self.layout.offsets[level]
        return logp[:, lo:lo + self.layout.codes[level]].cpu().numpy()

    @torch.inference_mode()
    def decode(self, histories: Sequence[Sequence[int]], beam: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (sid_keys [B, K] uint64, scores [B, K] float32), best first."""
        L = self.layout.levels
        feed = encode_histories(histories, self.catalog, self.layout, self.max_history)
        ids = torch.from_numpy(feed["input_ids"][:, :-L]).to(self.device)          # drop the placeholders
        mask = torch.from_numpy(feed["attention_mask"][:, :-L]).to(self.device)
        B = ids.shape[0]
        cache = DynamicCache(config=self.model.config)
        pos = positions_from_mask(mask)
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                               use_cache=True)                                       # prefill [B, T, H]
        hidden_last, next_pos = out.last_hidden_state[:, -1], pos[:, -1:] + 1
        scores = np.zeros((B, 1), dtype=np.float32)
        keys = np.zeros(B, dtype=np.uint64)
        for level in range(L):
            cand = expand(scores, self._level_logp(hidden_last, level), keys, level, self.verifier)   # [B, K*C]
            scores, parent, code, keys = select(cand, beam, self.layout.codes[level], keys)
            if level == L - 1:
                break
            parent_t = torch.from_numpy(parent).to(self.device)
            cache.reorder_cache(parent_t)                                            # beams follow their parents
            mask = torch.cat([mask[parent_t], torch.ones_like(mask[parent_t, :1])], dim=1)
            next_pos = next_pos[parent_t]
            token = torch.from_numpy(code + self.layout.offsets[level]).to(self.device)[:, None]
            out = self.model.model(input_ids=token, attention_mask=mask, position_ids=next_pos,
                                   cache=cache, use_cache=True)
            hidden_last, next_pos = out.last_hidden_state[:, -1], next_pos + 1
        return keys.reshape(B, -1), scores
