"""The C++ runtime where it is used: Recommender.load(backend='cpp'), the CLI printing what nezha recommend
prints, a binding that loads neither torch nor the onnxruntime module and checks its arguments as Python
does, the benchmark's side-by-side, nezha serve --backend cpp, and a public header of the embedder's calls."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories
from nezha.runtime import Recommender
from nezha.runtime.errors import NezhaError
from cpp_helpers import CPP, MAX_BATCH, MAX_BEAM, artifact, cpp, cpp_build  # noqa: F401


def test_recommender_load_offers_the_cpp_backend(cpp_build, artifact):
    from nezha.runtime.backends.cpp import CppRecommender
    with Recommender.load(artifact, backend="cpp", threads=1) as rec:
        assert isinstance(rec, CppRecommender) and rec.precision == "fp32"
        assert len(rec.recommend([[int(tiny_catalog().item_ids[0])]], k=3)[0]) == 3


def test_cli_prints_what_nezha_recommend_prints(cpp_build, artifact):
    items = tiny_catalog().item_ids
    history = f"{items[0]},{items[4]}, {items[9]}"
    for extra in ([], ["--json"], ["-k", "3", "--beam", "5"], ["--precision", "int8-cpu", "--json", "-k", "16"]):
        args = [str(artifact), "--history", history, "--history", str(items[2]), *extra]
        want = subprocess.run([sys.executable, "-m", "nezha.cli", "recommend", *args], capture_output=True, text=True)
        got = subprocess.run([str(cpp_build / "nezha-recommend"), *args, "--threads", "1"], capture_output=True, text=True)
        assert want.returncode == 0, want.stderr
        assert got.returncode == 0, got.stderr
        assert got.stdout == want.stdout, extra
    for bad in (["--history", "12,x"], ["--history", f"{items[0]},999999"], ["--history", str(items[0]), "-k", "99"]):
        want = subprocess.run([sys.executable, "-m", "nezha.cli", "recommend", str(artifact), *bad], capture_output=True, text=True)
        got = subprocess.run([str(cpp_build / "nezha-recommend"), str(artifact), *bad], capture_output=True, text=True)
        assert want.returncode == got.returncode == 2, (bad, got.stderr)
        assert got.stdout == "" and "error:" in got.stderr


def test_binding_loads_neither_torch_nor_the_onnxruntime_module(cpp_build, artifact):
    code = ("import sys; from nezha.runtime import Recommender; "
            f"r = Recommender.load({str(artifact)!r}, backend='cpp', threads=1); r.recommend([[{int(tiny_catalog().item_ids[0])}]], k=2); "
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_bench_times_the_cpp_loop_side_by_side(cpp_build, artifact):
    from nezha.bench.suite import run_bench
    result, _ = run_bench(artifact, histories=tiny_histories(tiny_catalog(), 8), backends=["onnxruntime", "cpp"],
                          precisions=["fp32"], beams=(8,), requests=3, warmup=1, reference=False, ar=False, threads=1)
    config = result["configs"][0]
    assert {"floor[cpp-fp32-cpu]", "nezha[cpp-fp32-cpu]", "nezha[onnxruntime-fp32-cpu]"} <= set(config["contenders"])
    assert "nezha[cpp-fp32-cpu] / floor[cpp-fp32-cpu]" in config["ratios"]
    stages = config["contenders"]["nezha[cpp-fp32-cpu]"]["stages"]
    assert {"backbone", "head_0", "verify_0", "select"} <= set(stages)


def test_the_server_runs_the_cpp_loop(cpp_build, artifact):
    """nezha serve --backend cpp: the same routes and the library's answers, concurrent requests batched,
    decode threads on all cores but one (the whole C++ loop runs without the GIL; a tiny model's decode
    is short, so the event loop keeps a core)."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_fixtures import Server, _metric, _pairs
    from nezha.serve import LoadOptions, ServeOptions, Service

    s = Server(Service(artifact, ServeOptions(max_wait_ms=20), LoadOptions(backend="cpp", threads=1)))
    try:
        info = s.client.get("/v2/models/nezha").json()["parameters"]
        assert info["backend"] == "cpp" and info["backend_share"] >= 0.75
        assert len(s.service.batcher._threads) == max(1, (os.cpu_count() or 1) - 1)     # short decodes: a core for HTTP
        histories = tiny_histories(tiny_catalog(), n=6 * MAX_BATCH, seed=3)
        with Recommender.load(artifact) as py:
            expected = [py.recommend([h], k=4, beam=MAX_BEAM)[0] for h in histories]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda h: s.post("/v1/recommend", {"histories": [h], "k": 4, "beam": MAX_BEAM}), histories))
        assert [r.status_code for r in replies] == [200] * len(histories)
        assert [_pairs(r.json()["results"])[0] for r in replies] == expected
        metrics = s.client.get("/metrics").text
        assert _metric(metrics, "nezha_batch_size_count") < _metric(metrics, "nezha_batch_size_sum") == len(histories)
        r = s.post("/v1/recommend", {"histories": [[10 ** 12]], "k": 4})
        assert r.status_code == 400 and "not in the catalog" in r.json()["error"]
    finally:
        s.stop()


def test_the_binding_checks_arguments_as_python_does(cpp_build, artifact):
    """The same error class and message as the Python runtime, before anything reaches the C ABI: an int64
    argument is never wrapped (2**64 + 5 would be 5), an array is not a policy."""
    item = int(tiny_catalog().item_ids[0])
    with Recommender.load(artifact, threads=1) as py, cpp(artifact) as cc:
        for kwargs in ({"unknown": np.array(["skip"])}, {"unknown": b"skip"}, {"unknown": None}):
            with pytest.raises(NezhaError) as want:
                py.recommend([[item]], k=2, **kwargs)
            with pytest.raises(NezhaError) as got:
                cc.recommend([[item]], k=2, **kwargs)
            assert (type(got.value), str(got.value)) == (type(want.value), str(want.value)), kwargs
            with pytest.raises(type(want.value)):
                cc.backbone([[item]], **kwargs)
    for budget in (2**64 + 5, 2**63, -1, 1.5, True):
        with pytest.raises(NezhaError) as want:
            Recommender.load(artifact, dense_budget_bytes=budget)
        with pytest.raises(NezhaError) as got:
            cpp(artifact, dense_budget_bytes=budget)
        assert (type(got.value), str(got.value)) == (type(want.value), str(want.value)), budget
        assert "0..2^63-1" in str(got.value)
    with cpp(artifact, dense_budget_bytes=2**63 - 1) as cc:       # the largest budget: dense everywhere
        assert cc.verifier_kinds == ["dense"] * 3


def test_the_public_header_holds_only_the_embedders_calls(cpp_build):
    """nezha_c.h: what an embedder calls; the test and benchmark hooks are in nezha_testing.h (unstable).
    Every function of both headers is exported by the library under its C name."""
    import ctypes
    import re
    code = {h: re.sub(r"/\*.*?\*/", "", (CPP / "include" / "nezha" / h).read_text(), flags=re.S)
            for h in ("nezha_c.h", "nezha_testing.h")}
    declared = {h: set(re.findall(r"\b(nezha_[a-z_]+)\(", text)) for h, text in code.items()}
    hooks = {"nezha_check_artifact", "nezha_backbone", "nezha_set_stage_timing", "nezha_stage_seconds", "nezha_rebinds"}
    assert declared["nezha_testing.h"] == hooks and not declared["nezha_c.h"] & hooks
    lib = ctypes.CDLL(str(cpp_build / "libnezha_runtime.so"))
    assert [f for f in sorted(declared["nezha_c.h"] | hooks) if not hasattr(lib, f)] == []
