"""Runtime building blocks without any graph: layout, encoder, verifier (property tests), decode helpers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_catalog, tiny_layout
from nezha.runtime.decode import top_k_desc
from nezha.runtime.encoding import encode_histories
from nezha.runtime.encoding import SidLayout
from nezha.runtime.decode import PrefixHashSet, Verifier
from nezha.runtime.errors import InputError


def test_layout_rejects_inconsistent_offsets_and_overlapping_placeholders():
    with pytest.raises(InputError, match="contiguous"):
        SidLayout((4, 4), (2, 5), 10)
    with pytest.raises(InputError, match="overlaps"):
        SidLayout((4, 4), (2, 6), 8)


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 5), st.integers(0, 4)), min_size=1, max_size=30))
def test_sid_keys_round_trip(codes):
    layout = tiny_layout()
    codes = np.array(codes)
    keys = layout.sid_keys(codes)
    assert np.array_equal(layout.codes_from_keys(keys), codes)
    assert len(np.unique(keys)) == len(np.unique(codes, axis=0))


def test_encoder_truncates_left_pads_and_appends_placeholders():
    layout, cat = tiny_layout(), tiny_catalog()
    feed = encode_histories([[100, 101, 102], [103]], cat, layout, max_history=2)
    ids, mask = feed["input_ids"], feed["attention_mask"]
    L = layout.levels
    assert ids.shape == (2, 2 * L + L) and ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids[0, :2 * L].tolist() == layout.code_tokens(cat.item_codes[[1, 2]]).reshape(-1).tolist()   # most recent 2
    assert ids[0, -L:].tolist() == layout.placeholder_tokens().tolist()
    assert mask[1].tolist() == [0] * L + [1] * 2 * L and ids[1, :L].tolist() == [layout.pad_token_id] * L


@pytest.mark.parametrize("histories, kwargs, message", [
    ([[100, 99999]], {}, "not in the catalog: \\[99999\\]"),
    ([[]], {}, "history 0 is empty"),
    ([[99999]], {"unknown": "skip"}, "empty"),
    ([], {}, "batch is empty"),
    ([[1.5]], {}, "item ids are integers"),
    ("100", {}, "list of item-id lists"),
    ([[100]], {"unknown": "ignore"}, "allowed: error, skip"),
])
def test_encoder_errors(histories, kwargs, message):
    with pytest.raises(InputError, match=message):
        encode_histories(histories, tiny_catalog(), tiny_layout(), 20, **kwargs)


def test_unknown_items_are_skipped_under_skip_policy():
    layout, cat = tiny_layout(), tiny_catalog()
    a = encode_histories([[100, 424242, 101]], cat, layout, 20, unknown="skip")
    b = encode_histories([[100, 101]], cat, layout, 20)
    assert np.array_equal(a["input_ids"], b["input_ids"])


keys_strategy = st.lists(st.integers(0, 2 ** 40), min_size=1, max_size=300)


@settings(max_examples=60, deadline=None)
@given(keys_strategy, st.lists(st.integers(0, 2 ** 40), max_size=300))
def test_hash_set_has_no_false_positives_or_negatives(members, probes):
    s = PrefixHashSet(np.array(members, dtype=np.uint64))
    queries = np.array(members + probes, dtype=np.uint64)
    expected = np.array([q in set(members) for q in queries.tolist()])
    assert np.array_equal(s.contains(queries), expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 5), st.integers(0, 4)), min_size=1, max_size=60),
       st.integers(0, 2))
def test_dense_and_hash_verifiers_agree_with_a_python_set(sids, level):
    layout = tiny_layout()
    codes = np.array(sids)
    prefixes = [np.unique(layout.prefix_keys(codes, i)) for i in range(layout.levels)]
    dense, hashed = Verifier(layout, prefixes), Verifier(layout, prefixes, dense_budget_bytes=0)
    assert dense.kinds == ["dense"] * 3 and hashed.kinds == ["hash"] * 3
    valid = {tuple(c[:level + 1]) for c in sids}
    parents = sorted({tuple(c[:level]) for c in sids} | {(7, 5)[:level]})      # plus a parent that may not exist
    parent_keys = (layout.prefix_keys(np.array(parents), level - 1) if level else np.zeros(1, np.uint64))
    expected = np.array([[p + (c,) in valid for c in range(layout.codes[level])] for p in parents])
    assert np.array_equal(dense.mask(level, parent_keys), expected)
    assert np.array_equal(hashed.mask(level, parent_keys), expected)


def test_verifier_picks_dense_or_hash_by_memory_budget():
    layout = SidLayout((256,) * 4, tuple(2 + 256 * i for i in range(4)), 2 + 1024)
    codes = np.random.default_rng(0).integers(0, 256, (1000, 4))
    prefixes = [np.unique(layout.prefix_keys(codes, i)) for i in range(4)]
    row_bytes = [(1 + 1) * 256] + [(len(p) + 1) * 256 for p in prefixes[:3]]     # one row per parent + a False row
    fits_three = sum(row_bytes[:3]) + row_bytes[3] - 1
    assert Verifier(layout, prefixes, fits_three).kinds == ["dense", "dense", "dense", "hash"]
    assert Verifier(layout, prefixes, sum(row_bytes)).kinds == ["dense"] * 4
    assert Verifier(layout, prefixes, 0).kinds == ["hash"] * 4


def test_top_k_desc_orders_best_first_with_index_ties():
    scores = np.array([[0.1, 0.5, -np.inf, 0.5, 0.3]])
    assert top_k_desc(scores, 3).tolist() == [[1, 3, 4]]
    assert top_k_desc(scores, 5).tolist() == [[1, 3, 4, 0, 2]]
    assert top_k_desc(np.array([[0.2, 0.5, 0.5, 0.5, 0.9]]), 3).tolist() == [[4, 1, 2]]     # cut inside a tie


def test_top_k_desc_is_a_stable_sort_cut_at_k_even_inside_ties():
    """The C++ loop keeps (score desc, index asc): so must Python, or the two keep different beams when
    candidates tie exactly at the cut (fp16 log-probs do, often)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        B, M = rng.integers(1, 5), rng.integers(2, 60)
        scores = rng.integers(-4, 1, size=(B, M)).astype(np.float32)             # few values: many ties
        k = int(rng.integers(1, M + 1))
        assert top_k_desc(scores, k).tolist() == np.argsort(-scores, axis=1, kind="stable")[:, :k].tolist()


def test_importing_and_using_the_runtime_core_loads_no_torch():
    code = ("import sys, numpy as np; import nezha.runtime as r; from nezha.runtime.decode import Verifier; "
            "from nezha.runtime.decode import beam_search; assert 'torch' not in sys.modules, 'torch loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
