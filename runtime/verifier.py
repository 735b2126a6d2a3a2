"""The model-free verifier: which SID prefixes exist. A vectorised open-addressing hash set of uint64
prefix keys, with a dense bitmap per level where the prefix space fits a memory budget."""

from __future__ import annotations

import numpy as np

from .layout import SidLayout

_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)          # never a key: keys are < 2**63
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)          # Fibonacci hashing multiplier


class PrefixHashSet:
    """A set of uint64 keys with vectorised membership (linear probing, load factor <= 0.5)."""

    def __init__(self, keys: np.ndarray):
        keys = np.unique(np.asarray(keys, dtype=np.uint64))
        self._bits = max(4, int(np.ceil(np.log2(max(2 * len(keys), 2)))))
        self._mask = np.uint64((1 << self._bits) - 1)
        self._shift = np.uint64(64 - self._bits)
        self.table = np.full(1 << self._bits, _EMPTY, dtype=np.uint64)
        self.size = len(keys)
        slots = self._home(keys)
        pending = np.arange(len(keys))
        while len(pending):                      # each round places one key per free, contested slot
            s = slots[pending]
            free = self.table[s] == _EMPTY
            _, first = np.unique(s[free], return_index=True)
            placed = pending[free][first]
            self.table[slots[placed]] = keys[placed]
            placed_mask = np.zeros(len(keys), dtype=bool)
            placed_mask[placed] = True
            pending = pending[~placed_mask[pending]]
            slots[pending] = (slots[pending] + np.uint64(1)) & self._mask

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (keys * _GOLDEN) >> self._shift

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """[N] uint64 keys -> [N] bool membership."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        found = np.zeros(len(keys), dtype=bool)
        active = np.arange(len(keys))
        slots = self._home(keys)
        while len(active):
            seen = self.table[slots]
            hit = seen == keys[active]
            found[active[hit]] = True
            go_on = ~hit & (seen != _EMPTY)
            active, slots = active[go_on], (slots[go_on] + np.uint64(1)) & self._mask
        return found

    @property
    def nbytes(self) -> int:
        return self.table.nbytes


class Verifier:
    """Membership of candidate SID prefixes, level by level.

    ``mask(level, parent_keys)`` answers, for N beams whose prefix (levels < level) has key
    ``parent_keys[n]``, which of the level's codes make a prefix of some real item: [N, codes[level]] bool.

    A level is "dense" when its table fits ``dense_budget_bytes``: one bool row of codes[level] per
    valid parent prefix (plus an all-False row for parents that do not exist), so a lookup is a
    ``searchsorted`` of the N parents and a row gather, no hashing of the N * codes candidates.
    Otherwise the level is a hash set of its valid prefix keys, probed with every candidate.
    Both give the same answers (property-tested against a Python set).
    """

    def __init__(self, layout: SidLayout, valid_prefixes: list[np.ndarray], dense_budget_bytes: int = 64 << 20):
        if len(valid_prefixes) != layout.levels:
            raise ValueError(f"need valid prefixes for {layout.levels} levels, got {len(valid_prefixes)}")
        self.layout = layout
        self.kinds: list[str] = []
        self._tables: list = []
        self._parents: list[np.ndarray] = []          # sorted parent keys of each level (level 0: the root, key 0)
        budget = dense_budget_bytes
        for level, keys in enumerate(valid_prefixes):
            keys = np.asarray(keys, dtype=np.uint64)
            codes = layout.codes[level]
            parents = np.asarray(valid_prefixes[level - 1], dtype=np.uint64) if level else np.zeros(1, np.uint64)
            self._parents.append(parents)
            size = (len(parents) + 1) * codes
            if size <= budget:
                rows = np.zeros((len(parents) + 1, codes), dtype=bool)             # [parents + 1, codes]
                parent_of = keys // np.uint64(codes)
                rows[np.searchsorted(parents, parent_of), (keys % np.uint64(codes)).astype(np.int64)] = True
                self._tables.append(rows)
                self.kinds.append("dense")
                budget -= size
            else:
                self._tables.append(PrefixHashSet(keys))
                self.kinds.append("hash")

    def mask(self, level: int, parent_keys: np.ndarray) -> np.ndarray:
        """[N] uint64 parent prefix keys (zeros at level 0) -> [N, codes[level]] bool validity."""
        parent_keys = np.asarray(parent_keys, dtype=np.uint64)
        table = self._tables[level]
        if self.kinds[level] == "dense":
            parents = self._parents[level]
            rank = np.minimum(np.searchsorted(parents, parent_keys), len(parents) - 1)
            rank = np.where(parents[rank] == parent_keys, rank, len(parents))       # unknown parent: the False row
            return table[rank]
        codes = self.layout.codes[level]
        keys = parent_keys[:, None] * np.uint64(codes) + np.arange(codes, dtype=np.uint64)
        return table.contains(keys.reshape(-1)).reshape(len(parent_keys), codes)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tables)
