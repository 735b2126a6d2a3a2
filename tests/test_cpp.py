"""The C++ runtime (runtime/cpp) against the Python runtime on the same artifacts: the same items in the same
order and scores within 1e-5 (tiny public-format checkpoints built with --index, and real Beauty users on
the demo checkpoint, fp32 and int8-cpu), the same CLI output, the same request policies, threads; and the C++
test binary (refusals, zero allocation, N threads == serial), also under ASan + UBSan when that build exists.

The C++ build is (re)made here with CMake when the toolchain and ONNX Runtime's headers are present
(runtime/cpp/setup_ort.sh); otherwise these tests skip with the reason. CI runs the setup script first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import (BEAUTY_INDEX, DATA, corrupted, tampered, tiny_artifact, tiny_catalog, tiny_histories, tiny_model,
                      write_index)
from nezha.runtime import Recommender
from nezha.runtime.errors import NezhaError

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "runtime" / "cpp"
BUILD = Path(os.environ.get("NEZHA_CPP_BUILD", CPP / "build"))
ASAN_BUILD = Path(os.environ.get("NEZHA_CPP_ASAN_BUILD", CPP / "build-asan"))
MAX_BATCH, MAX_BEAM = 4, 16
PRECISIONS = ("fp32", "int8-cpu")


def toolchain_missing() -> str | None:
    """Why the C++ runtime cannot be built here, or None."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install cmake g++)"
    ort_root = os.environ.get("ONNXRUNTIME_ROOT")
    if not ort_root and not (CPP / "third_party" / "onnxruntime" / "include" / "onnxruntime_cxx_api.h").is_file():
        return "ONNX Runtime's C++ headers are missing: run runtime/cpp/setup_ort.sh (or set ONNXRUNTIME_ROOT)"
    for header, package in (("/usr/include/nlohmann/json.hpp", "nlohmann-json3-dev"), ("/usr/include/openssl/evp.h", "libssl-dev")):
        if not Path(header).is_file():
            return f"{header} is missing (apt-get install {package})"
    return None


def cmake_build(build: Path, *flags: str) -> None:
    if not (build / "CMakeCache.txt").is_file():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), *generator, *flags], check=True,
                       capture_output=True, text=True)
    done = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"the C++ build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """runtime/cpp/build, brought up to date (or as it is when it cannot be rebuilt here)."""
    reason = toolchain_missing()
    if reason is None:
        cmake_build(BUILD, "-DCMAKE_BUILD_TYPE=Release")
    elif not (BUILD / "libnezha_runtime.so").is_file():
        pytest.skip(f"the C++ runtime is not built ({BUILD}) and cannot be built here: {reason}")
    os.environ.setdefault("NEZHA_CPP_LIBRARY", str(BUILD / "libnezha_runtime.so"))
    use_the_wheels_onnxruntime()
    return BUILD


def use_the_wheels_onnxruntime() -> None:
    """The test binaries and the CLI open the installed wheel's ONNX Runtime (the library CMake found at
    configure time may be absent, e.g. in a worktree whose venv borrows its packages)."""
    from nezha.runtime.backends.cpp import wheel_onnxruntime_library
    wheel = wheel_onnxruntime_library()
    if wheel and not os.environ.get("NEZHA_ONNXRUNTIME_LIBRARY"):
        os.environ["NEZHA_ONNXRUNTIME_LIBRARY"] = wheel


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny public-format checkpoint built with --index, fp32 and int8-cpu."""
    return tiny_artifact(tmp_path_factory.mktemp("cpp"), PRECISIONS, MAX_BATCH, MAX_BEAM)


def cpp(artifact, precision="fp32", **kw):
    return Recommender.load(artifact, backend="cpp", precision=precision, threads=1, **kw)


def assert_same(expected, got, tolerance=1e-5, label=""):
    """Same items in the same order per history; scores within ``tolerance``."""
    assert len(expected) == len(got), label
    for b, (e, g) in enumerate(zip(expected, got)):
        assert [i for i, _ in e] == [i for i, _ in g], f"{label} history {b}: {e} != {g}"
        assert np.allclose([s for _, s in e], [s for _, s in g], rtol=0, atol=tolerance), f"{label} history {b}"


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


def test_corrupt_artifacts_are_refused_with_the_reason(cpp_build, artifact, tmp_path):
    from nezha.runtime.errors import InputError
    with pytest.raises(InputError, match="sid_keys.npy: sha256 mismatch"):
        cpp(corrupted(artifact, tmp_path, "tables/sid_keys.npy"))
    with pytest.raises(NezhaError, match="does not exist"):
        cpp(tmp_path / "missing")
    with pytest.raises(NezhaError, match="has no 'fp16' graphs"):
        cpp(artifact, "fp16")


@pytest.mark.parametrize("edit, message", [
    (lambda p: setattr(p, "doc_string", "nezha-deploy graph head_2"), "says it is 'nezha-deploy graph head_2'"),
    (lambda p: setattr(p.graph.input[0].type.tensor_type.shape.dim[0], "dim_param", "beams"),
     r"input parent_state has shape \[beams, 32\], the manifest's dims differ"),
])
def test_a_graph_file_that_is_another_graph_is_refused(cpp_build, artifact, tmp_path, edit, message):
    """As in Python (tests/test_artifact.py): a head file swapped for another of one interface, or whose
    dynamic dims are not the manifest's, is refused at load although its sha256 is listed."""
    import onnx
    from nezha.runtime.errors import InputError
    rel = "graphs/fp32/head_1.onnx"
    proto = onnx.load(str(artifact / rel))
    edit(proto)
    with pytest.raises(InputError, match=message):
        cpp(tampered(artifact, tmp_path, files={rel: proto.SerializeToString()}))


def test_recommender_load_offers_the_cpp_backend(cpp_build, artifact):
    from nezha.runtime.backends.cpp import CppRecommender
    with Recommender.load(artifact, backend="cpp", threads=1) as rec:
        assert isinstance(rec, CppRecommender) and rec.precision == "fp32"
        assert len(rec.recommend([[int(tiny_catalog().item_ids[0])]], k=3)[0]) == 3


def test_default_precision_is_the_same_in_both_runtimes_whatever_the_json_order(cpp_build, artifact, tmp_path):
    """fp32 first if built, by rule: not the manifest's key order (Python) nor a sorted map's (C++)."""
    import json
    import shutil
    moved = tmp_path / "art"
    shutil.copytree(artifact, moved)
    raw = json.loads((moved / "manifest.json").read_text())
    for section in ("precisions", "graphs"):                  # int8-cpu's graphs named fp16: sorted keys put it
        raw[section] = {"fp16": raw[section]["int8-cpu"], "fp32": raw[section]["fp32"]}    # first, and so does JSON
    (moved / "manifest.json").write_text(json.dumps(raw))
    from manifest_edits import rebind
    rebind(moved)                                             # renamed on purpose: the contract follows
    with Recommender.load(moved, threads=1) as py, Recommender.load(moved, backend="cpp", threads=1) as cc:
        assert py.precision == cc.precision == "fp32"


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


# --- real data: the demo checkpoint on Beauty ----------------------------------------------------------

@pytest.fixture(scope="module")
def demo_artifact(tmp_path_factory) -> Path:
    from nezha.export.build import build
    ckpt = ROOT / "checkpoints" / "demo" / "nezha"
    out = tmp_path_factory.mktemp("cpp-demo") / "art"
    build(ckpt, BEAUTY_INDEX, out, precision=PRECISIONS, backend=("onnxruntime",), log=None)
    return out


def beauty_parity(artifact: Path, precision: str, users: int | None, batch: int = 64) -> dict:
    """Top-10 (beam 20) of the Python and C++ runtimes on Beauty test users: how many lists are identical
    (items and order) and the largest score difference."""
    from nezha.bench.run import load_histories
    histories = load_histories(DATA, users)
    py = Recommender.load(artifact, precision=precision, threads=1)
    identical, worst, first_diff = 0, 0.0, None
    with cpp(artifact, precision) as cc:
        for i in range(0, len(histories), batch):
            chunk = histories[i:i + batch]
            for b, (e, g) in enumerate(zip(py.recommend(chunk, k=10, beam=20), cc.recommend(chunk, k=10, beam=20))):
                if [x for x, _ in e] == [x for x, _ in g]:
                    identical += 1
                    worst = max(worst, max((abs(s - t) for (_, s), (_, t) in zip(e, g)), default=0.0))
                elif first_diff is None:
                    first_diff = (i + b, e, g)
    py.close()
    return {"users": len(histories), "identical": identical, "max_score_diff": worst, "first_diff": first_diff}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_beauty_users_get_the_python_items(cpp_build, demo_artifact, precision):
    figures = beauty_parity(demo_artifact, precision, users=640)
    print(precision, figures)
    assert figures["identical"] == figures["users"], figures["first_diff"]
    assert figures["max_score_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NEZHA_FULL_PARITY"), reason="all 22,363 Beauty users take minutes: "
                    "NEZHA_FULL_PARITY=1 python -m pytest -s -k all_beauty tests/test_cpp.py")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_all_beauty_users_get_the_python_items(cpp_build, demo_artifact, precision):
    """All 22,363 test users, both runtimes (about 2 minutes per precision on 2 cores); prints the figures."""
    figures = beauty_parity(demo_artifact, precision, users=None)
    print(f"\n{precision}: {json.dumps({k: v for k, v in figures.items() if k != 'first_diff'})}")
    assert figures["users"] == 22363
    assert figures["identical"] == figures["users"], figures["first_diff"]
    assert figures["max_score_diff"] <= 1e-5


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


def test_the_server_runs_the_cpp_loop(cpp_build, artifact):
    """nezha serve --backend cpp: the same routes and the library's answers, concurrent requests batched,
    decode threads on all cores but one (the whole C++ loop runs without the GIL; a tiny model's decode
    is short, so the event loop keeps a core)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import Server, _metric, _pairs
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


# --- one conformance corpus, both readers ---------------------------------------------------------------

def _verdict(check, folder, verify) -> tuple[str, str]:
    """("ok", "") or ("refused", the one-line message); any other exception is a bug and fails the test."""
    try:
        check(folder, verify)
    except NezhaError as e:
        return "refused", str(e)
    return "ok", ""


def test_both_readers_give_every_corpus_case_the_same_verdict(cpp_build, artifact, tmp_path):
    """tests/manifest_corpus.py: good and bad manifests, contracts, tables and folders, each loaded by the
    Python loader and by the C++ loader (C ABI, through ctypes), with file hashing on and off."""
    from manifest_corpus import CASES, make_case
    from nezha.runtime.artifact import Artifact
    from nezha.runtime.backends.cpp import check_artifact
    python = lambda folder, verify: Artifact.open(folder, verify=verify).tables()
    rows = []
    for i, name in enumerate(CASES):
        folder = make_case(artifact, tmp_path / f"case{i}", name)
        want = CASES[name][0]
        for verify in (True, False):
            expected = ("refused" if verify else "ok") if want == "refused if verified" else want
            rows.append((name, verify, expected, _verdict(python, folder, verify), _verdict(check_artifact, folder, verify)))
    differ = [r for r in rows if not r[2] == r[3][0] == r[4][0]]
    print(f"\ncorpus: {len(CASES)} cases x verify on/off = {len(rows)} verdicts, "
          f"{sum(r[3][0] == r[4][0] for r in rows)} identical; {sum(r[2] == 'refused' for r in rows)} refusals")
    assert not differ, "\n".join(f"{n!r} verify={v}: expected {e}; Python {p}; C++ {c}" for n, v, e, p, c in differ)


def test_the_binding_decodes_any_error_message(cpp_build, artifact, tmp_path):
    """C messages carry bytes from the artifact (a Latin-1 byte nlohmann quotes, a folder name that is not
    UTF-8): decoded with replacement, never a UnicodeDecodeError."""
    from manifest_corpus import make_case
    from nezha.runtime.errors import InputError
    with pytest.raises(InputError, match="ill-formed UTF-8") as e:
        cpp(make_case(artifact, tmp_path / "latin1", "Latin-1 byte in a string"))
    assert "\ufffd" in str(e.value)
    with pytest.raises(InputError, match="is not valid JSON") as e:
        cpp(make_case(artifact, tmp_path / "utf16", "UTF-16"))
    with pytest.raises(InputError, match="does not exist") as e:
        cpp(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))           # a str holding a surrogate escape
    assert "caf\ufffd" in str(e.value)


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
