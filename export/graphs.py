"""The exported graphs: the backbone (one graph) and the draft head (one graph per level), their
tensor specs (the manifest's ``graphs`` entries) and ``onnx_from_model``."""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch
from nezha.model.nezha import NezhaModel, positions_from_mask
from nezha.runtime.artifact import external_data_path
from nezha.runtime.errors import StepError
from nezha.runtime.manifest import GraphEntry, Limits, expected_graphs, token_range  # noqa: F401 (token_range: re-export)
from torch import nn

EXPORTERS = ("dynamo", "torchscript")
EXTERNAL_DATA_BYTES = 1_800_000_000     # protobuf's hard limit is 2 GiB; stay clear of it


def model_limits(model: NezhaModel, max_history: int = 20, max_batch: int = 64, max_beam: int = 512) -> Limits:
    """The manifest's limits for this model: the request bounds plus its hidden size."""
    return Limits(max_history, max_batch, max_beam, int(model.config.hidden_size))


def graph_specs(model: NezhaModel, limits: Limits) -> dict[str, GraphEntry]:
    """The manifest entries of ``backbone`` and ``head_0`` .. ``head_{L-1}`` (file still unset): the
    runtime's own ``expected_graphs``, so the build writes exactly what the loader checks."""
    return {name: GraphEntry("", None, inputs, outputs, dynamic)
            for name, (inputs, outputs, dynamic) in expected_graphs(model.layout, limits).items()}


class BackboneGraph(nn.Module):
    """input_ids, attention_mask [B, T] int64 (left padded) -> hidden [B, L+1, H] float32.

    The 4-D additive mask and the position ids are built here from the 0/1 mask, so the graph
    does not depend on transformers' mask helpers (which trace poorly under the dynamo exporter).
    """

    def __init__(self, model: NezhaModel):
        super().__init__()
        self.backbone, self.read = model.model, model.layout.levels + 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = positions_from_mask(attention_mask)                             # [B, T]
        T = input_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # [T, T]
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]       # [B, 1, T, T]
        blocked = torch.zeros(allowed.shape, dtype=torch.float32, device=input_ids.device)
        blocked = blocked.masked_fill(~allowed, torch.finfo(torch.float32).min)
        hidden = self.backbone(input_ids=input_ids, attention_mask=blocked, position_ids=positions).last_hidden_state
        return hidden[:, -self.read:].float()


class HeadGraph(nn.Module):
    """``DraftHead.parent_step`` for one level. Level 0: root [N, H], hidden [N, H] -> log_probs [N, C_0].
    Level i > 0: parent_state [P, H], parent [N], code [N], hidden [N, H] -> (log_probs [N, C_i], state
    [N, H] but at the last level).

    The RNN cell's recurrent matmul runs on the P parents (the previous level's beams that have
    children; at level 1 the one root of each user), then a gather hands each child its parent's
    product: P is far below N at large beams. The input side only ever sees the previous level's code
    embeddings, so ``E(c) @ W_ih^T + b_ih + b_hh`` is folded into one [codes, H] table: a gather
    replaces that matmul."""

    def __init__(self, model: NezhaModel, level: int):
        super().__init__()
        self.head, self.level = model.mtp_head, level
        self.keep_state = 0 < level < model.layout.levels - 1
        if level > 0:
            cell, emb = self.head.transition[level - 1], self.head.token_emb_list[level - 1]
            with torch.no_grad():
                table = emb.weight @ cell.weight_ih.T + cell.bias_ih + cell.bias_hh            # [codes, H]
            self.register_buffer("code_input", table.contiguous())
            self.recurrent = cell.weight_hh                                                  # [H, H]

    def log_probs(self, state: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head.logit_head_list[self.level](state + hidden)                     # [N, codes]
        return torch.log_softmax(logits.float(), dim=-1)


class HeadRootGraph(HeadGraph):
    """Level 0: root [N, H], hidden [N, H] -> log_probs [N, C_0] (level 1's parents are the roots)."""

    def forward(self, root: torch.Tensor, hidden: torch.Tensor):
        return self.log_probs(root, hidden)


class HeadStepGraph(HeadGraph):
    """Level i > 0 (see HeadGraph)."""

    def forward(self, parent_state: torch.Tensor, parent: torch.Tensor, code: torch.Tensor, hidden: torch.Tensor):
        carry = parent_state @ self.recurrent.T                                            # [P, H]
        state = torch.tanh(torch.index_select(self.code_input, 0, code)
                           + torch.index_select(carry, 0, parent))                         # [N, H]
        log_probs = self.log_probs(state, hidden)
        return (log_probs, state) if self.keep_state else log_probs


def graph_module(model: NezhaModel, name: str) -> nn.Module:
    """The torch module behind graph ``name`` (backbone, head_0, head_1 ...), in eval mode."""
    if name == "backbone":
        return BackboneGraph(model).eval()
    level = int(name.split("_")[1])
    return (HeadStepGraph(model, level) if level else HeadRootGraph(model, level)).eval()


def example_inputs(name: str, spec: GraphEntry, model: NezhaModel) -> tuple[torch.Tensor, ...]:
    """Example tensors for tracing: sizes deliberately unlike the dims' min/max (2..3), so nothing specialises."""
    layout, (lo, hi) = model.layout, spec.dynamic.get("tokens", [0, 0])
    gen = torch.Generator().manual_seed(0)
    if name == "backbone":
        T = min(hi, lo + layout.levels)                               # one row with two items, one with one
        ids = torch.full((2, T), layout.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((2, T), dtype=torch.int64)
        for row, n in enumerate((T, T - layout.levels)):
            ids[row, T - n:] = torch.randint(layout.offsets[0], layout.placeholder_start, (n,), generator=gen)
            mask[row, T - n:] = 1
        return ids, mask
    N, P, H, level = 3, 2, model.config.hidden_size, int(name.split("_")[1])
    if level == 0:
        return torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)
    return (torch.randn(P, H, generator=gen), torch.tensor([1, 0, 1]),
            torch.randint(0, layout.codes[level - 1], (N,), generator=gen), torch.randn(N, H, generator=gen))


def _export(module: nn.Module, args: tuple, spec: GraphEntry, path: Path, opset: int, exporter: str) -> None:
    names, output_names = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    named_dims = {t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
                  for t in spec.inputs + spec.outputs}
    if exporter == "dynamo":
        dims = {d: torch.export.Dim(d, min=lo, max=hi) for d, (lo, hi) in spec.dynamic.items()}
        shapes = {n: {axis: dims[d] for axis, d in named_dims[n].items()} for n in names}
        with _quiet():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=output_names, dynamic_shapes=shapes,
                                        verbose=False)
        program.save(str(path), external_data=not _fits_inline(program.model_proto))
    else:
        with _quiet():
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=output_names, dynamic_axes=named_dims)


@contextmanager
def _quiet():
    """The exporters narrate every pass on stdout and the log; the build prints its own progress."""
    logger = logging.getLogger("torch.onnx")
    level, logger.level = logger.level, logging.ERROR
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _fits_inline(proto: onnx.ModelProto) -> bool:
    size = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer)
    return size < EXTERNAL_DATA_BYTES


def save_onnx(proto: onnx.ModelProto, path: Path, external_data: bool | None = None) -> Path:
    """Save ``proto``; weights go to ``<name>.data`` beside it when the graph would pass 2 GB (or if asked)."""
    if external_data is None:
        external_data = not _fits_inline(proto)
    if external_data:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_path(path).name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return path


def finish_graph(path: Path, name: str, spec: GraphEntry) -> None:
    """Give every graph input/output the manifest's dim names and sizes (the exporter invents symbols
    like 'Max(0, tokens - 4)'), drop the exporter's per-node debug metadata, then check the graph."""
    proto = onnx.load(str(path), load_external_data=False)
    for value, tensor in zip(list(proto.graph.input) + list(proto.graph.output), spec.inputs + spec.outputs):
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, tensor.shape):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    proto.doc_string = f"nezha-deploy graph {name}"    # the loaders check it: swapped head files are refused
    for node in proto.graph.node:           # the exporter's stack traces name this checkout's paths and lines:
        del node.metadata_props[:]          # dropped, so a graph depends only on the model, not on where it was built
    onnx.save_model(proto, str(path))              # external data (if any) stays in place, untouched
    onnx.checker.check_model(str(path))


def onnx_from_model(model: NezhaModel, out_dir: Path, limits: Limits, opset: int = 18,
                    exporter: str = "dynamo", log=None) -> dict[str, Path]:
    """Export the backbone and every head level to ``out_dir/<graph>.onnx`` (float32).

    ``exporter`` 'dynamo' (torch.export based) falls back to 'torchscript' (dynamo=False) per graph
    if it fails; 'torchscript' uses the legacy exporter only. Returns {graph name: path}.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    if model.mtp_head is None:
        raise StepError("the checkpoint has no draft head (use_mtp=False): NEZHA graphs need mtp_head.* weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, spec in graph_specs(model, limits).items():
        module = graph_module(model, name)
        path, args = out_dir / f"{name}.onnx", example_inputs(name, spec, model)
        with torch.no_grad():
            try:
                _export(module, args, spec, path, opset, exporter)
            except Exception as first:  # the dynamo exporter fails in many ways; the fallback is the answer
                if exporter != "dynamo":
                    raise StepError(f"{name}: torch.onnx.export (dynamo=False) failed: {first}") from first
                if log:
                    log(f"  {name}: dynamo exporter failed ({type(first).__name__}: {str(first)[:200]}); "
                        "falling back to dynamo=False")
                try:
                    _export(module, args, spec, path, opset, "torchscript")
                except Exception as second:
                    raise StepError(f"{name}: both exporters failed. dynamo: {first}; dynamo=False: {second}") \
                        from second
        finish_graph(path, name, spec)
        paths[name] = path
    return paths
