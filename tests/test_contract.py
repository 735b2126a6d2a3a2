"""The Recommender contract (runtime/contract.py) on both backends built here: the Python graph backend
(onnxruntime) and the C++ runtime (cpp, when tests/cpp_helpers.py can build it). recommend is
decode_batch(prepare(...)); a batch of mixed lengths and ks gives each history its solo answer bit for bit;
the same mistake raises the same class with the same message on both backends, also when the C++ runtime
itself reports it (the C ABI's error kinds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_artifact, tiny_catalog, tiny_histories, tiny_layout
from nezha.runtime import Recommender
from nezha.runtime.errors import InputError, NezhaError
from cpp_helpers import cpp_build  # noqa: F401  (the fixture: builds runtime/cpp or skips with the reason)

MAX_BATCH, MAX_BEAM = 4, 16
BACKENDS = ("onnxruntime", "cpp")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return tiny_artifact(tmp_path_factory.mktemp("contract"), ("fp32",), MAX_BATCH, MAX_BEAM)


@pytest.fixture(params=BACKENDS)
def rec(request, artifact):
    if request.param == "cpp":
        request.getfixturevalue("cpp_build")
    with Recommender.load(artifact, backend=request.param, threads=1) as r:
        yield r


@pytest.fixture(scope="module")
def both(artifact, cpp_build):  # noqa: F811
    with Recommender.load(artifact, threads=1) as py, Recommender.load(artifact, backend="cpp", threads=1) as cc:
        yield py, cc


def test_load_gives_the_contract_with_its_attributes(rec, artifact):
    assert isinstance(rec, Recommender)
    assert (rec.precision, rec.root, rec.levels, rec.item_count) == ("fp32", artifact, 3, len(tiny_catalog().item_ids))
    assert rec.codebook_sizes == tuple(tiny_layout().codes)
    assert (rec.max_batch, rec.max_beam, rec.max_history) == (MAX_BATCH, MAX_BEAM, 20)


def test_recommend_is_decode_batch_of_prepare(rec):
    histories = tiny_histories(tiny_catalog(), n=MAX_BATCH + 3, seed=4)
    codes = rec.prepare(histories)
    assert [c.dtype for c in codes] == [np.int64] * len(histories) and [c.shape for c in codes] == [(len(h), 3) for h in histories]
    for k, beam in ((1, 1), (5, 8), (MAX_BEAM, MAX_BEAM)):
        assert rec.recommend(histories, k=k, beam=beam) == rec.decode_batch(codes, beam, [k] * len(codes))
    assert rec.tokens(codes[0]) == (min(len(histories[0]), rec.max_history) + 1) * 3
    assert rec.tokens(np.zeros((50, 3), np.int64)) == (rec.max_history + 1) * 3


def test_a_batch_of_mixed_lengths_and_ks_gives_each_history_its_solo_answer(rec):
    """The server's unit: histories of several requests, one beam, a k each, chunked past max_batch."""
    histories = tiny_histories(tiny_catalog(), n=2 * MAX_BATCH + 1, seed=9) + [list(tiny_catalog().item_ids[:30])]
    assert len({len(h) for h in histories}) > 3
    ks = [1 + (3 * b) % 10 for b in range(len(histories))]
    batch = rec.decode_batch(rec.prepare(histories), 10, ks)
    assert [len(r) for r in batch] == ks
    assert batch == [rec.recommend([h], k=k, beam=10)[0] for h, k in zip(histories, ks)]


def test_recommend_codes_is_recommend(rec):
    catalog = tiny_catalog()
    histories = tiny_histories(catalog, 3, seed=6)
    codes = [[catalog.codes_of(np.array([i]))[0][0].tolist() for i in h] for h in histories]
    assert rec.recommend_codes(codes, k=5, beam=10) == rec.recommend(histories, k=5, beam=10)
    assert [c.tolist() for c in rec.prepare_codes(codes)] == [c.tolist() for c in rec.prepare(histories)]


def test_a_backend_class_loads_its_own_backend_only(artifact, cpp_build):  # noqa: F811
    from nezha.runtime.backends.cpp import CppRecommender
    from nezha.runtime.recommender import GraphRecommender
    with Recommender.load(artifact, backend="cpp", threads=1) as r, CppRecommender.load(artifact, threads=1) as c:
        assert type(r) is type(c) is CppRecommender and r.backend == c.backend == "cpp"
    with pytest.raises(InputError, match="backend 'cpp' is not a GraphRecommender"):
        GraphRecommender.load(artifact, backend="cpp")
    with pytest.raises(InputError, match="allowed: onnxruntime, tensorrt, cpp"):
        Recommender.load(artifact, backend="torch")


ITEM, UNKNOWN = 100, 987654
MISTAKES = {
    "k zero": lambda r: r.recommend([[ITEM]], k=0),
    "k above beam": lambda r: r.recommend([[ITEM]], k=5, beam=4),
    "bool k": lambda r: r.recommend([[ITEM]], k=True),
    "huge k": lambda r: r.recommend([[ITEM]], k=10 ** 5000),
    "list k": lambda r: r.recommend([[ITEM]], k=list(range(10 ** 5))),
    "beam above max_beam": lambda r: r.recommend([[ITEM]], k=2, beam=MAX_BEAM + 1),
    "float beam": lambda r: r.recommend([[ITEM]], k=2, beam=2.0),
    "unknown item": lambda r: r.recommend([[ITEM, UNKNOWN]]),
    "unknown item after an empty history": lambda r: r.recommend([[], [UNKNOWN] * 7]),
    "empty history": lambda r: r.recommend([[ITEM], []]),
    "empty after skipping": lambda r: r.recommend([[ITEM], [UNKNOWN]], unknown="skip"),
    "no histories": lambda r: r.recommend([]),
    "float item": lambda r: r.recommend([[1.5]]),
    "a set": lambda r: r.recommend({ITEM}),
    "unknown policy": lambda r: r.recommend([[ITEM]], unknown="drop"),
    "long policy": lambda r: r.recommend([[ITEM]], unknown="x" * 10 ** 5),
    "bad code": lambda r: r.recommend_codes([[[0, 0, 0], [99, 0, 0]]]),
    "negative code": lambda r: r.recommend_codes([[[0, -1, 0]]]),
    "wrong codes per item": lambda r: r.recommend_codes([[[1, 0]]]),
    "empty code history": lambda r: r.recommend_codes([[[0, 0, 0]], []]),
    "ks of another length": lambda r: r.decode_batch(r.prepare([[ITEM]]), 4, [1, 2]),
    "a k above the beam": lambda r: r.decode_batch(r.prepare([[ITEM], [ITEM]]), 4, [1, 5]),
    "codes not prepared": lambda r: r.decode_batch([[[0, 0, 0]]], 4, [1]),
    "bad beam to decode_batch": lambda r: r.decode_batch(r.prepare([[ITEM]]), 0, [1]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_same_mistake_raises_the_same_error_on_both_backends(both, mistake):
    py, cc = both
    with pytest.raises(NezhaError) as want:
        MISTAKES[mistake](py)
    with pytest.raises(NezhaError) as got:
        MISTAKES[mistake](cc)
    assert type(want.value) is InputError
    assert (type(got.value), str(got.value)) == (type(want.value), str(want.value))
    assert len(str(got.value)) < 400                           # values clipped, never echoed whole


def test_errors_the_cpp_runtime_reports_map_to_the_python_classes(both):
    """Below the contract's own checks: what the C ABI refuses comes back as its kind's Python class
    (history -> InputError, request -> InputError), with the Python backend's message where both say it."""
    py, cc = both
    items, offsets = np.array([ITEM, UNKNOWN, 101], np.int64), np.array([0, 1, 3], np.int64)
    for r in (py, cc):
        with pytest.raises(InputError) as e:
            r._item_codes(items, offsets, skip=False)
        assert str(e.value) == f"history 1 has item ids not in the catalog: [{UNKNOWN}] (pass unknown='skip' to drop them)"
        assert [len(c) for c in r._item_codes(items, offsets, skip=True)] == [1, 1]
    codes = py.prepare([[ITEM], [ITEM]])
    with pytest.raises(InputError, match=r"k must be an integer in 1..beam \(4\), got 5 \(history 1\)"):
        cc._decode_batch(codes, 4, [1, 5], None)                 # the C++ check, not the contract's
    bad = [codes[0].copy()]
    bad[0][0, 2] = py.codebook_sizes[2]
    for r in (py, cc):
        with pytest.raises(InputError, match=f"history 0 item 0: code {py.codebook_sizes[2]} at level 2 is outside"):
            r.decode_codes(bad, 4)


@pytest.mark.parametrize("options", [{"threads": 0}, {"precision": "fp64"}, {"dense_budget_bytes": -1}, {"device": "tpu"}])
def test_load_options_are_refused_alike(artifact, cpp_build, options):  # noqa: F811
    with pytest.raises(InputError) as want:
        Recommender.load(artifact, **options)
    with pytest.raises(InputError) as got:
        Recommender.load(artifact, backend="cpp", **options)
    if "device" not in options:                                  # the C++ runtime names its one device
        assert str(got.value) == str(want.value)
