"""The runtime against a real artifact built from a tiny checkpoint: parity with the torch reference, fp16
against fp32, bound buffers that stay put, a batch giving each history its solo answer, thread safety,
the code-level variant, long histories. The same contract runs on every backend available here."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories, tiny_model
from nezha.model.reference import Reference
from nezha.runtime import Recommender
from nezha.runtime.errors import InputError
from runtime_helpers import BACKENDS, MAX_BATCH, MAX_BEAM, _load, artifact  # noqa: F401


@pytest.fixture(scope="module")
def reference():
    return Reference(tiny_model(), tiny_catalog())


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_torch_reference(artifact, reference, backend):
    histories = tiny_histories(tiny_catalog(), 11, seed=3)           # 11 > max_batch: split into chunks
    with _load(artifact, backend, precision="fp32") as rec:
        got = rec.recommend(histories, k=8, beam=MAX_BEAM)
    want = reference.recommend(histories, k=8, beam=MAX_BEAM)
    for g, w in zip(got, want):
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_mostly_agrees_with_fp32(artifact, backend):
    histories = tiny_histories(tiny_catalog(), 8, seed=4)
    with _load(artifact, backend, precision="fp32") as a, _load(artifact, backend, precision="fp16") as b:
        fp32, fp16 = a.recommend(histories, k=5, beam=10), b.recommend(histories, k=5, beam=10)
    overlap = np.mean([len({i for i, _ in x} & {i for i, _ in y}) / 5 for x, y in zip(fp32, fp16)])
    assert overlap >= 0.8


def _record_outputs(runners) -> list:
    """Wrap every runner's run() to keep (runner, returned outputs) of each call."""
    seen = []
    for r in runners.values():
        def run(feed, _r=r, _run=r.run):
            out = _run(feed)
            seen.append((_r, out))
            return out
        r.run = run
    return seen


def test_steady_state_writes_in_place_and_allocates_nothing(artifact):
    """Zero allocation, proved on what ONNX Runtime really does: after warm-up, every output the decode loop
    reads is a view of the thread's buffer pool, ONNX Runtime's own output values point at those same bytes
    (it wrote in place, allocated no output), a repeated request rebinds nothing, and no buffer-sized block
    is allocated by Python or NumPy during a backbone run. Mutation tried: _execute binding outputs with
    bind_output(name, 'cpu') and returning copy_outputs_to_cpu() (ONNX Runtime allocates per call): fails here."""
    import tracemalloc
    catalog = tiny_catalog()
    histories, small = tiny_histories(catalog, MAX_BATCH, seed=5), tiny_histories(catalog, 1, seed=6)
    with Recommender.load(artifact) as rec:
        first = rec.recommend(histories, k=5, beam=MAX_BEAM)     # mixed lengths: one backbone run per length
        runners, pool = rec.steps.runners, list(rec.steps.buffers.buffers.values())
        seen = _record_outputs(runners)
        assert rec.recommend(histories, k=5, beam=MAX_BEAM) == first
        assert {r.name for r, _ in seen} == set(runners)
        for runner, outputs in seen:
            for name, array in outputs.items():
                assert any(np.shares_memory(array, b) for b in pool), f"{runner.name}.{name} is not a pool view"
        for runner in runners.values():
            ort_pointers = {name: value.data_ptr() for name, value in zip(runner.outputs, runner.binding.get_outputs())}
            assert ort_pointers == {name: runner._views[name].ctypes.data for name in runner.outputs}
        heads = [r for n, r in runners.items() if n.startswith("head_")]
        assert all(np.shares_memory(h._buffers["hidden"], heads[0]._buffers["hidden"]) for h in heads)
        alone = rec.recommend(small, k=5, beam=MAX_BEAM)         # one shape per graph, repeated: bound once
        rebinds = {n: r.rebinds for n, r in runners.items()}
        assert rec.recommend(small, k=5, beam=MAX_BEAM) == alone
        assert {n: r.rebinds for n, r in runners.items()} == rebinds
        feed = rec.encode(small)
        tracemalloc.start()
        try:
            for _ in range(3):
                rec.backbone(feed)
            large = [s for s in tracemalloc.take_snapshot().statistics("traceback") if s.size >= 4096]
        finally:
            tracemalloc.stop()
        assert large == [], large
        assert rec.recommend(histories, k=5, beam=MAX_BEAM) == first      # shapes changed back: same answers
        assert [b.ctypes.data for b in rec.steps.buffers.buffers.values()] == [b.ctypes.data for b in pool]


def test_a_batch_gives_each_history_its_solo_answer_bit_for_bit(artifact):
    """Mixed lengths run the backbone once per length without padding, so batching changes nothing."""
    catalog = tiny_catalog()
    histories = tiny_histories(catalog, MAX_BATCH, seed=8)
    assert len({min(len(h), 20) for h in histories}) > 1
    with Recommender.load(artifact) as rec:
        shapes = []
        run = rec.steps.runners["backbone"].run
        rec.steps.runners["backbone"].run = lambda feed: shapes.append(feed["input_ids"].shape) or run(feed)
        keys, scores = rec.decode(histories, beam=MAX_BEAM)
        real = sum(rec.encode([h])["input_ids"].size for h in histories)
        assert sum(b * t for b, t in shapes) == real and len(shapes) == len({t for _, t in shapes})   # no padding
        for b, h in enumerate(histories):
            k1, s1 = rec.decode([h], beam=MAX_BEAM)
            assert np.array_equal(keys[b:b + 1, :k1.shape[1]], k1) and np.array_equal(scores[b:b + 1, :s1.shape[1]], s1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_calls_equal_serial_calls(artifact, backend):
    catalog = tiny_catalog()
    requests = [tiny_histories(catalog, 1 + i % MAX_BATCH, seed=10 + i) for i in range(12)]
    with _load(artifact, backend) as rec:
        serial = [rec.recommend(r, k=5, beam=12) for r in requests]
        results = [None] * len(requests)

        def worker(offset):
            for i in range(offset, len(requests), 4):
                results[i] = rec.recommend(requests[i], k=5, beam=12)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == serial
        assert len(rec._all_steps) == 5                                  # the main thread and 4 workers, each its own


def test_code_level_variant_equals_item_level(artifact):
    catalog = tiny_catalog()
    histories = tiny_histories(catalog, 3, seed=6)
    with Recommender.load(artifact) as rec:
        codes = [[catalog.codes_of(np.array([i]))[0][0].tolist() for i in h] for h in histories]
        assert rec.recommend_codes(codes, k=5, beam=10) == rec.recommend(histories, k=5, beam=10)
        with pytest.raises(InputError, match=r"history 0 item 0: code 99 at level 0 is outside 0\.\.7"):
            rec.recommend_codes([[[99, 0, 0]]], k=1, beam=2)
        for bad, message in (([[[1.7, 0, 0]]], "codes are integers"), ([[["1", 0, 0]]], "codes are integers"),
                             ([[[True, 0, 0]]], "codes are integers"), ([[[1, 0]]], "needs 3 codes"),
                             ([{(1, 0, 0)}], "got set")):
            with pytest.raises(InputError if "integers" in message or "set" in message else InputError,
                               match=message):
                rec.recommend_codes(bad, k=1, beam=2)


def test_long_histories_keep_the_most_recent_items(artifact):
    catalog = tiny_catalog()
    history = tiny_histories(catalog, 1, seed=7)[0] * 10                # far longer than max_history (20)
    with Recommender.load(artifact) as rec:
        assert rec.recommend([history], k=5, beam=10) == rec.recommend([history[-20:]], k=5, beam=10)
