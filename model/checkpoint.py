"""Checkpoints in the public NEZHA training code's format, read and written as they are.

A folder holds ``config.json`` (backbone config + ``docid_num``, ``offset``, ``max_sid``, ``vocab_size``,
``old_vocab_size``, ``use_mtp``), ``model.safetensors`` (backbone + ``mtp_head.*``) and optionally
``ava_sid{L}.pt``: the valid SIDs packed as ``sum_i c_i * 512**i``."""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from nezha.runtime.catalog import Catalog, read_json_object
from nezha.runtime.datafile import regular_file
from nezha.runtime.errors import ArtifactError, InputError
from nezha.runtime.encoding import SidLayout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers.activations import ACT2FN

from .nezha import ARCHITECTURES, NezhaModel, layout_from_config

REFERENCE_RADIX = 512          # hard-coded in the public training code's ava_sid packing
SID_FIELDS = ("docid_num", "offset", "max_sid", "vocab_size")
# config.json's sizes: integers >= 1 (or >= 0), at most MAX_SIZE: token ids and dims fit int32, as the
# graphs' Gather and the engines' shapes need; the weights' shapes bound them further (load_checkpoint).
MAX_SIZE = 2 ** 31 - 1
SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
         "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")
FLAGS = ("use_mtp", "tie_word_embeddings")
POSITIVE_REALS = ("rms_norm_eps", "rope_theta")
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")


def make_config(layout: SidLayout, architecture: str = "qwen3", hidden_size: int = 128, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                use_mtp: bool = True, max_position_embeddings: int = 2048, **extra):
    """A backbone config of the given architecture with the NEZHA SID fields."""
    if architecture not in ARCHITECTURES:
        raise ArtifactError(f"unknown architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    config_cls = ARCHITECTURES[architecture][0]
    return config_cls(
        vocab_size=layout.vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=layout.pad_token_id, bos_token_id=None, eos_token_id=None,
        docid_num=list(layout.codes), offset=list(layout.offsets), max_sid=layout.placeholder_start,
        old_vocab_size=layout.offsets[0], use_mtp=use_mtp, **extra)


def _check_config_fields(raw: dict, cfg_path: Path) -> None:
    """The fields this reader uses, typed and bounded, before any of them reaches transformers or torch."""
    def fail(key, expected):
        raise ArtifactError(f"{cfg_path}: {key} = {raw.get(key)!r}; expected {expected}")

    def integer(key, lo=1, hi=MAX_SIZE):
        if type(raw.get(key)) is not int or not lo <= raw[key] <= hi:      # type(): bool is no integer here
            fail(key, f"an integer in {lo}..{hi}")

    arch = raw.get("model_type")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ArtifactError(f"{cfg_path}: model_type {arch!r} is not supported; expected one of "
                            f"{', '.join(ARCHITECTURES)}")
    missing = [k for k in SID_FIELDS if k not in raw]
    if missing:
        raise ArtifactError(f"{cfg_path}: missing NEZHA field(s) {missing}; expected {list(SID_FIELDS)}")
    for key in SIZES + tuple(k for k in OPTIONAL_SIZES if raw.get(k) is not None):
        integer(key)
    offsets, codes = raw["offset"], raw["docid_num"]
    if not isinstance(offsets, list) or not offsets or any(type(o) is not int or not 0 <= o <= MAX_SIZE for o in offsets):
        fail("offset", f"a non-empty list of integers in 0..{MAX_SIZE}, one per SID level")
    if not (type(codes) is int or isinstance(codes, list) and len(codes) == len(offsets)) or any(
            type(c) is not int or not 1 <= c <= MAX_SIZE for c in (codes if isinstance(codes, list) else [codes])):
        fail("docid_num", f"an integer in 1..{MAX_SIZE} or a list of {len(offsets)} of them (codes per level)")
    integer("max_sid", 0)
    for key in ("old_vocab_size", "pad_token_id"):
        if raw.get(key) is not None:
            integer(key, 0, raw["vocab_size"] - 1 if key == "pad_token_id" else MAX_SIZE)
    for key in FLAGS:
        if key in raw and type(raw[key]) is not bool:
            fail(key, "true or false")
    rope = raw.get("rope_parameters")
    for key, section in [(k, raw) for k in POSITIVE_REALS] + [("rope_theta", rope if isinstance(rope, dict) else {})]:
        value = section.get(key)
        if key in section and (type(value) not in (int, float) or not math.isfinite(value) or value <= 0):
            name = key if section is raw else f"rope_parameters.{key}"
            raise ArtifactError(f"{cfg_path}: {name} = {value!r}; expected a finite number > 0")
    if "hidden_act" in raw and not (isinstance(raw["hidden_act"], str) and raw["hidden_act"] in ACT2FN):
        fail("hidden_act", f"one of {', '.join(sorted(ACT2FN))}")
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv_heads:
        fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    if raw.get("head_dim") is None and raw["hidden_size"] % heads:
        fail("hidden_size", f"a multiple of num_attention_heads ({heads}) when head_dim is not given")


def _read_raw_config(path: Path) -> dict:
    if not path.is_dir():
        raise ArtifactError(f"checkpoint folder {path} does not exist")
    raw = read_json_object(path / "config.json", "checkpoint config (a NEZHA checkpoint folder needs config.json)",
                           "the backbone config plus docid_num, offset, max_sid", ArtifactError)
    _check_config_fields(raw, path / "config.json")
    return raw


def _config_from_raw(raw: dict, cfg_path: Path):
    arch = raw["model_type"]
    try:
        config = ARCHITECTURES[arch][0].from_dict(raw)
    except (ValueError, TypeError, LookupError, StrictDataclassError) as e:     # transformers' own checks of the other keys
        raise ArtifactError(f"{cfg_path}: not a valid {arch} config: {_one_line(e)}") from None
    try:
        layout = layout_from_config(config)
    except InputError as e:
        raise ArtifactError(f"{cfg_path}: keys docid_num/offset/max_sid are inconsistent: {e}") from None
    old = raw.get("old_vocab_size")
    if old is not None and old != layout.offsets[0]:
        raise ArtifactError(f"{cfg_path}: offset[0] = {layout.offsets[0]} but old_vocab_size = {old}; the first "
                            "code token must follow the original vocabulary")
    if config.vocab_size < layout.vocab_size:
        raise ArtifactError(f"{cfg_path}: vocab_size = {config.vocab_size} but the codes and placeholders need "
                            f"at least {layout.vocab_size} (max_sid {layout.placeholder_start} + {layout.levels})")
    return config


def _one_line(e: Exception) -> str:
    """An exception's message on one line; a KeyError's without the quotes its str() adds."""
    return " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())


def _read_header(weights_path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The safetensors header: name -> (shape, dtype), no tensor read."""
    regular_file(weights_path, "weights (a NEZHA checkpoint folder needs model.safetensors)", ArtifactError)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{weights_path} is not a readable safetensors file: {e}") from None


def _check_layers_against_header(raw: dict, header: dict, weights_path: Path) -> None:
    """config.json's layer count against the weights, before transformers or torch see it: the config
    and the model (even on the meta device) cost time and memory per layer, so a config claiming 2**31
    layers must be refuted by the header, not by construction. The other sizes cost nothing on the meta
    device and are compared weight by weight (_check_weights_header)."""
    layers = len({m.group(1) for k in header if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if raw["num_hidden_layers"] != layers:
        raise ArtifactError(f"{weights_path.parent / 'config.json'}: num_hidden_layers = {raw['num_hidden_layers']} "
                            f"but {weights_path.name} holds {layers} layer(s) (model.layers.N.*)")


def _expected_shapes(config, cfg_path: Path) -> dict[str, tuple[int, ...]]:
    """Every weight's shape as config.json implies it, from a model on the meta device (nothing allocated,
    so a config claiming huge sizes costs nothing before the weights refute it)."""
    try:
        with torch.device("meta"):
            model = NezhaModel(config)
    except (ValueError, TypeError, LookupError, ArithmeticError) as e:
        raise ArtifactError(f"{cfg_path}: not a valid {config.model_type} config: {_one_line(e)}") from None
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def _check_weights_header(weights_path: Path, header: dict, expected: dict, config, use_mtp: bool) -> None:
    """The safetensors header (names, shapes, dtypes) against ``expected``, before any tensor is read."""
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in header:
        header = {"lm_head.weight": header["model.embed_tokens.weight"], **header}
    for key, shape in expected.items():
        if key not in header:
            what = "draft-head" if key.startswith("mtp_head.") else "backbone"
            raise ArtifactError(f"{weights_path}: missing {what} weight {key!r} of shape {shape}")
        if header[key][0] != shape:
            raise ArtifactError(f"{weights_path}: {key!r} has shape {header[key][0]}, expected {shape} from "
                                "config.json")
        if header[key][1] not in WEIGHT_DTYPES:
            raise ArtifactError(f"{weights_path}: {key!r} is {header[key][1]}; weights are floating point "
                                f"({', '.join(WEIGHT_DTYPES)})")
    unexpected = sorted(set(header) - set(expected))
    if unexpected and not (all(k.startswith("mtp_head.") for k in unexpected) and not use_mtp):
        raise ArtifactError(f"{weights_path}: unexpected weight(s) {unexpected[:5]} for a {config.model_type} "
                            f"model with use_mtp={use_mtp}")


def load_checkpoint(path: str | Path) -> NezhaModel:
    """Load a checkpoint folder in the public NEZHA format into a NezhaModel (eval mode, float32).
    Everything is checked before the model is built: config.json's fields, its layer count against
    the weights' header, then the weights' names, shapes and dtypes, then every weight's values (finite
    in float32, the dtype the build uses)."""
    path = Path(path)
    raw = _read_raw_config(path)
    weights_path = path / "model.safetensors"
    header = _read_header(weights_path)
    _check_layers_against_header(raw, header, weights_path)
    config = _config_from_raw(raw, path / "config.json")
    expected = _expected_shapes(config, path / "config.json")
    _check_weights_header(weights_path, header, expected, config, bool(getattr(config, "use_mtp", True)))
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{weights_path} is not a readable safetensors file: {e}") from None
    if getattr(config, "tie_word_embeddings", False):
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    weights = {k: weights[k].float() for k in expected}       # an F64 1e300 is finite, and Inf once cast
    bad = [k for k in expected if not torch.isfinite(weights[k]).all()]
    if bad:
        count = int((~torch.isfinite(weights[bad[0]])).sum())
        raise ArtifactError(f"{weights_path}: weight {bad[0]!r} holds {count} non-finite value(s) (Inf or NaN) "
                            "in float32, the dtype the build uses"
                            + (f", and {len(bad) - 1} more weight(s) too" if len(bad) > 1 else ""))
    model = NezhaModel(config)
    model.load_state_dict(weights, strict=True)
    return model.float().eval()


def save_checkpoint(model: NezhaModel, path: str | Path, catalog: Catalog | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` in the public format (and ``ava_sid{L}.pt`` from ``catalog``), atomically."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} exists; pass overwrite=True to replace it")
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
    regular_file(path, "valid-SID file", ArtifactError)          # a FIFO would make torch.load wait
    try:
        packed = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several unpickling error types for a bad file
        raise ArtifactError(f"{path} is not a tensor file readable with weights_only=True: {e}") from None
    if not isinstance(packed, torch.Tensor) or packed.ndim != 1 or packed.dtype.is_floating_point:
        raise ArtifactError(f"{path}: expected a 1-D integer tensor of packed SIDs, got "
                            f"{type(packed).__name__} {getattr(packed, 'shape', '')}")
    if any(c > REFERENCE_RADIX for c in layout.codes):
        raise ArtifactError(f"{path}: radix-512 packing cannot hold codes {list(layout.codes)}")
    packed = packed.numpy().astype(np.int64)
    codes = np.stack([(packed // REFERENCE_RADIX ** i) % REFERENCE_RADIX for i in range(layout.levels)], axis=1)
    if np.any(packed >= REFERENCE_RADIX ** layout.levels) or np.any(packed < 0):
        raise ArtifactError(f"{path}: packed SIDs outside 0..512**{layout.levels} for {layout.levels} levels")
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
