"""The NEZHA model in PyTorch: a Hugging Face decoder backbone plus the autoregressive draft head.

Parameter names follow the public NEZHA training code (``model.*``, ``lm_head.*``, ``mtp_head.*``) so
that its checkpoints load as they are. The same class with ``use_mtp=False`` is the AR baseline
(backbone + LM head over the SID tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nezha.runtime.encoding import SidLayout
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# model_type -> (config class, causal LM class). Adding an architecture = one line here + a parity test.
ARCHITECTURES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask of left-padded rows -> [B, T] int64 positions: 0 on padding, then 0, 1, 2 ... (the
    formula every graph and decoder uses; runtime/encoding.py writes the mask it reads)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def layout_from_config(config: PretrainedConfig) -> SidLayout:
    """SID layout from the checkpoint config's ``docid_num`` (int or per-level list), ``offset`` and ``max_sid``."""
    levels = len(config.offset)
    codes = config.docid_num if isinstance(config.docid_num, (list, tuple)) else [config.docid_num] * levels
    return SidLayout(codes=tuple(int(c) for c in codes), offsets=tuple(int(o) for o in config.offset),
                     placeholder_start=int(config.max_sid), pad_token_id=int(getattr(config, "pad_token_id", 0) or 0))


class DraftHead(nn.Module):
    """Per level i: embedding E_i [codes_i, H], tanh RNN cell R_i (H -> H), linear W_i [codes_i, H] (no bias).

    logits_i = W_i(state + h_i); state <- R_i(E_i(c_i), state); state starts at the root hidden state.
    """

    def __init__(self, hidden_size: int, codes: tuple[int, ...]):
        super().__init__()
        self.token_emb_list = nn.ModuleList(nn.Embedding(c, hidden_size) for c in codes)
        self.transition = nn.ModuleList(nn.RNNCell(hidden_size, hidden_size, nonlinearity="tanh") for _ in codes)
        self.logit_head_list = nn.ModuleList(nn.Linear(hidden_size, c, bias=False) for c in codes)

    def step(self, level: int, state: torch.Tensor, code: torch.Tensor | None,
             hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step: state [N, H], previous level's code [N] (None at level 0), h_level [N, H]
        -> (state after consuming ``code`` [N, H], log-probs [N, codes_level] float32)."""
        if level > 0:
            state = self.transition[level - 1](self.token_emb_list[level - 1](code), state)
        logits = self.logit_head_list[level](state + hidden)
        return state, F.log_softmax(logits.float(), dim=-1)

    def parent_step(self, level: int, parents: torch.Tensor, parent: torch.Tensor | None, code: torch.Tensor | None,
                    hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``step`` as the exported graphs run it, with the RNN's recurrent matmul done once per parent
        beam, before its children are gathered. Level 0: parents = the roots [N, H] (parent, code None).
        Level > 0: parents [P, H] = the states of the beams that have children, parent [N] = each
        child's row in it, code [N] = each child's code. hidden: h_level [N, H].
        -> (the children's states [N, H], None at level 0 and at the last level; log-probs [N, codes] float32)."""
        if level == 0:
            state = parents
        else:
            cell = self.transition[level - 1]
            carry = parents @ cell.weight_hh.T                                    # [P, H]: once per parent
            x = F.linear(self.token_emb_list[level - 1](code), cell.weight_ih, cell.bias_ih) + cell.bias_hh
            state = torch.tanh(x + carry[parent])                                 # [N, H]
        logits = self.logit_head_list[level](state + hidden)
        keep = 0 < level < len(self.logit_head_list) - 1
        return (state if keep else None), F.log_softmax(logits.float(), dim=-1)

    def forward(self, root: torch.Tensor, hidden: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher forcing: root [N, H], placeholders [N, L, H], target codes [N, L] -> L logits [N, codes_i]."""
        state, logits = root, []
        for i, head in enumerate(self.logit_head_list):
            logits.append(head(state + hidden[:, i]))
            state = self.transition[i](self.token_emb_list[i](codes[:, i]), state)
        return logits


class NezhaModel(nn.Module):
    """Backbone (``model``), LM head (``lm_head``, used by the AR baseline only) and draft head (``mtp_head``)."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.model_type not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {config.model_type!r}; supported: {', '.join(ARCHITECTURES)}")
        self.config = config
        self.layout = layout_from_config(config)
        causal = ARCHITECTURES[config.model_type][1](config)
        self.model, self.lm_head = causal.model, causal.lm_head
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.use_mtp = bool(getattr(config, "use_mtp", True))
        self.mtp_head = DraftHead(config.hidden_size, self.layout.codes) if self.use_mtp else None

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] left-padded ids and 0/1 mask (or a 4-D boolean mask with explicit positions) -> [B, T, H]."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state

    def nezha_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states NEZHA reads: [B, L+1, H] = root (last history token), h_0 .. h_{L-1}."""
        return self.last_hidden(input_ids, attention_mask)[:, -(self.layout.levels + 1):]
