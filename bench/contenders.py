"""The contenders of a benchmark, each one callable on a request (a batch of histories) at a beam width.

A contender's ``run(histories, beam)`` decodes (or, for a floor, runs the backbone once) and returns the
seconds it spent per stage: "encode", "backbone", "head_0".."head_{L-1}", "verify_0".."verify_{L-1}", "select" where the
contender can tell them apart. The timer around the call gives the total; total minus the stages is host
overhead (Python, copies, mapping). Torch is imported only by the torch-side contenders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from nezha.runtime.decode import stage

KINDS = ("floor", "nezha", "reference", "ar", "hf-generate")


@dataclass
class Contender:
    """One thing to time. ``kind`` is one of KINDS; ``engine`` names backend, precision and device
    (e.g. "onnxruntime-fp32-cpu", "torch-fp32-cpu"); the name is ``kind[engine]``."""

    kind: str
    engine: str
    run: Callable[[Sequence[Sequence[int]], int], dict]
    limits: dict = field(default_factory=dict)            # max_batch / max_beam, where the contender has them
    close: Callable[[], None] = lambda: None
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.engine}]"

    def skip_reason(self, batch_size: int, beam: int) -> str | None:
        """Why this contender cannot run a (batch_size, beam) request, or None."""
        if batch_size > self.limits.get("max_batch", batch_size):
            return f"batch {batch_size} > the artifact's max_batch {self.limits['max_batch']}"
        if beam > self.limits.get("max_beam", beam):
            return f"beam {beam} > the artifact's max_beam {self.limits['max_beam']}"
        return None


# --- the runtime (an artifact) -------------------------------------------------------------------------

def runtime_contenders(artifact: str | Path, backend: str, precision: str, device: str = "cpu",
                       threads: int | None = None) -> list[Contender]:
    """The floor (encode + backbone) and NEZHA through one loaded Recommender (``threads``: ONNX Runtime
    intra-op threads; None = its default); ``backend`` "cpp": the C++ runtime, which times its stages inside."""
    if backend == "cpp":
        from nezha.runtime.backends.cpp import CppRecommender

        rec, engine = CppRecommender.load(artifact, precision=precision, threads=threads), f"cpp-{precision}-cpu"

        def floor(histories, beam):
            rec.backbone(histories, stages=(stages := {}))
            return stages

        def nezha(histories, beam):
            rec.recommend(histories, k=min(10, beam), beam=beam, stages=(stages := {}))
            return stages
    else:
        from nezha.runtime import Recommender

        device = device if backend == "onnxruntime" or device.startswith("cuda") else "cuda"
        rec = Recommender.load(artifact, backend=backend, device=device, precision=precision, threads=threads)
        engine = f"{backend}-{precision}-{device}"

        def floor(histories, beam):
            stages: dict = {}
            with stage(stages, "encode"):
                feed = rec.encode(histories)
            with stage(stages, "backbone"):
                rec.backbone(feed)
            return stages

        def nezha(histories, beam):
            rec.decode(histories, beam, stages=(stages := {}))
            return stages
    limits = {"max_batch": rec.max_batch, "max_beam": rec.max_beam}
    return [Contender("floor", engine, floor, limits), Contender("nezha", engine, nezha, limits, close=rec.close)]


# --- the torch side (a checkpoint) ------------------------------------------------------------------------

def reference_contenders(model, catalog, device: str = "cpu", max_history: int = 20) -> list[Contender]:
    """The torch floor (backbone only) and the PyTorch reference NEZHA, both on ``model`` (a NezhaModel
    with a draft head), sharing the runtime's encoder and decode loop so that the stages line up."""
    from nezha.model.reference import Reference
    from nezha.runtime.decode import beam_search
    from nezha.runtime.encoding import encode_histories

    ref = Reference(model.to(device), catalog, max_history=max_history, device=device)

    def encode(histories, stages):
        with stage(stages, "encode"):
            return encode_histories(histories, ref.catalog, ref.layout, ref.max_history)

    def floor(histories, beam):
        stages: dict = {}
        feed = encode(histories, stages)
        with stage(stages, "backbone"):
            ref.steps.backbone(feed)
        return stages

    def reference(histories, beam):                 # Reference.decode with the stage timer
        stages: dict = {}
        beam_search(ref.steps, encode(histories, stages), ref.layout, ref.verifier, beam, stages=stages)
        return stages

    return [Contender("floor", f"torch-fp32-{device}", floor), Contender("reference", f"torch-fp32-{device}", reference)]


def ar_model_from(model, seed: int = 0):
    """An AR baseline model for latency runs: the NEZHA model's config with use_mtp=False, the same
    backbone weights and a random LM head (its scores are meaningless; its cost is the real one)."""
    import copy

    import torch
    from nezha.model.nezha import NezhaModel

    config = copy.deepcopy(model.config)
    config.use_mtp = False
    torch.manual_seed(seed)
    ar = NezhaModel(config)
    ar.model.load_state_dict(model.model.state_dict())
    return ar.float().eval()


def ar_contender(ar_model, catalog, device: str = "cpu", max_history: int = 20, note: str = "") -> Contender:
    """The AR baseline: L steps of constrained beam search with a KV cache (one timer: no stages)."""
    from nezha.model.ar import ArDecoder

    dec = ArDecoder(ar_model.to(device), catalog, max_history=max_history, device=device)

    def ar(histories, beam):
        dec.decode(histories, beam)
        return {}

    return Contender("ar", f"torch-fp32-{device}", ar, note=note)


def hf_generate_contender(ar_model, catalog, device: str = "cpu", max_history: int = 20) -> Contender:
    """The naive approach: Hugging Face generate() with num_beams and a prefix_allowed_tokens_fn over the
    valid SID prefixes (one Python callback per beam per step). Same model as the AR baseline."""
    import numpy as np
    import torch
    from nezha.model.nezha import ARCHITECTURES
    from nezha.runtime.encoding import encode_histories
    from transformers import GenerationConfig

    layout = ar_model.layout
    causal = ARCHITECTURES[ar_model.config.model_type][1](ar_model.config)
    causal.model, causal.lm_head = ar_model.model, ar_model.lm_head
    causal = causal.to(device).eval()
    L = layout.levels
    # allowed next tokens per generated prefix (tuple of codes), from the catalog's SIDs
    allowed: dict[tuple, list[int]] = {}
    for codes in np.unique(catalog.item_codes, axis=0).tolist():
        for i in range(L):
            allowed.setdefault(tuple(codes[:i]), set()).add(layout.offsets[i] + codes[i])
    allowed = {k: sorted(v) for k, v in allowed.items()}
    pad = [layout.pad_token_id]

    @torch.inference_mode()
    def generate(histories, beam):
        feed = encode_histories(histories, catalog, layout, max_history)
        ids = torch.from_numpy(feed["input_ids"][:, :-L]).to(device)
        mask = torch.from_numpy(feed["attention_mask"][:, :-L]).to(device)
        T = ids.shape[1]

        def prefix_allowed(batch_id, sent):
            gen = sent[T:].tolist()
            codes = tuple(t - layout.offsets[i] for i, t in enumerate(gen))
            return allowed.get(codes, pad)

        config = GenerationConfig(num_beams=beam, num_return_sequences=beam, max_new_tokens=L, min_new_tokens=L,
                                  do_sample=False, early_stopping=True, pad_token_id=layout.pad_token_id,
                                  eos_token_id=None, bos_token_id=None)
        causal.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                        prefix_allowed_tokens_fn=prefix_allowed)
        return {}

    return Contender("hf-generate", f"torch-fp32-{device}", generate,
                     note="naive: transformers generate(num_beams, prefix_allowed_tokens_fn)")
