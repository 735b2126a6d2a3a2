"""The SID layout: how item codes become backbone tokens and how SID prefixes pack into integer keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from nezha.runtime.errors import NezhaError

from .strict import array, exact_keys, fail, integer


class LayoutError(NezhaError, ValueError):
    """A SID layout that is inconsistent (offsets, code counts, placeholder ids)."""


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
            raise LayoutError(f"codes {list(self.codes)} and offsets {list(self.offsets)} must be non-empty "
                              "and of the same length (one per SID level)")
        if any(c < 1 for c in self.codes):
            raise LayoutError(f"every level needs at least one code, got codes {list(self.codes)}")
        for i in range(1, self.levels):
            if self.offsets[i] != self.offsets[i - 1] + self.codes[i - 1]:
                raise LayoutError(f"offset[{i}] = {self.offsets[i]} but offset[{i - 1}] + codes[{i - 1}] = "
                                  f"{self.offsets[i - 1] + self.codes[i - 1]}: code tokens must be contiguous")
        if self.placeholder_start < self.offsets[-1] + self.codes[-1]:
            raise LayoutError(f"placeholder_start (max_sid) = {self.placeholder_start} overlaps the code tokens, "
                              f"which end at {self.offsets[-1] + self.codes[-1]}")
        if float(np.prod([float(c) for c in self.codes])) >= 2.0 ** 63:
            raise LayoutError(f"codes {list(self.codes)}: the SID space does not fit 63-bit keys")

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
        """Strict: exactly the four keys, integers only (ManifestError naming the key otherwise)."""
        raw = exact_keys(value, path, ("codes", "offsets", "placeholder_start", "pad_token_id"))
        ints = lambda key, lo: tuple(integer(c, f"{path}.{key}[{i}]", lo) for i, c in enumerate(array(raw[key], f"{path}.{key}")))
        try:
            return cls(ints("codes", 1), ints("offsets", 0), integer(raw["placeholder_start"], f"{path}.placeholder_start"),
                       integer(raw["pad_token_id"], f"{path}.pad_token_id"))
        except LayoutError as e:
            fail(path, str(e))
