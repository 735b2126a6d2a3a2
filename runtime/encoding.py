"""The SID layout and the one encoder: how item ids become codes (the catalog lookup) and codes become
backbone tokens, and how SID prefixes pack into integer keys. Used by the runtime, the torch reference,
export validation, calibration and the benchmark, so that all of them see byte-identical inputs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Sequence

import numpy as np
from nezha.runtime.errors import InputError, clipped

from .strict import array, exact_keys, fail, integer

if TYPE_CHECKING:
    from .catalog import Catalog


@dataclass(frozen=True)
class SidLayout:
    """Token layout of a NEZHA vocabulary.

    Level ``i``, code ``c`` is token ``offsets[i] + c``; the L placeholders
    ``<sp_0>..<sp_{L-1}>`` are tokens ``placeholder_start + i``. Prefix keys are
    mixed-radix, most significant level first: ``key_i = key_{i-1} * codes[i] + c_i``.
    """

    codes: tuple[int, ...]          # codes per level, e.g. (256, 256, 256, 256)
    offsets: tuple[int, ...]        # token id of code 0 of each level
    placeholder_start: int          # token id of <sp_0> (the reference code's max_sid)
    pad_token_id: int = 0

    def __post_init__(self):
        if not self.codes or len(self.codes) != len(self.offsets):
            raise InputError(f"codes {list(self.codes)} and offsets {list(self.offsets)} must be non-empty "
                             "and of the same length (one per SID level)")
        if any(c < 1 for c in self.codes):
            raise InputError(f"every level needs at least one code, got codes {list(self.codes)}")
        for i in range(1, self.levels):
            if self.offsets[i] != self.offsets[i - 1] + self.codes[i - 1]:
                raise InputError(f"offset[{i}] = {self.offsets[i]} but offset[{i - 1}] + codes[{i - 1}] = "
                                 f"{self.offsets[i - 1] + self.codes[i - 1]}: code tokens must be contiguous")
        if self.placeholder_start < self.offsets[-1] + self.codes[-1]:
            raise InputError(f"placeholder_start (max_sid) = {self.placeholder_start} overlaps the code tokens, "
                             f"which end at {self.offsets[-1] + self.codes[-1]}")
        if float(np.prod([float(c) for c in self.codes])) >= 2.0 ** 63:
            raise InputError(f"codes {list(self.codes)}: the SID space does not fit 63-bit keys")

    @property
    def levels(self) -> int:
        return len(self.codes)

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every code and placeholder token."""
        return self.placeholder_start + self.levels

    def code_tokens(self, codes: np.ndarray) -> np.ndarray:
        """[..., L] int codes -> [..., L] int64 token ids."""
        return np.asarray(codes, dtype=np.int64) + np.asarray(self.offsets, dtype=np.int64)

    def placeholder_tokens(self) -> np.ndarray:
        """[L] int64 token ids of <sp_0>..<sp_{L-1}>."""
        return self.placeholder_start + np.arange(self.levels, dtype=np.int64)

    def prefix_keys(self, codes: np.ndarray, level: int) -> np.ndarray:
        """[..., >=level+1] codes -> [...] uint64 keys of the prefix codes[..., :level+1]."""
        codes = np.asarray(codes)
        key = np.zeros(codes.shape[:-1], dtype=np.uint64)
        for i in range(level + 1):
            key = key * np.uint64(self.codes[i]) + codes[..., i].astype(np.uint64)
        return key

    def sid_keys(self, codes: np.ndarray) -> np.ndarray:
        """[..., L] codes -> [...] uint64 keys of whole SIDs."""
        return self.prefix_keys(codes, self.levels - 1)

    def codes_from_keys(self, keys: np.ndarray) -> np.ndarray:
        """[...] uint64 SID keys -> [..., L] int64 codes (inverse of sid_keys)."""
        keys = np.asarray(keys, dtype=np.uint64).copy()
        out = np.empty(keys.shape + (self.levels,), dtype=np.int64)
        for i in reversed(range(self.levels)):
            out[..., i] = (keys % np.uint64(self.codes[i])).astype(np.int64)
            keys //= np.uint64(self.codes[i])
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, value, path: str = "layout") -> "SidLayout":
        """Strict: exactly the four keys, integers only (ArtifactError naming the key otherwise)."""
        raw = exact_keys(value, path, ("codes", "offsets", "placeholder_start", "pad_token_id"))
        ints = lambda key, lo: tuple(integer(c, f"{path}.{key}[{i}]", lo) for i, c in enumerate(array(raw[key], f"{path}.{key}")))
        try:
            return cls(ints("codes", 1), ints("offsets", 0), integer(raw["placeholder_start"], f"{path}.placeholder_start"),
                       integer(raw["pad_token_id"], f"{path}.pad_token_id"))
        except InputError as e:
            fail(path, str(e))


UNKNOWN_POLICIES = ("error", "skip")


def check_batch(histories, what: str = "histories") -> None:
    """A batch is a list, tuple or array of histories: never a set or dict (no order), str or bytes."""
    if not isinstance(histories, (list, tuple, np.ndarray)) or (isinstance(histories, np.ndarray) and histories.ndim == 0):
        raise InputError(f"{what} must be a list of item-id lists, got {type(histories).__name__}")


def integer_array(values, where: str, what: str = "item ids") -> np.ndarray:
    """A 1-D int64 array from a list, tuple or 1-D integer array. Refused with a message naming ``where``:
    bools, floats, strings, nested lists, sets, dicts, bytes, 0-d arrays, non-integer dtypes (timedelta64
    is an integer dtype to NumPy), values outside int64."""
    if isinstance(values, np.ma.MaskedArray):
        raise InputError(f"{where} is a masked array: pass the ids to use (the mask would be ignored)")
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise InputError(f"{where} must be a 1-D array of integer {what}, got dtype {values.dtype} and "
                             f"shape {values.shape}")
        if values.dtype.kind == "u" and values.size and int(values.max()) > np.iinfo(np.int64).max:
            raise InputError(f"{where}: {what} must fit int64")
        return values.astype(np.int64)
    if not isinstance(values, (list, tuple)):
        raise InputError(f"{where} must be a list of integer {what}, got {type(values).__name__}")
    for x in values:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise InputError(f"{where} holds {clipped(x)} ({type(x).__name__}); {what} are integers "
                             "(not bools, floats, strings or nested lists)")
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        raise InputError(f"{where}: {what} must fit int64") from None


def check_unknown(unknown) -> bool:
    """The unknown-item policy, a str of UNKNOWN_POLICIES -> True for "skip"."""
    if not isinstance(unknown, str) or unknown not in UNKNOWN_POLICIES:
        raise InputError(f"unknown-item policy {clipped(unknown)}; allowed: {', '.join(UNKNOWN_POLICIES)}")
    return unknown == "skip"


def flat_histories(histories) -> tuple[np.ndarray, np.ndarray]:
    """Item-id histories, checked (check_batch, integer_array) -> (items [N] int64, offsets [B+1] int64):
    history b is items[offsets[b]:offsets[b+1]]."""
    check_batch(histories)
    arrays = None
    if isinstance(histories, list) and all(type(h) is list and all(type(x) is int for x in h) for h in histories):
        try:                                                       # the common case: no per-item checks
            items = np.array([x for h in histories for x in h], dtype=np.int64)
            arrays = histories
        except OverflowError:                                      # the checks below name the history
            pass
    if arrays is None:
        arrays = [integer_array(h, f"history {b}") for b, h in enumerate(histories)]
        items = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    offsets = np.array([0, *accumulate(map(len, arrays))], np.int64)
    return items.astype(np.int64, copy=False).reshape(-1), offsets


def lookup_codes(item_ids: np.ndarray, item_codes: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The catalog lookup: item_ids [I] int64 ascending, item_codes [I, L], items [N] -> ([N, L] codes, [N]
    bool known). Unknown items get codes 0 and known=False."""
    items = np.asarray(items, dtype=np.int64)
    pos = np.minimum(np.searchsorted(item_ids, items), len(item_ids) - 1)
    known = item_ids[pos] == items
    return np.where(known[:, None], item_codes[pos], 0), known


def codes_from_catalog(items: np.ndarray, offsets: np.ndarray, catalog: Catalog, skip: bool) -> list[np.ndarray]:
    """Flat histories (flat_histories) -> per history its known items' codes [n, L] int64; an unknown item
    raises InputError naming its history unless ``skip`` (then it is dropped)."""
    codes, known = lookup_codes(catalog.item_ids, catalog.item_codes, items)
    if not known.all():
        if not skip:
            b = int(np.searchsorted(offsets, np.flatnonzero(~known)[0], side="right")) - 1
            unknown = ~known[offsets[b]:offsets[b + 1]]
            missing = items[offsets[b]:offsets[b + 1]][unknown][:5].tolist()
            raise InputError(f"history {b} has item ids not in the catalog: {missing}"
                             f"{' ...' if unknown.sum() > 5 else ''} (pass unknown='skip' to drop them)")
        offsets = np.concatenate([[0], np.cumsum(known)])[offsets]
        codes = codes[known]
    bounds = offsets.tolist()
    return [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def history_codes(histories: Sequence[Sequence[int]], catalog: Catalog, unknown: str = "error") -> list[np.ndarray]:
    """Item-id histories -> per history an [n, L] int64 code array (unknown items dropped under 'skip')."""
    skip = check_unknown(unknown)
    return codes_from_catalog(*flat_histories(histories), catalog, skip)


def empty_history(b: int) -> InputError:
    return InputError(f"history {b} is empty (after dropping unknown items): NEZHA needs at least one item")


def check_not_empty(histories: Sequence[np.ndarray]) -> None:
    """Every code history [n, L] holds an item (after unknown items were dropped)."""
    for b, codes in enumerate(histories):
        if len(codes) == 0:
            raise empty_history(b)


def check_code_range(codes: np.ndarray, b: int, codebook_sizes: Sequence[int]) -> None:
    """History b's codes [n, L] each within 0..codebook_sizes[level]-1."""
    outside = (codes < 0) | (codes >= np.asarray(codebook_sizes))
    if outside.any():
        i, level = np.argwhere(outside)[0]
        raise InputError(f"history {b} item {i}: code {codes[i, level]} at level {level} is outside "
                         f"0..{codebook_sizes[level] - 1}")


def code_array(codes, b: int, levels: int) -> np.ndarray:
    """One code history -> [n, levels] int64; anything but integers in whole items -> InputError."""
    try:
        arr = np.asarray(codes)
    except (ValueError, TypeError):                       # ragged nesting and the like
        arr = None
    if arr is None or (arr.size and arr.dtype.kind not in "iu") or arr.size % levels:
        got = f", got {arr.dtype} {list(arr.shape)}" if arr is not None else ""
        raise InputError(f"code history {b} must be an integer array [items, {levels}]{got}")
    return arr.astype(np.int64, copy=False).reshape(-1, levels)


def encode_codes(histories: Sequence[np.ndarray], layout: SidLayout, max_history: int,
                 pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Code histories ([n_b, L] each) -> the backbone feed.

    Each history keeps its most recent ``max_history`` items, becomes
    ``[item codes ...][<sp_0> .. <sp_{L-1}>]`` and is left padded to a common length T
    (``pad_to`` if given, else the longest). Returns
      input_ids       [B, T] int64
      attention_mask  [B, T] int64 (0 on padding)
    Position ids are ``cumsum(attention_mask) - 1`` on the real tokens; the graphs compute them from the mask.
    """
    if max_history < 1:
        raise InputError(f"max_history must be >= 1, got {max_history}")
    if len(histories) == 0:
        raise InputError("no histories to encode: the batch is empty")
    rows = []
    for b, codes in enumerate(histories):
        codes = code_array(codes, b, layout.levels)
        if len(codes) == 0:
            raise empty_history(b)
        check_code_range(codes, b, layout.codes)
        codes = codes[-max_history:]
        rows.append(np.concatenate([layout.code_tokens(codes).reshape(-1), layout.placeholder_tokens()]))
    longest = max(len(r) for r in rows)
    T = longest if pad_to is None else pad_to
    if T < longest:
        raise InputError(f"pad_to={pad_to} is shorter than the longest encoded history ({longest} tokens)")
    input_ids = np.full((len(rows), T), layout.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, r in enumerate(rows):
        input_ids[b, T - len(r):] = r
        attention_mask[b, T - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_histories(histories: Sequence[Sequence[int]], catalog: Catalog, layout: SidLayout, max_history: int,
                     unknown: str = "error", pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Item-id histories -> backbone feed (see encode_codes)."""
    return encode_codes(history_codes(histories, catalog, unknown), layout, max_history, pad_to)


def items_from_sids(sid_keys: np.ndarray, scores: np.ndarray, table: tuple[np.ndarray, np.ndarray, np.ndarray],
                    k: int | Sequence[int]) -> list[list[tuple[int, float]]]:
    """Map decoded SIDs to items: per user up to k (one k for all, or one per user) (item id, score), best
    first; items sharing a SID share its score, ascending by id. SIDs that are no real item (verifier off)
    are skipped."""
    sid_table_keys, offsets, items = table
    at = np.searchsorted(sid_table_keys, sid_keys)                          # [B, K], one call for all
    real = sid_table_keys[np.minimum(at, len(sid_table_keys) - 1)] == sid_keys
    out = []
    ks = [k] * len(sid_keys) if isinstance(k, (int, np.integer)) else k
    for user_at, user_real, user_scores, k in zip(at.tolist(), real.tolist(), scores.tolist(), ks):
        recs: list[tuple[int, float]] = []
        for s, ok, score in zip(user_at, user_real, user_scores):
            if not math.isfinite(score) or len(recs) >= k:                  # -inf: no valid SID from here on
                break
            if ok:
                recs.extend((item, score) for item in items[offsets[s]:offsets[s + 1]].tolist())
        out.append(recs[:k])
    return out
