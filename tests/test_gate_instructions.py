"""The instruction-count gate and the wall-clock A/B: parsing cachegrind output, per-request differences,
the verdict and its tolerances, the baseline's strict parse, the slowdown hook, the bootstrap interval, the
CLI's errors; then the real thing under valgrind on a tiny artifact (fails on an injected slowdown of a few
percent, passes on an unchanged rerun) and an A/B of the current tree against HEAD."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories
from nezha.bench import ab, callgrind, instructions as ins
from nezha.runtime.errors import StepError

INJECT_TINY = "verify:x0.3"      # about +6% of the tiny artifact's own instructions per request (the whole verify step)
WORKER_DIR = Path(ins.__file__).parent


# --- callgrind output -------------------------------------------------------------------------------------

CG = """version: 1
creator: callgrind-3.19.0
pid: 42
cmd:  python worker.py count spec.json
part: 2

desc: I1 cache: 
desc: Timerange: Basic block 100 - 200
desc: Trigger: Client Request: runtime:verify

positions: line
events: Ir
summary: 799

ob=/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0
fl=???
fn=0x0000000004a2b3c0
0 600
fn=0x0000000004a2b400
0 100
ob=/venv/lib/python3.11/site-packages/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so
fn=PyArray_Where
0 50
cob=/usr/lib/x86_64-linux-gnu/libc.so.6
cfn=malloc
calls=2 0
0 5
ob=/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
fl=/tmp/python-build.1/Python-3.11.7/Python/ceval.c
fn=_PyEval_EvalFrameDefault
120 30
fn=_PyEval_EvalFrameDefault'2
130 10
ob=/usr/lib/x86_64-linux-gnu/libc.so.6
fl=./malloc/./malloc/malloc.c
fn=malloc
10 5
ob=/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so
fn=dgemm_kernel
0 4

totals: 799
"""


def test_read_callgrind_sums_self_costs_by_library_and_skips_inclusive_call_costs(tmp_path):
    (tmp_path / "callgrind.out.3").write_text(CG)
    name, total, fns = callgrind.read_callgrind(tmp_path / "callgrind.out.3")
    assert (name, total) == ("runtime:verify", 799)
    assert fns == {"onnxruntime: (unnamed)": 700, "numpy: PyArray_Where": 50,
                   "python: _PyEval_EvalFrameDefault": 40, "system: malloc": 5, "numpy: dgemm_kernel": 4}
    assert sum(fns.values()) == total


def test_read_callgrind_rejects_a_truncated_dump(tmp_path):
    (tmp_path / "cg.out").write_text(CG.split("totals:")[0].replace("summary: 799\n", ""))
    with pytest.raises(StepError, match="no totals line"):
        callgrind.read_callgrind(tmp_path / "cg.out")


def fake_parts(floor=10.0, runtime=30.0, n=10, extra_fn=0.0, stages=(5.0, 2.0, 3.0)) -> dict:
    """Callgrind parts of a worker run of n requests per phase (one function per contender + 'python')."""
    parts = {"floor": (n * floor, {"onnxruntime: (unnamed)": n * floor}),
             "runtime": (n * runtime, {"onnxruntime: (unnamed)": n * floor,
                                       "numpy: argpartition": n * (runtime - floor - extra_fn),
                                       "python: _PyEval_EvalFrameDefault": n * extra_fn})}
    for st, v in zip(callgrind.STAGES, stages):
        parts[f"runtime:{st}"] = (n * v, {})
    return parts


def fake_result(n=10, **kw) -> dict:
    workload = {"requests": n, "warmup": 3, "beam": 20, "batch_size": 1, "threads": 1, "requests_sha256": "abc",
                "artifact_sha256": "def"}
    env = {"valgrind": "valgrind-3.19.0", "python": "3.11.7", "numpy": "2.4.6", "onnxruntime": "1.32.0"}
    machine = {"cpu": "AMD EPYC", "isa": ["avx2", "avx512f"], "cpu_features_valgrind": ["AVX2", "FMA3"]}
    return callgrind.result_from(fake_parts(n=n, **kw), workload, env, machine)


def test_result_gives_per_request_counts_per_contender_and_stage():
    r = fake_result(floor=1e6, runtime=4e6, stages=(1e6, 0.5e6, 0.5e6))
    assert r["per_request"] == {"floor": 1e6, "runtime": 4e6, "runtime_own": 3e6}
    assert r["stages"] == {"head": 1e6, "verify": 0.5e6, "select": 0.5e6, "loop": 1e6}
    assert r["groups"]["runtime_own"]["numpy"] == 3e6 and r["groups"]["runtime_own"]["onnxruntime"] == 0.0
    assert r["functions"]["floor"] == {"onnxruntime: (unnamed)": 1e6}


# --- the gate ----------------------------------------------------------------------------------------------

def baseline_of(result) -> dict:
    return json.loads(json.dumps(ins.baseline_from(result)))


@pytest.mark.parametrize("own_growth, passed", [(0.0, True), (0.019, True), (0.021, False)])
def test_gate_fails_on_2_percent_of_the_runtimes_own_instructions(own_growth, passed):
    base = baseline_of(fake_result(floor=10e6, runtime=13e6))        # own 3M: 2% = 60k, end-to-end 1% = 130k
    now = fake_result(floor=10e6, runtime=13e6 + 3e6 * own_growth)
    gate = ins.compare(now, base)
    assert gate["passed"] is passed
    assert [f["regressed"] for f in gate["figures"]] == [not passed, False]
    if not passed:
        assert gate["regressions"][0].startswith("runtime own (runtime - floor): 3.0630M instructions per request "
                                                 "vs baseline 3.0000M (+2.10%)")


def test_gate_fails_on_1_percent_end_to_end_when_the_backbone_grows():
    base = baseline_of(fake_result(floor=10e6, runtime=13e6))
    gate = ins.compare(fake_result(floor=10.15e6, runtime=13.15e6), base)      # own unchanged, e2e +1.15%
    assert not gate["passed"]
    assert [f["regressed"] for f in gate["figures"]] == [False, True]
    assert gate["regressions"][0].startswith("runtime end-to-end:")
    assert ins.compare(fake_result(floor=10.1e6, runtime=13.1e6), base)["passed"]      # +0.77%


def test_gate_tolerances_come_from_the_baseline_unless_given():
    base = baseline_of(fake_result(floor=10e6, runtime=13e6))
    base["own_tolerance"] = 0.05
    now = fake_result(floor=10e6, runtime=13.09e6)                  # own +3%, end-to-end +0.7%
    assert ins.compare(now, base)["passed"]
    assert not ins.compare(now, base, own_tolerance=0.02)["passed"]


def test_gate_refuses_another_workload_and_notes_other_versions():
    base = baseline_of(fake_result())
    with pytest.raises(StepError, match=r"another workload than the baseline \(requests 10 -> 20\)"):
        ins.compare(fake_result(n=20), base)
    now = fake_result()
    now["environment"]["numpy"] = "2.5.0"
    now["machine"]["cpu"] = "Intel Xeon"
    notes = ins.compare(now, base)["notes"]
    assert any("numpy differs from the baseline's ('2.4.6' -> '2.5.0')" in n for n in notes)
    assert any("CPU differs" in n and "['AVX2', 'FMA3']" in n for n in notes)


def test_report_names_what_moved():
    base = baseline_of(fake_result(floor=10e6, runtime=13e6))
    now = fake_result(floor=10e6, runtime=13.3e6, extra_fn=0.3e6)        # the interpreter did 0.3M more
    now["gate"] = ins.compare(now, base)
    text = ins.report(now, base)
    assert "**Gate: FAILED**" in text and "- REGRESSED runtime own" in text
    moved = text.split("### runtime own (runtime - floor): functions that moved most")[1]
    assert moved.split("\n")[4] == "| `python: _PyEval_EvalFrameDefault` | 0.3000M | - | +0.3000M |"


def test_baseline_file_is_parsed_strictly(tmp_path):
    path = tmp_path / "base.json"
    ins.save_baseline(fake_result(), path)
    assert ins.load_baseline(path)["result"]["per_request"]["runtime_own"] == 20.0
    raw = json.loads(path.read_text())
    del raw["result"]["per_request"]["runtime_own"]
    path.write_text(json.dumps(raw))
    with pytest.raises(StepError, match=r"result.per_request: missing key 'runtime_own'"):
        ins.load_baseline(path)
    path.write_text(json.dumps({"format": "nezha-bench-baseline", "ratios": {}}))
    with pytest.raises(StepError, match="not an instruction-count baseline"):
        ins.load_baseline(path)
    with pytest.raises(StepError, match="does not exist"):
        ins.load_baseline(tmp_path / "none.json")


def test_a_baseline_is_never_saved_from_an_injected_run():
    r = fake_result()
    r["inject"] = "verify:x1"
    with pytest.raises(StepError, match="test-only slowdown"):
        ins.baseline_from(r)


def test_the_committed_baseline_parses_and_records_the_machine():
    base = ins.load_baseline(Path(__file__).resolve().parents[1] / "bench" / "baseline-instructions.json")
    m = base["result"]["machine"]
    assert m["cpu"] and m["isa"] and "AVX2" in m["cpu_features_valgrind"]
    assert not {"AVX512F", "AVX512_SKX"} & set(m["cpu_features_valgrind"])      # valgrind offers no AVX-512
    assert base["result"]["workload"]["requests"] == callgrind.DEFAULTS["requests"]


# --- the slowdown hook ----------------------------------------------------------------------------------------

def test_inject_spec_grammar_and_cpuid():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_worker", WORKER_DIR / "worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    assert worker.parse_inject("verify:x0.25") == ("verify", 0.25)
    assert worker.parse_inject("select:x2") == ("select", 2.0)
    for bad in ("verify", "verify:0.5", "head:x1", "verify:xabc", "verify:x0"):
        with pytest.raises(ValueError, match="NEZHA_BENCH_INJECT"):
            worker.parse_inject(bad)
    import platform
    if platform.machine() == "x86_64":                         # cpuid through a few bytes of machine code
        assert worker.cpu_identity().split()[0] in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")
    calls = []
    hook = worker.StageHook(inject=("verify", 0.25))
    step = lambda x: calls.append(x) or len(calls)
    assert [hook("verify_1", step, "v") for _ in range(8)] == [1, 2, 3, 4, 6, 7, 8, 9]    # one extra run per four
    assert calls == ["v"] * 10
    assert hook("select", step, "s") == 11 and hook("head_0", step, "h") == 12           # other stages: once


# --- A/B statistics ---------------------------------------------------------------------------------------------

def test_bootstrap_interval_covers_a_5_percent_slowdown_and_excludes_1():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.010, 0.020, 60)                      # requests differ; drift cancels in pairs
    drift = np.linspace(1.0, 1.5, 60)
    seconds = {"base": {"floor": base * 0.5 * drift, "runtime": base * drift},
               "current": {"floor": base * 0.5 * drift * rng.normal(1.0, 0.01, 60),
                           "runtime": base * drift * 1.05 * rng.normal(1.0, 0.01, 60)}}
    cmp = ab.compare_sides(seconds)
    r = cmp["runtime"]
    assert r["low"] < 1.05 < r["high"] and r["low"] > 1.0 and r["verdict"] == "slower"
    assert cmp["floor"]["low"] < 1.0 < cmp["floor"]["high"] and cmp["floor"]["verdict"] == "no significant change"
    assert cmp["runtime_own"]["ratio"] == pytest.approx(1.10, abs=0.03)     # own time: 0.55 vs 0.5


def test_package_folder_maps_every_package_of_the_tree(tmp_path):
    root = Path(ins.__file__).resolve().parents[1]
    pkg = ab.package_folder(root, tmp_path / "path") / "nezha"
    assert (pkg / "__init__.py").resolve() == root / "nezha" / "__init__.py"
    assert (pkg / "runtime").resolve() == root / "runtime" and (pkg / "bench").resolve() == root / "bench"


# --- the CLI ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--instructions"], "--instructions needs an ARTIFACT folder"),
    (["ART", "--instructions", "--against", "main"], "two different runs"),
    (["ART", "--instructions", "--beams", "20", "512"], "--beams takes one value"),
    (["ART", "--against", "no-such-revision-xyz"], "unknown revision 'no-such-revision-xyz'"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys):
    from nezha.cli import main

    assert main(["bench"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nezha bench: error: ") and message in err[0]


def test_cli_bad_baseline_fails_before_counting(tmp_path, capsys):
    from nezha.cli import main

    (tmp_path / "art").mkdir()
    (tmp_path / "base.json").write_text("{}")
    assert main(["bench", str(tmp_path / "art"), "--instructions", "--baseline", str(tmp_path / "base.json")]) == 2
    assert "is not an instruction-count baseline" in capsys.readouterr().err


# --- under valgrind ---------------------------------------------------------------------------------------------

needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None,
                                    reason="valgrind not installed (apt-get install -y valgrind)")


@needs_valgrind
def test_gate_fails_on_an_injected_slowdown_and_passes_an_unchanged_rerun(make_checkpoint, tmp_path):
    build = pytest.importorskip("nezha.export.build", reason="the exporter is not available").build
    from test_bench import write_dataset

    cat = tiny_catalog()
    histories = tiny_histories(cat, 16)
    data = write_dataset(tmp_path / "data", cat, histories)
    artifact = tmp_path / "artifact"
    build(checkpoint=make_checkpoint(), index=next(data.glob("*.index.json")), out=artifact, precision=("fp32",),
          max_beam=16, max_batch=4, log=None)
    kw = dict(histories=histories, requests=12, warmup=2, beam=16)
    ins.run_gate(artifact, save_baseline_to=tmp_path / "base.json", out=tmp_path / "a", **kw)
    same = ins.run_gate(artifact, baseline=tmp_path / "base.json", out=tmp_path / "b", **kw)
    assert same["gate"]["passed"], same["gate"]["regressions"]
    base = ins.load_baseline(tmp_path / "base.json")["result"]
    spread = same["per_request"]["runtime_own"] / base["per_request"]["runtime_own"] - 1
    # Reruns agree inside the 2% tolerance: most to the instruction; now and then ONNX Runtime's own code
    # (its allocator) runs ~1% more in one of them (seen: +1.1%, more often on a loaded machine).
    assert abs(spread) < 0.015
    slow = ins.run_gate(artifact, baseline=tmp_path / "base.json", out=tmp_path / "c", inject=INJECT_TINY, **kw)
    own = slow["gate"]["figures"][0]
    assert 0.025 < own["change"] < 0.08, own                 # a small slowdown of the runtime's own work ...
    assert not slow["gate"]["passed"] and own["regressed"]   # ... that the gate catches
    grew = {st: slow["stages"][st] / base["stages"][st] - 1 for st in ("head", "verify", "select")}
    assert grew["verify"] > 0.2 and abs(grew["head"]) < 0.01 and abs(grew["select"]) < 0.01, grew   # and places
    text = (tmp_path / "c" / "instructions.md").read_text()
    assert "**Gate: FAILED**" in text and "NEZHA_BENCH_INJECT" in text


def test_against_head_builds_both_sides_and_reports_a_ratio_with_an_interval(make_checkpoint, tmp_path):
    pytest.importorskip("nezha.export.build", reason="the exporter is not available")
    from test_bench import write_dataset

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    cat = tiny_catalog()
    histories = tiny_histories(cat, 8)
    data = write_dataset(tmp_path / "data", cat, histories)
    build_args = ["--checkpoint", str(make_checkpoint()), "--index", str(next(data.glob("*.index.json"))),
                  "--precision", "fp32", "--max-beam", "16"]
    result = ab.run_against("HEAD", histories=histories, requests=6, warmup=1, beam=16, build_args=build_args,
                            out=tmp_path / "ab")
    assert result["base"]["sha"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.ROOT, capture_output=True,
                                                   text=True).stdout.strip()
    for side in ("current", "base"):
        assert all(len(result["seconds"][side][c]) == 6 for c in ab.CONTENDERS)
    for r in result["comparison"].values():
        assert r["low"] <= r["ratio"] <= r["high"] and r["verdict"] in ("slower", "faster", "no significant change")
    assert (tmp_path / "ab" / "ab.md").read_text().startswith("# A/B: current tree vs HEAD")
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ab.ROOT, capture_output=True, text=True).stdout
    assert "nezha-ab-" not in worktrees                       # the base checkout is removed again


def test_missing_valgrind_is_a_user_error_that_says_how_to_install(monkeypatch):
    monkeypatch.setattr(callgrind.shutil, "which", lambda name: None)
    with pytest.raises(StepError, match="apt-get install -y valgrind"):
        callgrind.valgrind_version()
