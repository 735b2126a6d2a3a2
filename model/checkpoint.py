"""Checkpoints in the public NEZHA training code's format, read and written as they are.

A folder holds ``config.json`` (backbone config + ``docid_num``, ``offset``, ``max_sid``, ``vocab_size``,
``old_vocab_size``, ``use_mtp``), ``model.safetensors`` (backbone + ``mtp_head.*``) and optionally
``ava_sid{L}.pt``: the valid SIDs packed as ``sum_i c_i * 512**i``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from nezha.runtime.catalog import Catalog, read_json_object
from nezha.runtime.errors import NezhaError
from nezha.runtime.layout import LayoutError, SidLayout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .nezha import ARCHITECTURES, NezhaModel, layout_from_config

REFERENCE_RADIX = 512          # hard-coded in the public training code's ava_sid packing
SID_FIELDS = ("docid_num", "offset", "max_sid", "vocab_size")


class CheckpointError(NezhaError, ValueError):
    """A checkpoint folder that does not follow the NEZHA format; the message names file, key and expectation."""


def make_config(layout: SidLayout, architecture: str = "qwen3", hidden_size: int = 128, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                use_mtp: bool = True, max_position_embeddings: int = 2048, **extra):
    """A backbone config of the given architecture with the NEZHA SID fields."""
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    config_cls = ARCHITECTURES[architecture][0]
    return config_cls(
        vocab_size=layout.vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=layout.pad_token_id, bos_token_id=None, eos_token_id=None,
        docid_num=list(layout.codes), offset=list(layout.offsets), max_sid=layout.placeholder_start,
        old_vocab_size=layout.offsets[0], use_mtp=use_mtp, **extra)


def _read_config(path: Path):
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    raw = read_json_object(cfg_path, "checkpoint config (a NEZHA checkpoint folder needs config.json)",
                           "the backbone config plus docid_num, offset, max_sid", CheckpointError)
    arch = raw.get("model_type")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{cfg_path}: model_type {arch!r} is not supported; expected one of "
                              f"{', '.join(ARCHITECTURES)}")
    missing = [k for k in SID_FIELDS if k not in raw]
    if missing:
        raise CheckpointError(f"{cfg_path}: missing NEZHA field(s) {missing}; expected {list(SID_FIELDS)}")
    config = ARCHITECTURES[arch][0].from_dict(raw)
    try:
        layout = layout_from_config(config)
    except LayoutError as e:
        raise CheckpointError(f"{cfg_path}: keys docid_num/offset/max_sid are inconsistent: {e}") from None
    old = raw.get("old_vocab_size")
    if old is not None and old != layout.offsets[0]:
        raise CheckpointError(f"{cfg_path}: offset[0] = {layout.offsets[0]} but old_vocab_size = {old}; the first "
                              "code token must follow the original vocabulary")
    if config.vocab_size < layout.vocab_size:
        raise CheckpointError(f"{cfg_path}: vocab_size = {config.vocab_size} but the codes and placeholders need "
                              f"at least {layout.vocab_size} (max_sid {layout.placeholder_start} + {layout.levels})")
    return config


def load_checkpoint(path: str | Path) -> NezhaModel:
    """Load a checkpoint folder in the public NEZHA format into a NezhaModel (eval mode, float32)."""
    path = Path(path)
    config = _read_config(path)
    weights_path = path / "model.safetensors"
    try:
        weights = load_file(str(weights_path))
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path} is missing: a NEZHA checkpoint folder needs model.safetensors") from None
    except SafetensorError as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from None
    model = NezhaModel(config)
    expected = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
    for key, tensor in expected.items():
        if key not in weights:
            what = "draft-head" if key.startswith("mtp_head.") else "backbone"
            raise CheckpointError(f"{weights_path}: missing {what} weight {key!r} of shape {tuple(tensor.shape)}")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{weights_path}: {key!r} has shape {tuple(weights[key].shape)}, expected "
                                  f"{tuple(tensor.shape)} from config.json")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected and not (all(k.startswith("mtp_head.") for k in unexpected) and not model.use_mtp):
        raise CheckpointError(f"{weights_path}: unexpected weight(s) {unexpected[:5]} for a {config.model_type} "
                              f"model with use_mtp={model.use_mtp}")
    model.load_state_dict({k: weights[k].float() for k in expected}, strict=True)
    return model.float().eval()


def save_checkpoint(model: NezhaModel, path: str | Path, catalog: Catalog | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` in the public format (and ``ava_sid{L}.pt`` from ``catalog``), atomically."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.config.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if catalog is not None:
            torch.save(pack_reference_sids(catalog.item_codes), tmp / f"ava_sid{model.layout.levels}.pt")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def pack_reference_sids(codes: np.ndarray) -> torch.Tensor:
    """[I, L] codes -> 1-D int64 tensor of ``sum_i c_i * 512**i`` (the reference ava_sid packing)."""
    codes = np.asarray(codes, dtype=np.int64)
    return torch.from_numpy((codes * REFERENCE_RADIX ** np.arange(codes.shape[1], dtype=np.int64)).sum(1))


def catalog_from_reference_sids(path: str | Path, layout: SidLayout) -> Catalog:
    """Read ``ava_sid{L}.pt`` safely (weights_only) into a Catalog; item ids are positions in the file."""
    path = Path(path)
    try:
        packed = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"valid-SID file {path} does not exist") from None
    except Exception as e:  # torch raises several unpickling error types for a bad file
        raise CheckpointError(f"{path} is not a tensor file readable with weights_only=True: {e}") from None
    if not isinstance(packed, torch.Tensor) or packed.ndim != 1 or packed.dtype.is_floating_point:
        raise CheckpointError(f"{path}: expected a 1-D integer tensor of packed SIDs, got "
                              f"{type(packed).__name__} {getattr(packed, 'shape', '')}")
    if any(c > REFERENCE_RADIX for c in layout.codes):
        raise CheckpointError(f"{path}: radix-512 packing cannot hold codes {list(layout.codes)}")
    packed = packed.numpy().astype(np.int64)
    codes = np.stack([(packed // REFERENCE_RADIX ** i) % REFERENCE_RADIX for i in range(layout.levels)], axis=1)
    if np.any(packed >= REFERENCE_RADIX ** layout.levels) or np.any(packed < 0):
        raise CheckpointError(f"{path}: packed SIDs outside 0..512**{layout.levels} for {layout.levels} levels")
    catalog = Catalog(np.arange(len(codes)), codes)
    catalog.check_layout(layout, str(path))
    return catalog


def load_catalog(index: str | Path | None, checkpoint: str | Path, layout: SidLayout) -> Catalog:
    """The item catalog: a LETTER ``*.index.json`` if given, else the checkpoint's ``ava_sid{L}.pt``."""
    if index is not None:
        catalog = Catalog.from_index_json(index)
        catalog.check_layout(layout, str(index))
        return catalog
    return catalog_from_reference_sids(Path(checkpoint) / f"ava_sid{layout.levels}.pt", layout)
