"""The C++ runtime (runtime/cpp) against the Python runtime on one tiny artifact (a public-format checkpoint
built with --index, fp32 and int8-cpu): the same items in the same order and scores within 1e-5, the same
request checks, threads and batches giving the serial and solo answers, decode_codes bit for bit; and the
C++ test binary (refusals, zero allocation, N threads == serial), also under ASan + UBSan when that build
exists. The C++ build is (re)made with CMake when it can be (cpp_helpers); otherwise these tests skip."""

from __future__ import annotations

import os
import subprocess
import threading

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories, tiny_model, write_index
from nezha.runtime import Recommender
from nezha.runtime.errors import NezhaError
from cpp_helpers import (ASAN_BUILD, MAX_BATCH, MAX_BEAM, PRECISIONS, artifact, assert_same,  # noqa: F401
                         cmake_build, cpp, cpp_build, toolchain_missing, use_the_wheels_onnxruntime)


def test_cpp_test_binary(cpp_build, artifact):
    """Refusals, .npy reader, request policies, threads, zero allocation in the steady state (C++)."""
    done = subprocess.run([str(cpp_build / "nezha_cpp_tests"), str(artifact)], capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 allocations by the runtime" in done.stdout


def test_cpp_test_binary_under_sanitizers(artifact):
    """The same tests built with -fsanitize=address,undefined (CI builds runtime/cpp/build-asan)."""
    binary = ASAN_BUILD / "nezha_cpp_tests"
    if not binary.is_file():
        pytest.skip(f"no sanitizer build at {ASAN_BUILD} (.ci/run makes it: cmake -DNEZHA_SANITIZE=ON)")
    if toolchain_missing() is None:
        cmake_build(ASAN_BUILD, "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DNEZHA_SANITIZE=ON")
    use_the_wheels_onnxruntime()
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    done = subprocess.run([str(binary), str(artifact)], capture_output=True, text=True, timeout=900, env=env)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_same_items_as_the_python_runtime(cpp_build, artifact, precision):
    """Mixed lengths, histories longer than max_history, batches above max_batch, unknown items skipped,
    beams 1..max_beam."""
    cat = tiny_catalog()
    histories = tiny_histories(cat, n=11, seed=3) + [list(cat.item_ids[:30])] * 2 + [[int(cat.item_ids[5])]]
    py = Recommender.load(artifact, precision=precision, threads=1)
    with cpp(artifact, precision) as cc:
        for k, beam in ((1, 1), (3, 3), (5, 8), (10, MAX_BEAM), (MAX_BEAM, MAX_BEAM)):
            assert_same(py.recommend(histories, k=k, beam=beam), cc.recommend(histories, k=k, beam=beam), label=f"k={k} beam={beam}")
        assert_same(py.recommend(histories[:3], k=7), cc.recommend(histories[:3], k=7), label="default beam")
        with_unknown = [[-1, *h, 10**12] for h in histories]
        assert_same(py.recommend(with_unknown, k=5, beam=8, unknown="skip"), cc.recommend(with_unknown, k=5, beam=8, unknown="skip"))
        assert cc.verifier_kinds == py.verifier.kinds
        # the dense/hash choice follows the budget as in Python: a zero budget makes every level hashed
        with cpp(artifact, precision, dense_budget_bytes=0) as hashed:
            assert hashed.verifier_kinds == ["hash"] * 3
            assert_same(cc.recommend(histories, k=5, beam=8), hashed.recommend(histories, k=5, beam=8), tolerance=0)
    py.close()


def test_fewer_valid_items_than_k_gives_fewer_results(cpp_build, tmp_path):
    """A 3-item catalog (items 100 and 101 share a SID): k=8 gives those 3 items, as in Python."""
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint
    from nezha.runtime.catalog import Catalog
    full = tiny_catalog()
    small = Catalog(full.item_ids[:3], full.item_codes[:3])
    ckpt = save_checkpoint(tiny_model(), tmp_path / "ckpt", full)
    build(ckpt, write_index(small, tmp_path / "small.index.json"), tmp_path / "art", precision=("fp32",),
          backend=("onnxruntime",), max_batch=MAX_BATCH, max_beam=MAX_BEAM, log=None)
    with cpp(tmp_path / "art") as cc, Recommender.load(tmp_path / "art", threads=1) as py:
        got = cc.recommend([[100, 102], [101]], k=8, beam=8)
        assert sorted(i for i, _ in got[0]) == [100, 101, 102]
        assert_same(py.recommend([[100, 102], [101]], k=8, beam=8), got, tolerance=0)


def test_requests_are_checked_as_in_python(cpp_build, artifact):
    cat = tiny_catalog()
    item = int(cat.item_ids[0])
    py = Recommender.load(artifact, threads=1)
    with cpp(artifact) as cc:
        for kwargs in ({"k": 0}, {"k": 5, "beam": 4}, {"k": True}, {"k": 2, "beam": MAX_BEAM + 1}, {"k": 2, "beam": 0},
                       {"k": MAX_BEAM + 1}, {"k": 2, "beam": 2.0}):
            with pytest.raises(NezhaError) as want:
                py.recommend([[item]], **kwargs)
            with pytest.raises(NezhaError) as got:
                cc.recommend([[item]], **kwargs)
            assert (type(got.value), str(got.value)) == (type(want.value), str(want.value)), kwargs
        for histories, kwargs in (([], {}), ([[item], []], {}), ([[item, 999999]], {}), ([[999999]], {"unknown": "skip"}),
                                  ({item}, {}), ([[1.5]], {}), ([[True]], {}), ("12", {}), ([[item]], {"unknown": "drop"})):
            with pytest.raises(NezhaError) as want:
                py.recommend(histories, k=2, **kwargs)
            with pytest.raises(NezhaError) as got:
                cc.recommend(histories, k=2, **kwargs)
            assert str(got.value) == str(want.value), (histories, kwargs)
    py.close()


def test_threads_give_the_serial_answers(cpp_build, artifact):
    histories = tiny_histories(tiny_catalog(), n=9, seed=5)
    with cpp(artifact) as cc:
        serial = {beam: cc.recommend(histories, k=4, beam=beam) for beam in (4, 16)}
        results, errors = [], []

        def work(beam):
            try:
                for _ in range(5):
                    results.append((beam, cc.recommend(histories, k=4, beam=beam)))
            except Exception as e:  # surfaced by the assert below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(beam,)) for beam in (4, 16, 4, 16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == 20
    for beam, got in results:
        assert got == serial[beam]


def test_a_batch_gives_each_history_its_solo_answer_bit_for_bit(cpp_build, artifact):
    """One backbone run per history length, no padding: batching changes no score, in C++ as in Python."""
    histories = tiny_histories(tiny_catalog(), n=MAX_BATCH, seed=8)
    assert len({len(h) for h in histories}) > 1
    with cpp(artifact) as cc, Recommender.load(artifact) as py:
        batched = cc.recommend(histories, k=4, beam=16)
        assert batched == [cc.recommend([h], k=4, beam=16)[0] for h in histories]
        assert batched == py.recommend(histories, k=4, beam=16)


def test_decode_codes_is_the_python_loop_bit_for_bit(cpp_build, artifact):
    """The step below items (the server's call): the same SID keys and scores as Recommender.decode_codes,
    batches split at max_batch included; codes outside a codebook refused with the same message."""
    from nezha.runtime.encoding import history_codes
    from nezha.runtime.errors import InputError
    histories = tiny_histories(tiny_catalog(), n=2 * MAX_BATCH + 2, seed=11)
    with cpp(artifact) as cc, Recommender.load(artifact) as py:
        codes = history_codes(histories, py.catalog)
        for beam in (1, 5, MAX_BEAM):
            keys, scores = cc.decode_codes(codes, beam)
            want_keys, want_scores = py.decode_codes(codes, beam)
            assert keys.shape == want_keys.shape and (keys == want_keys).all() and np.array_equal(scores, want_scores)
        assert cc.codebook_sizes == py.codebook_sizes == tuple(py.layout.codes) and cc.item_count == py.item_count
        bad = [codes[0].copy()]
        bad[0][-1, 1] = py.layout.codes[1]
        message = f"history 0 item {len(bad[0]) - 1}: code {py.layout.codes[1]} at level 1 is outside 0..{py.layout.codes[1] - 1}"
        for r in (cc, py):                                           # the C ABI's kind: the Python class
            with pytest.raises(InputError, match=message):
                r.decode_codes(bad, 4)
            with pytest.raises(InputError, match="history 1 is empty"):
                r.decode_codes([codes[0], codes[0][:0]], 4)
        for r in (cc, py):
            with pytest.raises(NezhaError, match=r"code history 0 must be an integer array \[items, "):
                r.decode_codes([codes[0][:, :2]], 4)
            with pytest.raises(NezhaError, match=r"code history 0 must be an integer array .* got float64"):
                r.decode_codes([codes[0] + 0.5], 4)                  # never truncated to other codes
            with pytest.raises(NezhaError, match=r"code history 1 must be an integer array"):
                r.decode_codes([codes[0], [[1, 2], [3]]], 4)
        with pytest.raises(NezhaError, match="must not contain a NUL"):
            cpp(str(artifact) + "\0/elsewhere")
