"""The decode loop, written once over NumPy arrays: one backbone run, then beam search in the draft head
with the verifier at every level. Backends (ONNX Runtime, TensorRT, the torch reference) only supply
the two step functions. The verifier (``Verifier``, below) is model-free: which SID prefixes exist, a
vectorised open-addressing hash set of uint64 prefix keys, with a dense bitmap per level where the prefix
space fits a memory budget."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Protocol

import numpy as np

from .encoding import SidLayout


class DecodeSteps(Protocol):
    def backbone(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """input_ids, attention_mask [B, T] -> hidden states [B, L+1, H] float32 (root, h_0 .. h_{L-1})."""

    def head_step(self, level: int, parents: np.ndarray, parent: np.ndarray | None, code: np.ndarray | None,
                  hidden: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Level ``level`` on N beams. Level 0: parents = the roots [B, H] (parent, code None). Level > 0:
        parents [P, H] = states of the previous level's beams, at least of those with children, parent [N] int64 =
        each beam's row in it, code [N] int64 = its code. hidden: the level's placeholder state of each
        beam's user [N, H]. -> (the beams' states [N, H], None at level 0 and at the last level;
        log-probs [N, codes[level]] float32). The recurrent matmul runs on the P parents, not the N beams."""


# A stage hook: called as hook(name, step, *args) around each named step of the decode loop ("backbone",
# "head_<level>", "verify_<level>", "select"), it runs step(*args) and returns its result; a profiler or a
# benchmark times, counts or repeats the step there, and the loop itself holds no instrumentation.
StageHook = Callable[..., Any]


def _run(name: str, step, *args):
    return step(*args)


def stage_hook(stages: dict | StageHook | None) -> StageHook:
    """The hook for ``stages``: None -> run each step, nothing else (one call, the cost of no hook); a dict ->
    add each step's seconds to stages[name]; a hook -> itself."""
    if stages is None:
        return _run
    if not isinstance(stages, dict):
        return stages

    def timed(name: str, step, *args):
        t0 = time.perf_counter()
        out = step(*args)
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0
        return out

    return timed


@contextmanager
def stage(stages: dict | StageHook | None, name: str):
    """Add the seconds of the ``with`` body to ``stages[name]`` if ``stages`` is a dict (a hook sees the
    decode loop's steps only: nothing here)."""
    if not isinstance(stages, dict):
        yield
        return
    t0 = time.perf_counter()
    yield
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def top_k_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """[B, M] scores -> [B, k] column indices of the k best, best first, ties by index: of several candidates
    tied exactly at the k-th score, the lowest indices get in (the C++ loop's order, so both keep the same
    beams). Finite scores only are tie-broken so; slots at -inf hold no valid SID either way."""
    M = scores.shape[1]
    if k < M:
        at = np.argpartition(-scores, k, axis=1)                                  # the k best first, then the (k+1)-th
        part = at[:, :k]
    else:
        part = np.broadcast_to(np.arange(M), scores.shape).copy()
    top = _best_first(scores, part)
    if k < M:
        tied = _tied_at_cut(scores, top[:, -1], at[:, k])
        for b in tied:                                                            # rare: the lowest indices get in
            kth = scores[b, top[b, -1]]
            above = np.flatnonzero(scores[b] > kth)
            part[b] = np.concatenate([above, np.flatnonzero(scores[b] == kth)[:k - len(above)]])
        if len(tied):
            top = _best_first(scores, part)
    return top


def _best_first(scores: np.ndarray, part: np.ndarray) -> np.ndarray:
    vals = np.take_along_axis(scores, part, axis=1)
    return np.take_along_axis(part, np.lexsort((part, -vals), axis=1), axis=1)


def _tied_at_cut(scores: np.ndarray, last: np.ndarray, after: np.ndarray):
    """Rows whose last kept score (finite) equals the best one left out: numpy scalars for one row (the
    common request: cheaper than array calls), else vectorised."""
    if len(scores) == 1:
        s = scores[0, last[0]]
        return [0] if s == scores[0, after[0]] and s > -np.inf else []
    rows = np.arange(len(scores))
    s = scores[rows, last]
    return np.flatnonzero((s == scores[rows, after]) & (s > -np.inf))


def expand(scores: np.ndarray, logp: np.ndarray, keys: np.ndarray, level: int, verifier: Verifier | None) -> np.ndarray:
    """Children of every beam: [B, K] beam scores + [B*K, C] log-probs -> [B, K*C] candidate scores, -inf
    where the verifier says the child's prefix (parent ``keys`` [B*K] extended by the code) names no item."""
    B, K = scores.shape
    C = logp.shape[1]
    cand = scores[:, :, None] + logp.reshape(B, K, C)                             # [B, K, C]
    if verifier is not None:
        cand = np.where(verifier.mask(level, keys).reshape(B, K, C), cand, -np.inf)
    return cand.reshape(B, K * C)


def select(cand: np.ndarray, beam: int, codes: int, keys: np.ndarray):
    """Keep the ``beam`` best children per user: [B, K*C] candidates -> (scores [B, K'] float32, parent [B*K']
    flat beam index, code [B*K'] int64, keys [B*K'] uint64 of the kept prefixes)."""
    B, KC = cand.shape
    top = top_k_desc(cand, min(beam, KC))                                         # [B, K']
    scores = np.take_along_axis(cand, top, axis=1).astype(np.float32)
    parent = (np.arange(B)[:, None] * (KC // codes) + top // codes).reshape(-1)
    code = (top % codes).reshape(-1).astype(np.int64)
    return scores, parent, code, keys[parent] * np.uint64(codes) + code.astype(np.uint64)


def backbone_by_length(steps: DecodeSteps, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The backbone on a left-padded feed [B, T], run once per distinct history length with no padding
    token: each row is bit for bit what that history gives alone, and a batch of mixed lengths costs its
    real tokens (a padded batch costs B * T). -> hidden [B, L+1, H] (the steps' buffer if one length)."""
    mask = feed["attention_mask"]
    lengths = mask.sum(axis=1)
    T = mask.shape[1]
    if (lengths == T).all():
        return steps.backbone(feed)
    hidden = None
    for n in np.unique(lengths):
        rows = np.flatnonzero(lengths == n)
        part = steps.backbone({name: np.ascontiguousarray(a[rows, T - n:]) for name, a in feed.items()})
        if hidden is None:
            hidden = np.empty((len(mask),) + part.shape[1:], part.dtype)
        hidden[rows] = part
    return hidden


COMPACT_FROM = 64     # beams: below it the numpy calls and rebinding cost more than the matmul rows they save


def next_parents(states: np.ndarray, flat_parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The next level's parent_state and each kept beam's row in it: from COMPACT_FROM beams on, only the
    beams that have children (ascending: the recurrent matmul runs on them alone); below, all beams as
    they are (any superset gives the same states, and the shape then stays fixed from request to request)."""
    if len(states) < COMPACT_FROM:
        return states, flat_parent
    has_children = np.zeros(len(states), dtype=bool)
    has_children[flat_parent] = True
    return states[has_children], (np.cumsum(has_children) - 1)[flat_parent]


def beam_search(steps: DecodeSteps, feed: dict[str, np.ndarray], layout: SidLayout, verifier: Verifier | None,
                beam: int, stages: dict | StageHook | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Beam search of width ``beam`` over the L levels: prefill (one backbone run per history length), then
    per level a head step, expand + verify, select.

    Returns (sid_keys [B, K] uint64, scores [B, K] float32 summed log-probs, best first). Slots that
    found no valid SID carry score -inf. ``verifier=None`` switches the prefix check off (to measure
    hallucination); ``stages`` (see stage_hook): a dict accumulates seconds per step, a hook is called
    around each step.
    """
    run = stage_hook(stages)
    hidden = run("backbone", backbone_by_length, steps, feed)     # [B, L+1, H]
    B = hidden.shape[0]
    scores = np.zeros((B, 1), dtype=np.float32)                    # [B, K]
    keys = np.zeros(B, dtype=np.uint64)                            # [B*K] prefix keys
    beam_user = np.arange(B)                                       # [B*K] user of each beam
    parents, parent, code = hidden[:, 0], None, None               # level 0: the roots [B, H]
    for level in range(layout.levels):
        state, logp = run(f"head_{level}", steps.head_step, level, parents, parent, code,
                          hidden[beam_user, level + 1])           # [B*K, C]
        cand = run(f"verify_{level}", expand, scores, logp, keys, level, verifier)          # [B, K*C]
        scores, flat_parent, code, keys = run("select", select, cand, beam, layout.codes[level], keys)
        beam_user = beam_user[flat_parent]
        if level < layout.levels - 1:
            parents, parent = next_parents(hidden[:, 0] if level == 0 else state, flat_parent)
    return keys.reshape(B, -1), scores


# --- the verifier -------------------------------------------------------------------------------------
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
