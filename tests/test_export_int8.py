"""int8 (calibrated) and int8-cpu in the build: the calibration recorded, CPU-only graphs, the runtime
loading them, the calibration cache reused, bad calibration data and int8 thresholds failing the build;
and the engine validation wiring, with ONNX Runtime standing in for TensorRT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import tiny_catalog, tiny_model
from nezha.export.build import build, main
from nezha.export.validate import TOLERANCES, ort_validation_steps
from nezha.model.checkpoint import save_checkpoint
from nezha.runtime.artifact import Artifact
from nezha.runtime.errors import ArtifactError, InputError, StepError
from export_helpers import LIMITS, _leftovers, checkpoint  # noqa: F401


# ---- int8 (calibrated) and int8-cpu in the build ----

INT8_PRECISIONS = ("fp32", "int8", "int8-cpu")
# Built without --index, an artifact's catalog is the checkpoint's ava_sid file: item ids are positions.
CHECKPOINT_ITEMS = np.arange(len(tiny_catalog().item_ids))


def _interactions(path: Path, users: dict) -> Path:
    path.write_text(json.dumps(users))
    return path


def _calibration_users(n: int = 24, seed: int = 5) -> dict:
    """n users of 5..11 catalog items: each leaves a training history of 2..8 items."""
    rng = np.random.default_rng(seed)
    return {f"u{u}": rng.choice(CHECKPOINT_ITEMS, size=int(rng.integers(5, 12))).tolist() for u in range(n)}


def _int8_build(checkpoint: Path, out: Path, data: Path, lines: list | None = None, **kw):
    kw = {"precision": INT8_PRECISIONS, "exporter": "torchscript", "max_batch": LIMITS.max_batch,
          "max_history": LIMITS.max_history, "max_beam": LIMITS.max_beam, "calibration_data": data,
          "calibration_size": 16, "log": None if lines is None else lambda *a, **k: lines.append("".join(map(str, a))),
          **kw}
    return build(checkpoint, None, out, **kw)


@pytest.fixture(scope="module")
def int8_built(tmp_path_factory):
    """(checkpoint, calibration data, Summary, log lines) of one fp32 + int8 + int8-cpu build (TensorRT asked for)."""
    root = tmp_path_factory.mktemp("int8")
    checkpoint = save_checkpoint(tiny_model("qwen3"), root / "ckpt", tiny_catalog())
    data = _interactions(root / "calib.inter.json", _calibration_users())
    lines = []
    summary = _int8_build(checkpoint, root / "art", data, lines, calibration_exclude=1,
                          backend=("onnxruntime", "tensorrt"))
    return checkpoint, data, summary, lines


def test_int8_build_records_calibration_and_cpu_only(int8_built):
    _, data, summary, lines = int8_built
    artifact = Artifact.open(summary.out)
    manifest = artifact.manifest
    assert list(manifest.precisions) == list(INT8_PRECISIONS)
    calibration = manifest.precisions["int8"].quantization
    assert {k: calibration[k] for k in ("kind", "method", "size", "samples", "data", "split", "seed")} == {
        "kind": "static-qdq", "method": "entropy", "size": 16, "samples": 16, "data": str(data), "split": "train",
        "seed": 0}
    assert calibration["exclude_sensitive"] == 1 and len(calibration["excluded"]) == 1
    assert calibration["quantized_nodes"] == 13 and calibration["cache_hit"] is False
    cache = json.loads(artifact.path(calibration["cache"]).read_text())
    assert calibration["cache"] in manifest.files and cache["key"]["method"] == "entropy" and cache["ranges"]
    # int8-cpu is marked cpu-only with its settings (reduce_range: the same answers on every x86 CPU)
    assert manifest.precisions["int8-cpu"].execution == "cpu-only"
    assert manifest.precisions["int8-cpu"].quantization["reduce_range"] is True
    assert {p: manifest.precisions[p].execution for p in ("fp32", "int8")} == {"fp32": "any", "int8": "any"}
    assert "TensorRT" in summary.engines_skipped and "cpu-only" in summary.engines_not_built["int8-cpu"]
    # int8 graphs carry Q/DQ; int8-cpu run-time quantization; heads stay float and identical to fp32
    ops = lambda p: {n.op_type for n in onnx.load(str(artifact.path(manifest.graph(p, "backbone").file))).graph.node}
    assert "QuantizeLinear" in ops("int8") and "MatMulInteger" in ops("int8-cpu")
    for p in ("int8", "int8-cpu"):
        assert manifest.files[manifest.graph(p, "head_1").file] == manifest.files[manifest.graph("fp32", "head_1").file]
    # both int8 graphs passed the hidden-state check against fp32 and the top-k check against torch
    report = json.loads(artifact.path(manifest.validation).read_text())
    for p in ("int8", "int8-cpu"):
        hidden = report["hidden_state_vs_fp32"][p]["hidden"]
        assert hidden["ok"] and hidden["mean_cosine"] >= hidden["tolerances"]["min_mean_cosine"]
        entry = report["precisions"][p]
        assert entry["ok"] and entry["topk_agreement"] >= entry["min_topk_agreement"] == TOLERANCES[p].min_topk_agreement
    table = summary.table()
    assert re.search(r"^int8-cpu +backbone .*cpu-only", table, re.M) and "hidden cos vs fp32" in table
    steps = [line for line in lines if line.startswith("[")]
    assert [s.split()[1] for s in steps] == [
        "model_from_checkpoint", "calibration_feeds_from_data", "tables_from_catalog", "onnx_from_model",
        "int8_from_onnx", "int8_cpu_from_onnx", "validate_int8", "validate_artifact", "engine_from_onnx",
        "write_manifest", "load_with_runtime"] and steps[-1].startswith("[11/11]")
    assert any("int8-cpu: skipped" in line for line in lines) and any("kept float" in line for line in lines)


def test_int8_artifact_loads_in_the_runtime(int8_built, monkeypatch):
    from nezha.runtime import Recommender
    from nezha.runtime.backends import onnxruntime as ort_backend

    out = int8_built[2].out
    items = set(CHECKPOINT_ITEMS.tolist())
    for precision in ("int8-cpu", "int8"):
        with Recommender.load(out, precision=precision) as rec:
            recs = rec.recommend([[0, 5, 10], [20]], k=3, beam=5)
        assert len(recs) == 2 and all(1 <= len(r) <= 3 and {i for i, _ in r} <= items for r in recs)

    def no_sessions(*a, **k):
        raise AssertionError("sessions opened for a cpu-only graph on cuda")
    monkeypatch.setattr(ort_backend, "open_sessions", no_sessions)
    with pytest.raises(ArtifactError, match="(?i)cpu-only"):
        Recommender.load(out, precision="int8-cpu", device="cuda")


def test_rebuild_with_force_reuses_the_calibration_cache(int8_built, tmp_path):
    import shutil

    checkpoint, data, summary, _ = int8_built
    out = tmp_path / "art"
    shutil.copytree(summary.out, out)
    cache = out / "calibration" / "cache.json"
    before = cache.read_bytes()
    lines = []
    _int8_build(checkpoint, out, data, lines, precision=("fp32", "int8"), calibration_exclude=1, force=True)
    calibration = Artifact.open(out).manifest.precisions["int8"].quantization
    assert calibration["cache_hit"] is True and cache.read_bytes() == before
    assert any("reused (hit)" in line for line in lines)
    assert calibration["excluded"] == Artifact.open(summary.out).manifest.precisions["int8"].quantization["excluded"]
    assert _leftovers(tmp_path) == []


def test_bad_calibration_data_fails_the_build(tmp_path, checkpoint, capsys):

    out = tmp_path / "art"
    empty = tmp_path / "empty.inter.json"
    empty.write_text("")
    unknown = _interactions(tmp_path / "unknown.inter.json",
                            {f"u{u}": [5000 + u, 6000 + u, 7000, 8000, 9000] for u in range(24)})
    few = _interactions(tmp_path / "few.inter.json", _calibration_users(n=10))
    cases = [(empty, {}, "not valid JSON"),
             (unknown, {}, "none of the 16 calibration histories has an item of the catalog"),
             (few, {}, "10 usable histories .* 16 requested"),
             (few, {"calibration_size": 4}, "too small: need at least 16"),
             (tmp_path / "missing.inter.json", {}, "does not exist"),
             (few, {"calibration_method": "kl"}, "allowed: minmax, entropy, percentile")]
    for data, kw, message in cases:
        with pytest.raises(InputError, match=message):
            _int8_build(checkpoint, out, data, **kw)
        assert not out.exists() and _leftovers(tmp_path) == []
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--precision", "int8",
                 "--calibration-data", str(unknown), "--calibration-size", "16"]) == 2
    captured = capsys.readouterr()
    assert "error: none of the" in captured.err and "calibration_feeds_from_data ... failed" in captured.out
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--out", str(out), "--precision", "int8", "--calibration-method", "kl"])
    assert "invalid choice: 'kl'" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_int8_thresholds_fail_the_build(tmp_path, checkpoint, monkeypatch):
    from functools import partial

    from nezha.export import validate

    data = _interactions(tmp_path / "calib.inter.json", _calibration_users())
    out = tmp_path / "art"
    from nezha.export import steps as steps_module
    strict = partial(steps_module.validate_int8, min_mean_cosine=1.0, max_relative_error=0.0)
    monkeypatch.setattr(steps_module, "validate_int8", strict)
    with pytest.raises(StepError, match=r"(?s)int8: .*hidden: mean cosine .*FAILED.*int8-cpu: .*FAILED"):
        _int8_build(checkpoint, out, data, precision=("int8", "int8-cpu"))
    assert not out.exists() and _leftovers(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setitem(validate.TOLERANCES, "int8-cpu", validate.Tolerance(0.5, 1.01))
    with pytest.raises(StepError, match=r"FAIL int8-cpu top-\d+ items: agreement .* \(at least 1.01\)"):
        _int8_build(checkpoint, out, data, precision=("int8-cpu",))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_help_explains_the_calibration_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ["--calibration-data", "--calibration-size", "--calibration-method", "--calibration-exclude",
                   "int8-cpu", "cpu-only", "never built for TensorRT", "{minmax,entropy,percentile}"]:
        assert option in text


def test_built_engines_are_validated_against_torch(tmp_path, checkpoint, monkeypatch):
    """The engine validation wiring, with ONNX Runtime standing in for TensorRT (absent here): the build
    validates engines through the same comparisons and fails the build when an engine disagrees."""
    from nezha.export import engines as engines_module
    from nezha.export import steps as steps_module
    from nezha.runtime.manifest import EngineEntry

    def fake_engine(onnx_path, plan, spec, file, **options):
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(onnx_path.read_bytes())                 # the "engine" is the ONNX graph itself
        return EngineEntry(file, "0.0", "0.0", True, ())

    shift = {"by": 0.0}

    def ort_as_engines(entries, engines, paths):
        steps = ort_validation_steps(entries, paths)
        for runner in steps.runners.values():
            real = runner.run
            runner.run = lambda feed, _real=real: {k: v + shift["by"] if v.dtype == np.float32 else v
                                                   for k, v in _real(feed).items()}
        return steps

    monkeypatch.setattr(engines_module, "engine_from_onnx", fake_engine)
    monkeypatch.setattr(steps_module, "gpu_for_engines", lambda: None)
    monkeypatch.setattr(steps_module, "trt_validation_steps", ort_as_engines)
    kw = dict(precision=("fp32",), backend=("onnxruntime", "tensorrt"), exporter="torchscript", max_batch=4,
              max_beam=8, log=None)
    summary = build(checkpoint, None, tmp_path / "art", **kw)
    report = json.loads((summary.out / "validation.json").read_text())
    assert report["tensorrt"]["ok"] and report["tensorrt"]["precisions"]["fp32"]["topk_agreement"] == 1.0
    assert set(Artifact.open(summary.out).manifest.engines["fp32"]) == {"backbone", "head_0", "head_1", "head_2"}
    shift["by"] = 1.0
    with pytest.raises(StepError, match="TensorRT engines disagree"):
        build(checkpoint, None, tmp_path / "art2", **kw)
    assert not (tmp_path / "art2").exists()
