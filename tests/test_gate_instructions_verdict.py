"""The instruction-count gate's arithmetic: parsing cachegrind output, per-request differences per contender
and stage, the verdict and its tolerances, the report, the baseline's strict parse and the committed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nezha.bench import callgrind, instructions as ins
from nezha.runtime.errors import StepError


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
