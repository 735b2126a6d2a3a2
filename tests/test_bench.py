"""The benchmark: statistics, ratios and the gate on synthetic inputs; a small real run end to end
(JSON, Markdown, PNG); the CLI's exit codes; the GPU check's CPU smoke mode. No test asserts a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories
from nezha.bench import gate, stats
from nezha.bench.run import flat_ratios, ratio_specs, requests_of
from nezha.runtime.errors import InputError


# --- statistics --------------------------------------------------------------------------------------------

def test_percentiles_interpolate_between_order_statistics():
    p = stats.percentiles(np.arange(1, 101, dtype=float))
    assert p == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert stats.percentiles([0.004]) == {"p50": 0.004, "p90": 0.004, "p99": 0.004}


@pytest.mark.parametrize("bad", [[], [0.1, -0.2], [np.nan]])
def test_percentiles_reject_bad_timings(bad):
    with pytest.raises(InputError):
        stats.percentiles(bad)


def test_summarize_counts_histories_per_second():
    s = stats.summarize([0.1, 0.3], batch_size=4)
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.2) and s["min"] == pytest.approx(0.1)
    assert s["throughput"] == pytest.approx(8 / 0.4)


def test_paired_ratio_cancels_drift():
    drift = np.linspace(0.01, 0.05, 40)               # the machine slows down during the run
    noise = np.random.default_rng(0).normal(1.0, 0.01, 40)
    assert stats.paired_ratio(3 * drift * noise, drift * noise) == pytest.approx(3.0)
    assert stats.paired_ratio([2.0, 9.0, 3.0], [1.0, 1.0, 1.0]) == 3.0          # median, not mean
    with pytest.raises(InputError):
        stats.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(InputError):
        stats.paired_ratio([1.0], [0.0])


def test_regressed_respects_direction_and_tolerance():
    assert not gate.regressed(1.30, 1.20, higher_is_better=False, tolerance=0.10)     # +8.3 %
    assert gate.regressed(1.33, 1.20, higher_is_better=False, tolerance=0.10)         # +10.8 %
    assert not gate.regressed(4.0, 4.4, higher_is_better=True, tolerance=0.10)        # -9.1 %
    assert gate.regressed(3.9, 4.4, higher_is_better=True, tolerance=0.10)            # -11.4 %
    assert not gate.regressed(0.5, 1.2, higher_is_better=False, tolerance=0.0)        # better is never a regression
    with pytest.raises(InputError):
        gate.regressed(1.0, 1.0, False, -0.1)


def test_peak_rss_is_positive():
    assert stats.peak_rss_bytes() > 0
    assert stats.machine()["cpu_count"] >= 1


def test_ratio_specs_pair_each_engine_with_its_own_floor():
    names = ["floor[onnxruntime-fp32-cpu]", "nezha[onnxruntime-fp32-cpu]", "floor[onnxruntime-int8-cpu]",
             "nezha[onnxruntime-int8-cpu]", "floor[torch-fp32-cpu]", "reference[torch-fp32-cpu]", "ar[torch-fp32-cpu]"]
    got = {s.name: s.higher_is_better for s in ratio_specs(names)}
    assert got["nezha[onnxruntime-fp32-cpu] / floor[onnxruntime-fp32-cpu]"] is False
    assert got["nezha[onnxruntime-int8-cpu] / floor[onnxruntime-int8-cpu]"] is False
    assert "nezha[onnxruntime-int8-cpu] / floor[onnxruntime-fp32-cpu]" not in got
    assert got["ar[torch-fp32-cpu] / nezha[onnxruntime-fp32-cpu]"] is True
    assert got["reference[torch-fp32-cpu] / nezha[onnxruntime-int8-cpu]"] is True
    assert got["reference[torch-fp32-cpu] / floor[torch-fp32-cpu]"] is False
    assert got["ar[torch-fp32-cpu] / reference[torch-fp32-cpu]"] is True


def test_requests_wrap_around_and_keep_batch_size():
    reqs = requests_of([[1], [2], [3]], batch_size=2, n=3)
    assert reqs == [[[1], [2]], [[3], [1]], [[2], [3]]]
    with pytest.raises(InputError):
        requests_of([], 1, 1)


# --- the gate on synthetic results -------------------------------------------------------------------------

def synthetic_result(overhead: float, speedup: float) -> dict:
    ratios = {"nezha[x] / floor[x]": {"value": overhead, "higher_is_better": False},
              "ar[t] / nezha[x]": {"value": speedup, "higher_is_better": True}}
    return {"created": "now", "machine": {}, "setup": {},
            "configs": [{"batch_size": 1, "beam": 20, "ratios": ratios}]}


def test_gate_passes_within_tolerance_and_names_the_regressed_figure(tmp_path):
    path = gate.save_baseline(synthetic_result(1.21, 4.4), tmp_path / "base.json")
    base = gate.load_baseline(path)
    assert gate.compare(synthetic_result(1.25, 4.1), base, 0.10) == []
    bad = gate.compare(synthetic_result(1.40, 4.1), base, 0.10)
    assert [r.figure for r in bad] == ["batch=1 beam=20: nezha[x] / floor[x]"]
    assert "1.400 vs baseline 1.210" in bad[0].message()
    bad = gate.compare(synthetic_result(1.21, 3.0), base, 0.10)
    assert [r.figure for r in bad] == ["batch=1 beam=20: ar[t] / nezha[x]"]


def test_gate_fails_on_a_missing_figure(tmp_path):
    base = gate.baseline_from(synthetic_result(1.21, 4.4))
    run = synthetic_result(1.21, 4.4)
    del run["configs"][0]["ratios"]["ar[t] / nezha[x]"]
    bad = gate.compare(run, base, 0.10)
    assert len(bad) == 1 and bad[0].value is None and "missing" in bad[0].message()


def test_gate_rejects_a_file_that_is_no_baseline(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a nezha bench baseline"):
        gate.load_baseline(tmp_path / "x.json")
    with pytest.raises(InputError, match="does not exist"):
        gate.load_baseline(tmp_path / "nope.json")


# --- real runs (tiny models) -------------------------------------------------------------------------------

def check_result_files(out: Path) -> dict:
    result = json.loads((out / "bench.json").read_text())
    assert result["format"] == "nezha-bench" and result["machine"]["python"]
    for config in result["configs"]:
        for name, r in config["contenders"].items():
            lat = r["latency"]
            assert lat["n"] == result["setup"]["requests"] == len(r["seconds"])
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert lat["throughput"] > 0
        for name, r in config["ratios"].items():
            assert r["value"] > 0 and isinstance(r["higher_is_better"], bool)
    assert (out / "bench.md").read_text().startswith("# NEZHA benchmark")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


def test_torch_side_run_writes_json_markdown_and_plot(make_checkpoint, tmp_path):
    from nezha.bench.suite import run_bench

    cat = tiny_catalog()
    result, regressions = run_bench(checkpoint=make_checkpoint(), histories=tiny_histories(cat, 8), catalog=cat,
                                    beams=(4, 16), requests=3, warmup=1, out=tmp_path / "out", hf_generate=True,
                                    save_baseline=tmp_path / "base.json")
    assert regressions == []
    result = check_result_files(tmp_path / "out")
    config = result["configs"][-1]
    assert set(config["contenders"]) == {"floor[torch-fp32-cpu]", "reference[torch-fp32-cpu]", "ar[torch-fp32-cpu]",
                                         "hf-generate[torch-fp32-cpu]"}
    stages = config["contenders"]["reference[torch-fp32-cpu]"]["stages"]
    assert {"encode", "backbone", "head_0", "head_1", "head_2", "verify_0", "verify_2", "select", "host"} <= set(stages)
    assert set(gate.load_baseline(tmp_path / "base.json")["ratios"]) == set(flat_ratios(result))


def write_dataset(folder: Path, catalog, histories) -> Path:
    """A LETTER-format dataset of the tiny catalog: index + interactions (each history + a target)."""
    folder.mkdir(parents=True)
    catalog.to_index_json(folder / "Tiny.index.json")
    inter = {str(u): h + [int(catalog.item_ids[0])] for u, h in enumerate(histories)}
    (folder / "Tiny.inter.json").write_text(json.dumps(inter))
    return folder


def test_cli_saves_a_baseline_and_exits_1_naming_the_regressed_ratio(make_checkpoint, tmp_path, capsys):
    from nezha.cli import main

    cat = tiny_catalog()
    data = write_dataset(tmp_path / "data", cat, tiny_histories(cat, 10))
    common = ["bench", "--checkpoint", str(make_checkpoint()), "--data", str(data), "--beams", "4",
              "--requests", "3", "--warmup", "1", "--no-ar"]
    assert main(common + ["--out", str(tmp_path / "a"), "--save-baseline", str(tmp_path / "base.json")]) == 0
    check_result_files(tmp_path / "a")
    base = json.loads((tmp_path / "base.json").read_text())
    figure = "batch=1 beam=4: reference[torch-fp32-cpu] / floor[torch-fp32-cpu]"
    assert set(base["ratios"]) == {figure}
    base["ratios"][figure]["value"] = 0.01          # an impossible overhead: any real run regresses
    (tmp_path / "base.json").write_text(json.dumps(base))
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "b"), "--baseline", str(tmp_path / "base.json")]) == 1
    assert f"REGRESSED {figure}" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["gate"]["regressions"][0]["figure"] == figure


def test_runtime_contenders_on_an_artifact(make_checkpoint, tmp_path):
    from nezha.export.build import build
    from nezha.bench.suite import run_bench

    ckpt, cat = make_checkpoint(), tiny_catalog()
    data = write_dataset(tmp_path / "data", cat, tiny_histories(cat, 10))
    artifact = tmp_path / "artifact"
    build(checkpoint=ckpt, index=next(data.glob("*.index.json")), out=artifact, precision=("fp32",), max_beam=16,
          max_batch=4, log=None)
    result, _ = run_bench(artifact, data=data, beams=(4, 32), requests=3, warmup=1, out=tmp_path / "out")
    assert "beam 32 > the artifact's max_beam 16" in result["configs"][1]["skipped"]["nezha[onnxruntime-fp32-cpu]"]
    ratios = check_result_files(tmp_path / "out")["configs"][0]["ratios"]
    engine = "onnxruntime-fp32-cpu"
    assert {f"nezha[{engine}] / floor[{engine}]", f"ar[torch-fp32-cpu] / nezha[{engine}]",
            f"reference[torch-fp32-cpu] / nezha[{engine}]"} <= set(ratios)


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    from nezha.bench.gpu_check import main

    assert main(["--tiny", "--device", "cpu", "--no-runtime", "--out", str(tmp_path), "--requests", "2",
                 "--beams", "8"]) == 0
    result = check_result_files(tmp_path)
    assert result["setup"]["backbone"]["sid_codes"] == [512, 512, 512]
    assert "ar[torch-fp32-cpu] / reference[torch-fp32-cpu]" in result["configs"][0]["ratios"]


def test_random_checkpoint_has_the_asked_shape_and_beauty_layout(tmp_path):
    from nezha.model.random_checkpoint import main
    from nezha.model.checkpoint import load_checkpoint

    assert main(["--out", str(tmp_path / "ck"), "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
                 "--num-kv-heads", "1", "--intermediate-size", "64"]) == 0
    model = load_checkpoint(tmp_path / "ck")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    assert model.layout.codes == (256, 256, 256, 256) and model.layout.offsets[0] == 2
    assert (tmp_path / "ck.index.json").is_file()


# --- the decode loop's stage hook ----------------------------------------------------------------------------

class FakeSteps:
    """Deterministic numpy DecodeSteps: random log-probs per level, states = the beams' hidden rows."""

    def __init__(self, layout, hidden=4, seed=0):
        self.layout, self.rng, self.H = layout, np.random.default_rng(seed), hidden
        self.tables = [self.rng.normal(size=(hidden, c)).astype(np.float32) for c in layout.codes]

    def backbone(self, feed):
        B = len(feed["input_ids"])
        return np.tile(np.arange(self.layout.levels + 1, dtype=np.float32)[None, :, None], (B, 1, self.H)) + \
            feed["input_ids"][:, :1, None].astype(np.float32)

    def head_step(self, level, parents, parent, code, hidden):
        states = np.tanh(hidden if parent is None else parents[parent] + hidden)
        logits = states @ self.tables[level]
        return states, logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def test_decode_stage_hook_sees_each_named_step_and_changes_nothing():
    from conftest import tiny_layout
    from nezha.runtime.decode import beam_search
    from nezha.runtime.decode import Verifier

    layout, cat = tiny_layout(), tiny_catalog()
    verifier = Verifier(layout, cat.valid_prefixes(layout))
    feed = {"input_ids": np.array([[3, 4], [5, 6]], dtype=np.int64), "attention_mask": np.ones((2, 2), np.int64)}
    plain = beam_search(FakeSteps(layout), feed, layout, verifier, 5)
    seen = []

    def hook(name, step, *args):
        seen.append(name)
        return step(*args)

    hooked = beam_search(FakeSteps(layout), feed, layout, verifier, 5, stages=hook)
    seconds: dict = {}
    timed = beam_search(FakeSteps(layout), feed, layout, verifier, 5, stages=seconds)
    for keys, scores in (hooked, timed):
        assert np.array_equal(keys, plain[0]) and np.array_equal(scores, plain[1])
    assert seen == ["backbone"] + [s for lv in range(3) for s in (f"head_{lv}", f"verify_{lv}", "select")]
    assert set(seconds) == set(seen) and all(v >= 0 for v in seconds.values())


def test_worker_hook_repeats_and_counts_only_its_stage():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_worker", Path(gate.__file__).with_name("worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)

    class Toggles:
        on = 0

        def toggle(self):
            self.on ^= 1
            events.append(self.on)

    events, steps = [], []
    hook = worker.StageHook(Toggles(), collect="verify", inject=("select", 1.0))
    step = lambda name: steps.append(name) or (events.append(name) or name)
    for name in ("head_0", "verify_0", "select"):
        assert hook(name, step, name) == name
    assert events == ["head_0", 1, "verify_0", 0, "select", "select"]       # collect around verify; select twice
    with pytest.raises(ValueError, match="stage 'loop'"):
        worker.contenders(None, 20, None, Toggles(), "loop")


def test_one_machine_description_for_the_manifest_and_the_benchmarks():
    from nezha.export.steps import machine as build_machine
    from nezha.runtime.machine import ISA_FLAGS, cpu

    record = cpu()
    assert build_machine() == record and set(record) == {"system", "arch", "cpu", "isa"}   # the manifest's keys
    assert record["cpu"] and record["isa"] == [f for f in ISA_FLAGS if f in record["isa"]]
    bench = stats.machine()
    assert {k: bench[k] for k in record} == record and bench["cpu_usable"] >= 1
