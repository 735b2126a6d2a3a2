"""INT8 calibration's graphs: Q/DQ sit only on MatMul/Gemm inputs, the int8 graphs run in ONNX Runtime with
fp32's I/O, the cache is reused only when it matches, TensorRT's int8 graph is the same Q/DQ on the fp16
graph, int8-cpu answers the same on the AVX2-only path. Tiny graphs exported once per module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import tiny_catalog, tiny_histories, tiny_layout
from nezha.calibration import INT8_CPU_SETTINGS, CalibrationReader, FeedList, calibrate_ranges, int8_cpu_from_onnx, int8_from_onnx, validate_int8, weight_matmuls
from nezha.runtime.encoding import encode_histories
from nezha.runtime.errors import InputError, StepError
from calibration_helpers import MAX_HISTORY, write_interactions


FLOAT_ONLY = {"SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization", "Softmax", "LogSoftmax",
              "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Add", "Tanh"}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from conftest import tiny_model
    from nezha.export.graphs import model_limits, onnx_from_model

    model = tiny_model()
    return onnx_from_model(model, tmp_path_factory.mktemp("fp32"), model_limits(model, MAX_HISTORY, 8, 16))


@pytest.fixture(scope="module")
def reader():
    catalog = tiny_catalog()
    return CalibrationReader(tiny_histories(catalog, n=48, seed=3), catalog, tiny_layout(), MAX_HISTORY,
                             batch_size=16, progress=False)


@pytest.fixture(scope="module")
def int8(graphs, reader, tmp_path_factory):
    report = {}
    paths = int8_from_onnx(graphs, tmp_path_factory.mktemp("int8"), reader, method="entropy", exclude_sensitive=2,
                           sensitivity_batches=1, progress=False, log=None, report=report)
    return paths, report


# ---------------------------------------------------------------- the int8 graphs

def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def test_qdq_only_on_matmul_gemm_inputs_symmetric_per_channel(graphs, int8):
    paths, report = int8
    model = onnx.load(str(paths["backbone"]))
    consumers, inits = _consumers(model), {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and dqs
    for q in qs:                                              # Q -> DQ only
        assert {c.op_type for c in consumers[q.output[0]]} == {"DequantizeLinear"}, q.name
    for dq in dqs:                                            # DQ -> MatMul/Gemm only, as an input
        users = consumers[dq.output[0]]
        assert users and all(u.op_type in ("MatMul", "Gemm") for u in users), (dq.name, [u.op_type for u in users])
        for zp in dq.input[2:]:                               # symmetric int8: every zero point is 0
            assert inits[zp].data_type == onnx.TensorProto.INT8
            assert not onnx.numpy_helper.to_array(inits[zp]).any()
        if dq.input[0] in inits:                              # a weight: int8, per output channel
            assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
            assert onnx.numpy_helper.to_array(inits[dq.input[1]]).size > 1
    for node in model.graph.node:                             # norms, softmax, adds read float tensors
        if node.op_type in FLOAT_ONLY:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    # every weight MatMul is quantized except the excluded sensitive ones; no float weight is left behind
    dq_fed = {u.name for dq in dqs for u in consumers[dq.output[0]]}
    expected = {r["node"] for r in weight_matmuls(graphs["backbone"])} - set(report["excluded"])
    assert dq_fed == expected and len(report["excluded"]) == 2


def test_sensitivity_table_is_returned_worst_first(graphs, int8):
    _, report = int8
    rows = report["sensitivity"]
    assert len(rows) == len(weight_matmuls(graphs["backbone"])) == 14
    assert [r["mean_cosine"] for r in rows] == sorted(r["mean_cosine"] for r in rows)
    assert report["excluded"] == [r["node"] for r in rows[:2]]
    assert report["heads"].startswith("fp32")


def _io(path):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s, ([(a.name, a.type, a.shape) for a in s.get_inputs()], [(a.name, a.type, a.shape) for a in s.get_outputs()])


@pytest.mark.parametrize("precision", ["int8", "int8-cpu"])
def test_int8_graphs_run_with_fp32_io_and_pass_validation(graphs, reader, int8, tmp_path, precision):
    paths = int8[0] if precision == "int8" else int8_cpu_from_onnx(graphs, tmp_path, log=None)
    assert sorted(paths) == sorted(graphs)
    for name in graphs:
        s32, io32 = _io(graphs[name])
        s8, io8 = _io(paths[name])
        assert io8 == io32, name
    s32, s8 = _io(graphs["backbone"])[0], _io(paths["backbone"])[0]
    feed = reader.feeds()[0]
    assert s8.run(None, feed)[0].shape == s32.run(None, feed)[0].shape
    result = validate_int8(graphs["backbone"], paths["backbone"], reader)
    assert result["hidden"]["ok"] and result["hidden"]["mean_cosine"] > 0.99
    for name in graphs:                                    # heads: copied unchanged
        if name != "backbone":
            assert Path(paths[name]).read_bytes() == Path(graphs[name]).read_bytes()
    ops = {n.op_type for n in onnx.load(str(paths["backbone"])).graph.node}
    if precision == "int8-cpu":                            # run-time quantization: not a TensorRT graph
        assert "MatMulInteger" in ops and "QuantizeLinear" not in ops and INT8_CPU_SETTINGS["reduce_range"] is True


def test_validate_int8_raises_one_typed_error_listing_outputs(graphs, int8, reader):
    with pytest.raises(StepError, match=r"hidden: mean cosine .* FAILED"):
        validate_int8(graphs["backbone"], int8[0]["backbone"], reader, min_mean_cosine=1.0, max_relative_error=0.0)
    with pytest.raises(StepError, match="inputs/outputs"):
        validate_int8(graphs["backbone"], graphs["head_0"], reader)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_other_methods_and_the_cache(graphs, reader, tmp_path, method):
    cache = tmp_path / "calib.json"
    feeds = FeedList(reader)
    ranges, hit = calibrate_ranges(graphs["backbone"], feeds, method, cache, progress=False)
    assert not hit and cache.is_file()
    again, hit = calibrate_ranges(graphs["backbone"], feeds, method, cache, progress=False)
    assert hit and set(again.data) == set(ranges.data)
    assert not calibrate_ranges(graphs["backbone"], FeedList(feeds.feeds[:1]), method, cache, progress=False)[1]
    other = "entropy" if method == "minmax" else "minmax"
    assert not calibrate_ranges(graphs["backbone"], feeds, other, tmp_path / "calib.json", progress=False)[1]
    paths = int8_from_onnx(graphs, tmp_path / "out", reader, method=method, cache_path=cache, progress=False,
                           log=None)
    assert validate_int8(graphs["backbone"], paths["backbone"], reader)["hidden"]["ok"]
    cache.write_text("{not json")
    with pytest.raises(InputError, match="delete it"):
        calibrate_ranges(graphs["backbone"], feeds, method, cache, progress=False)
    with pytest.raises(InputError, match="allowed: minmax, entropy, percentile"):
        int8_from_onnx(graphs, tmp_path / "bad", reader, method="kl", log=None)


# ---------------------------------------------------------------- the int8 graphs TensorRT builds from

def fp32_tensors_at_fp16_ops(path: Path) -> dict[str, int]:
    """op type -> how many nodes outside the float32 list (FP32_OPS) and Cast read or write a float32
    tensor (types from ONNX shape inference): none in a graph whose every other op runs in fp16."""
    from nezha.export.precision import FP32_OPS
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {i.name: i.data_type for i in graph.initializer}
    types |= {n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    found: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in FP32_OPS + ("Cast",) and any(types.get(x) == onnx.TensorProto.FLOAT
                                                           for x in [*node.input, *node.output]):
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


@pytest.fixture(scope="module")
def int8_tensorrt(graphs, int8, tmp_path_factory):
    from nezha.export.precision import int8_tensorrt_graphs
    return int8_tensorrt_graphs(int8[0], graphs, tmp_path_factory.mktemp("int8-tensorrt"))


def test_tensorrt_int8_graph_is_the_same_qdq_on_the_fp16_graph(graphs, int8, int8_tensorrt):
    """TensorRT's int8 engines run every op that is not quantized in fp16 (a strongly typed network keeps
    each op in its graph's type): the same Q/DQ pairs on the same MatMuls, float16 scales, the rest fp16."""
    from nezha.export.precision import QDQ_FP16_OPSET
    assert sorted(int8_tensorrt) == sorted(graphs)
    model = onnx.load(str(int8_tensorrt["backbone"]))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= QDQ_FP16_OPSET
    consumers, inits = _consumers(model), {i.name: i for i in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    quantized = lambda m: {u.name for dq in m.graph.node if dq.op_type == "DequantizeLinear"
                           for u in _consumers(m)[dq.output[0]]}
    assert quantized(model) == quantized(onnx.load(str(int8[0]["backbone"]))) and dqs
    for q in [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]:
        scale = inits.get(q.input[1])
        assert scale is not None and scale.data_type == onnx.TensorProto.FLOAT16, q.name
    for name, path in int8_tensorrt.items():                  # backbone and heads: nothing else in float32
        assert fp32_tensors_at_fp16_ops(path) == {}, name
        assert _io(path)[1] == _io(graphs[name])[1], name     # the runtime's float32 / int64 I/O, as every precision
    assert fp32_tensors_at_fp16_ops(int8[0]["backbone"])      # the ONNX Runtime int8 graph stays fp32-based
    assert {c.op_type for dq in dqs for c in consumers[dq.output[0]]} == {"MatMul"}


def test_tensorrt_int8_graph_passes_validation_on_cpu(graphs, reader, int8_tensorrt):
    """The graph TensorRT builds int8 engines from, run by ONNX Runtime on CPU: hidden states against the
    fp32 graph (the build's gate) and every output and the decoded items against torch (Tolerance)."""
    from conftest import tiny_model
    from nezha.export.graphs import graph_specs, model_limits
    from nezha.export.validate import ort_validation_steps, validate_artifact
    result = validate_int8(graphs["backbone"], int8_tensorrt["backbone"], reader)
    assert result["hidden"]["ok"] and result["hidden"]["mean_cosine"] > 0.99
    model = tiny_model()
    limits = model_limits(model, MAX_HISTORY, 8, 16)
    steps = {"int8": ort_validation_steps(graph_specs(model, limits), int8_tensorrt)}
    try:
        report = validate_artifact(model, tiny_catalog(), steps, tiny_histories(tiny_catalog(), 8), limits)
    finally:
        steps["int8"].close()
    assert report["ok"] and report["precisions"]["int8"]["outputs"]["backbone.hidden"]["mean_cosine"] > 0.99


RUN_BACKBONE = """
import sys, numpy as np
from nezha.runtime.backends.onnxruntime import open_session
feed = dict(np.load(sys.argv[2]))
np.save(sys.argv[3], open_session(sys.argv[1], "cpu", 1).run(["hidden"], feed)[0])
"""


@pytest.mark.skipif(__import__("shutil").which("valgrind") is None,
                    reason="valgrind is not installed (apt-get install valgrind): it runs ONNX Runtime on a virtual "
                           "CPU with AVX2 and no AVX-512 or VNNI, the path of AVX2-only machines")
def test_int8_cpu_gives_the_same_answers_on_the_avx2_only_path(graphs, tmp_path):
    """The int8-cpu graph on this CPU and on Valgrind's AVX2-only CPU (ONNX Runtime then picks its AVX2
    kernels: no VNNI) gives bit-identical hidden states that pass the build's cosine gate. Without
    reduce_range the AVX2 kernel saturates (mean cosine 0.985 measured on this model): this test fails then."""
    import subprocess
    import sys

    from nezha.calibration.validate import output_errors
    backbone = int8_cpu_from_onnx(graphs, tmp_path / "int8cpu", log=None)["backbone"]
    rng, catalog = np.random.default_rng(1), tiny_catalog()
    histories = [rng.choice(catalog.item_ids, size=int(n)).tolist() for n in rng.integers(1, MAX_HISTORY + 1, 16)]
    np.savez(tmp_path / "feed.npz", **encode_histories(histories, catalog, tiny_layout(), MAX_HISTORY))
    outputs = {}
    for path, prefix in (("native", []), ("avx2", ["valgrind", "--tool=none", "-q"])):
        subprocess.run(prefix + [sys.executable, "-c", RUN_BACKBONE, str(backbone), str(tmp_path / "feed.npz"),
                                 str(tmp_path / f"{path}.npy")], check=True, timeout=600)
        outputs[path] = np.load(tmp_path / f"{path}.npy")
    fp32 = ort.InferenceSession(str(graphs["backbone"]), providers=["CPUExecutionProvider"]).run(
        ["hidden"], dict(np.load(tmp_path / "feed.npz")))[0]
    assert np.array_equal(outputs["native"], outputs["avx2"])
    assert output_errors([fp32], [outputs["avx2"]])["mean_cosine"] >= 0.99


def test_int8_engines_come_from_the_fp16_qdq_graph(tmp_path, monkeypatch):
    """The build's engine step on CPU, ONNX Runtime standing in for TensorRT: int8 engines are built from
    the fp16-based Q/DQ graph (checked against fp32 first), which is not kept; the manifest says which
    graphs serve which backend; fp16 engines come from the fp16 graphs."""
    from conftest import tiny_model
    from nezha.export import engines, steps
    from nezha.export.build import build
    from nezha.export.validate import ort_validation_steps
    from nezha.model.checkpoint import save_checkpoint
    from nezha.runtime.artifact import Artifact
    from nezha.runtime.manifest import EngineEntry
    sources = {}

    def fake_engine(onnx_path, plan, spec, file, **options):
        sources[file] = onnx.load(str(onnx_path), load_external_data=False)
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(Path(onnx_path).read_bytes())
        return EngineEntry(file, "0.0", "0.0", True, ())
    monkeypatch.setattr(engines, "engine_from_onnx", fake_engine)
    monkeypatch.setattr(steps, "gpu_for_engines", lambda: None)
    monkeypatch.setattr(steps, "trt_validation_steps", lambda entries, es, paths: ort_validation_steps(entries, paths))
    users = {f"u{u}": list(range((u * 7) % 60, (u * 7) % 60 + 8)) for u in range(80)}
    data = write_interactions(tmp_path / "calib.inter.json", users)
    ckpt = save_checkpoint(tiny_model(), tmp_path / "ckpt", tiny_catalog())
    summary = build(ckpt, None, tmp_path / "art", precision=("fp16", "int8"), backend=("onnxruntime", "tensorrt"),
                    exporter="torchscript", max_batch=4, max_beam=8, calibration_data=data, calibration_size=16, log=None)
    manifest = Artifact.open(summary.out).manifest
    assert set(manifest.engines) == {"fp16", "int8"} and manifest.precisions["int8"].quantization["backends"]["tensorrt"]
    backbone = sources["engines/int8/backbone.plan"]
    assert {n.op_type for n in backbone.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert next(o.version for o in backbone.opset_import if o.domain in ("", "ai.onnx")) >= 19
    assert not {n.op_type for n in sources["engines/fp16/backbone.plan"].graph.node} & {"QuantizeLinear"}
    report = json.loads((summary.out / "validation.json").read_text())
    assert report["hidden_state_vs_fp32"]["int8-tensorrt-graph"]["hidden"]["ok"] and report["tensorrt"]["ok"]
    assert not (summary.out / "engines" / "onnx").exists()
