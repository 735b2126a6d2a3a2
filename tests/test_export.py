"""export/: graphs vs PyTorch for every architecture and precision, the manifest, tables, bad inputs."""

from __future__ import annotations

import hashlib
import json
import re
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_CODES, tiny_catalog, tiny_histories, tiny_model
from nezha.export import graphs as graphs_module
from nezha.export.build import build, main
from nezha.export.graphs import graph_specs, onnx_from_model, save_onnx, token_range
from nezha.export.validate import TOLERANCES, ort_validation_steps, validate_artifact
from nezha.model.checkpoint import save_checkpoint
from nezha.runtime.artifact import Artifact
from nezha.runtime.catalog import Catalog
from nezha.runtime.encoding import encode_histories
from nezha.runtime.manifest import Limits
from nezha.runtime.errors import ArtifactError, InputError, StepError

LIMITS = Limits(max_history=6, max_batch=8, max_beam=16, hidden_size=32)
PRECISIONS = ["fp32", "fp16"]
LEVELS = list(range(len(TINY_CODES)))
# Graphs with a parity test below; test_every_graph_has_a_parity_test keeps this honest.
PARITY_TESTED = {"backbone"} | {f"head_{level}" for level in LEVELS}


def _build(root: Path, architecture: str, **kw):
    ckpt = save_checkpoint(tiny_model(architecture), root / f"ckpt-{architecture}", tiny_catalog(), overwrite=True)
    kw = {"precision": PRECISIONS, "max_batch": LIMITS.max_batch, "max_history": LIMITS.max_history,
          "max_beam": LIMITS.max_beam, "log": None, **kw}
    return build(ckpt, None, root / f"art-{architecture}", **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(architecture) -> (Artifact, torch model, Summary); one build per architecture."""
    cache = {}

    def get(architecture: str):
        if architecture not in cache:
            # qwen3 also asks for TensorRT: absent here, so the build must record the skip and still succeed
            backend = ("onnxruntime", "tensorrt") if architecture == "qwen3" else ("onnxruntime",)
            summary = _build(tmp_path_factory.mktemp(architecture), architecture, backend=backend)
            cache[architecture] = Artifact.open(summary.out), tiny_model(architecture), summary
        return cache[architecture]
    return get


def _session(artifact: Artifact, precision: str, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(artifact.path(artifact.manifest.graph(precision, name).file)),
                                providers=["CPUExecutionProvider"])


def _validate(model, paths: dict, histories, limits=LIMITS):
    """validate_artifact over the runtime's ONNX Runtime runners of {precision: {graph: path}}."""
    specs = graph_specs(model, limits)
    return validate_artifact(model, tiny_catalog(), {p: ort_validation_steps(specs, g) for p, g in paths.items()},
                             histories, limits)


def _feeds(model):
    """B=1, B=5 left padded (T unlike the export example's), B=8 padded to the largest T."""
    catalog, L = tiny_catalog(), model.layout.levels
    encode = lambda h, pad=None: encode_histories(h, catalog, model.layout, LIMITS.max_history, pad_to=pad)
    rng = np.random.default_rng(7)
    many = [rng.choice(catalog.item_ids, size=n).tolist() for n in (1, 4, 2, 1, 3, 9, 5, 2)]
    # T = 6 (one item), 15 (four items), 21 (the largest); the export example used T = 9
    return [encode(many[:1]), encode(many[:5]), encode(many, token_range(L, LIMITS.max_history)[1])]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_backbone_parity(built, architecture, precision):
    artifact, model, _ = built(architecture)
    session = _session(artifact, precision, "backbone")
    shapes = set()
    for feed in _feeds(model):
        assert (feed["attention_mask"][:, 0] == 0).any() or len(feed["input_ids"]) == 1
        with torch.no_grad():
            want = model.nezha_hidden(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
        got = session.run(None, feed)[0]
        assert got.dtype == np.float32 and got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() <= TOLERANCES[precision].atol
        shapes.add(feed["input_ids"].shape)
    assert {b for b, _ in shapes} == {1, 5, 8} and len({t for _, t in shapes}) == 3


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_head_parity(built, architecture, precision, level):
    artifact, model, _ = built(architecture)
    session = _session(artifact, precision, f"head_{level}")
    rng = np.random.default_rng(level)
    for n, P in ((1, 1), (37, 5)):
        parents, hidden = rng.standard_normal((P, 32)).astype(np.float32), rng.standard_normal((n, 32)).astype(np.float32)
        parent = rng.integers(0, P, n) if level else None
        code = rng.integers(0, TINY_CODES[level - 1], n) if level else None
        feed = {"hidden": hidden} | ({"parent_state": parents, "parent": parent, "code": code} if level else {"root": hidden})
        with torch.no_grad():
            t = lambda a: None if a is None else torch.from_numpy(a)
            state, log_probs = model.mtp_head.parent_step(level, t(parents if level else hidden), t(parent), t(code),
                                                         t(hidden))
        want = [log_probs] + ([] if state is None else [state])
        got = session.run(None, feed)
        assert [o.name for o in session.get_outputs()] == ["log_probs"] + (["state"] if level == 1 else [])
        assert got[0].shape == (n, TINY_CODES[level])
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32 and np.abs(g - w.numpy()).max() <= TOLERANCES[precision].atol


def test_every_graph_has_a_parity_test(built):
    """The graphs the build exports (read from a built artifact) against the graphs the parity tests are
    parametrized over (read from their marks): a new graph without a parity test fails here."""
    artifact, _, _ = built("qwen3")
    levels = next(m.args[1] for m in test_head_parity.pytestmark if m.args[0] == "level")
    precisions = {p for m in test_head_parity.pytestmark + test_backbone_parity.pytestmark
                  if m.args[0] == "precision" for p in m.args[1]}
    covered = {"backbone"} | {f"head_{level}" for level in levels}
    for precision, graphs in artifact.manifest.graphs.items():
        assert precision in precisions, f"precision {precision} has no parity test"
        assert not set(graphs) - covered, f"graphs without a parity test: {set(graphs) - covered}"


def test_manifest_contract_and_checksums(built):
    artifact, model, summary = built("qwen3")
    manifest, root = artifact.manifest, artifact.root
    assert manifest.limits == LIMITS
    assert manifest.layout == model.layout and manifest.source["architecture"] == "qwen3"
    head = manifest.graph("fp16", "head_1")
    assert [t.name for t in head.inputs] == ["parent_state", "parent", "code", "hidden"]
    assert head.outputs[0].to_json() == {"name": "log_probs", "dtype": "float32", "shape": ["beams", TINY_CODES[1]]}
    assert [t.name for t in manifest.graph("fp32", "head_0").inputs] == ["root", "hidden"]
    assert [t.name for t in manifest.graph("fp32", "head_2").outputs] == ["log_probs"]     # the last level: no state
    assert [t.name for t in manifest.graph("fp32", "head_0").outputs] == ["log_probs"]     # level 1's parents: the roots
    assert head.dynamic == {"beams": (1, 8 * 16), "parents": (1, 8 * 16)} and head.external_data is None
    assert manifest.graph("fp32", "backbone").dynamic == {"batch": (1, 8), "tokens": (6, 21)}
    assert {p: e.execution for p, e in manifest.precisions.items()} == {"fp32": "any", "fp16": "any"}
    assert manifest.machine["arch"] and isinstance(manifest.machine["isa"], list)
    # the exported graph itself carries the manifest's dim names
    proto = onnx.load(str(artifact.path(head.file)))
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["beams", 6]
    # no exporter stack traces (they hold this checkout's paths): a graph depends only on the model
    assert not [n.name for n in proto.graph.node if n.metadata_props]
    assert manifest.engines == {} and "TensorRT" in summary.engines_skipped
    assert manifest.versions["tensorrt"] is None and manifest.versions["onnx"] == onnx.__version__
    report = json.loads(artifact.path(manifest.validation).read_text())
    assert report["ok"] and report["precisions"]["fp32"]["topk_agreement"] == 1.0
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest.files) == on_disk

    tampered = artifact.path(manifest.graph("fp32", "head_0").file)
    original = tampered.read_bytes()
    try:
        tampered.write_bytes(original + b"\0")
        with pytest.raises(ArtifactError, match="head_0.onnx: sha256 mismatch"):
            Artifact.open(root)
    finally:
        tampered.write_bytes(original)
    Artifact.open(root)


def test_tables_rebuild_the_catalog(built):
    artifact, model, _ = built("qwen3")
    manifest, t = artifact.manifest, artifact.table
    # no --index: the catalog is the checkpoint's ava_sid file, whose item ids are positions
    assert t("item_ids").dtype == np.int64 and np.array_equal(t("item_ids"), np.arange(70))
    assert np.array_equal(t("item_codes"), tiny_catalog().item_codes)
    catalog = Catalog(t("item_ids"), t("item_codes"))
    keys, offsets, items = t("sid_keys"), t("sid_offsets"), t("sid_items")
    assert keys.dtype == np.uint64 and np.all(np.diff(keys.astype(np.float64)) > 0)
    assert offsets[0] == 0 and offsets[-1] == len(items) == len(catalog.item_ids)
    for s in range(len(keys)):            # every item of a SID row has that SID
        assert np.all(model.layout.sid_keys(catalog.codes_of(items[offsets[s]:offsets[s + 1]])[0]) == keys[s])
    assert len(keys) < len(items)         # the tiny catalog has a collision: items 0 and 1
    for level in LEVELS:
        want = np.unique(model.layout.prefix_keys(catalog.item_codes, level))
        assert np.array_equal(t(f"valid_prefixes_{level}"), want)
        entry = manifest.tables[f"valid_prefixes_{level}"]
        assert entry.dtype == "uint64" and entry.shape == (len(want),)


def test_every_graph_exports_with_dynamo_without_falling_back(tmp_path):
    """The fallback must stay a fallback: a graph the dynamo exporter cannot take (e.g. a varargs
    forward that its dynamic_shapes cannot name) would otherwise ship through the legacy exporter unseen."""
    messages = []
    paths = onnx_from_model(tiny_model("qwen3"), tmp_path, LIMITS, log=messages.append)
    assert set(paths) == {"backbone", "head_0", "head_1", "head_2"} and messages == []


def test_dynamo_failure_falls_back_to_torchscript(tmp_path, monkeypatch):
    model, real = tiny_model("llama"), graphs_module._export
    messages = []

    def dynamo_breaks(module, args, spec, path, opset, exporter):
        if exporter == "dynamo":
            raise RuntimeError("simulated dynamo failure")
        real(module, args, spec, path, opset, exporter)
    monkeypatch.setattr(graphs_module, "_export", dynamo_breaks)
    paths = onnx_from_model(model, tmp_path, LIMITS, log=messages.append)
    assert len(messages) == len(paths) == 4 and "falling back to dynamo=False" in messages[0]
    catalog = tiny_catalog()
    report = _validate(model, {"fp32": paths}, tiny_histories(catalog, 5))
    assert report["ok"] and max(o["max_abs_diff"] for o in report["precisions"]["fp32"]["outputs"].values()) < 1e-4


def test_validation_lists_every_output_in_one_error(built):
    artifact, _, _ = built("qwen2")
    other = tiny_model("qwen2", seed=1)             # same shapes, other weights: everything must disagree
    graphs = {"fp32": {n: artifact.path(g.file) for n, g in artifact.manifest.graphs["fp32"].items()}}
    catalog = tiny_catalog()
    with pytest.raises(StepError) as e:
        _validate(other, graphs, tiny_histories(catalog, 5))
    text = str(e.value)
    for key in ["backbone.hidden", "head_0.log_probs", "head_1.state", "head_2.log_probs", "top-10 items"]:
        assert key in text
    assert "FAIL fp32 backbone.hidden" in text and "0.001 x RMS" in text
    assert not e.value.report["ok"]


def test_external_data_graph_runs(tmp_path):
    paths = onnx_from_model(tiny_model("qwen3"), tmp_path / "g", LIMITS, exporter="torchscript")
    proto = onnx.load(str(paths["head_1"]))
    save_onnx(proto, tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").stat().st_size > 1000
    feed = {"parent_state": np.ones((1, 32), np.float32), "parent": np.array([0, 0]), "code": np.array([0, 1]),
            "hidden": np.zeros((2, 32), np.float32)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(run(tmp_path / "big.onnx"), run(paths["head_1"])):
        assert np.array_equal(a, b)


# ---- bad inputs: clear errors, nothing left behind ----

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".building-" in p.name or ".old-" in p.name)


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tiny_model("qwen3"), tmp_path / "ckpt", tiny_catalog())


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        build(tmp_path / "nope", None, tmp_path / "art", log=None)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_wrong_index(tmp_path, checkpoint):
    index = tmp_path / "two_levels.index.json"
    index.write_text(json.dumps({"1": ["<a_1>", "<b_2>"], "2": ["<a_3>", "<b_4>"]}))
    with pytest.raises(ArtifactError, match="2-level SIDs, the model has 3 levels"):
        build(checkpoint, index, tmp_path / "art", log=None)
    with pytest.raises(ArtifactError, match="does not exist"):
        build(checkpoint, tmp_path / "missing.index.json", tmp_path / "art", log=None)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_unsupported_precision(tmp_path, checkpoint, capsys):
    with pytest.raises(InputError, match="unsupported precision.*'bf16'.*allowed: fp32, fp16, int8"):
        build(checkpoint, None, tmp_path / "art", precision=("bf16",), log=None)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "art"), "--precision", "bf16"])
    assert "invalid choice: 'bf16'" in capsys.readouterr().err
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


BAD_OPTIONS = [  # every check of BuildOptions (export/options.py), through build(): one error, nothing written
    (dict(backend=("x",)), InputError, r"unsupported backend\(s\) \['x'\]; allowed: onnxruntime, tensorrt"),
    (dict(backend=()), InputError, r"unsupported backend\(s\) \(none\); allowed"),
    (dict(precision=()), InputError, r"unsupported precision\(s\) \(none\); allowed"),
    (dict(exporter="x"), InputError, "exporter 'x'; allowed: dynamo, torchscript"),
    (dict(max_batch=0), InputError, "max_batch must be a positive integer, got 0"),
    (dict(max_history=-1), InputError, "max_history must be a positive integer, got -1"),
    (dict(max_beam=2.0), InputError, "max_beam must be a positive integer, got 2.0"),
    (dict(validation_users=True), InputError, "validation_users must be a positive integer, got True"),
    (dict(opset="18"), InputError, r"opset must be an integer in 18\.\.\d+ .*got '18'"),
    (dict(precision=("int8",), calibration_size=3), "calibration", "calibration size 3 is too small: need at least 16"),
    (dict(precision=("int8",), calibration_method="kl"), "calibration", "calibration method 'kl'; allowed: minmax"),
    (dict(precision=("int8",), calibration_exclude=-1), "calibration", "calibration exclude must be a non-negative"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS, ids=[next(iter(o)) + str(i) for i, (o, _, _) in
                                                                    enumerate(BAD_OPTIONS)])
def test_each_bad_option_is_one_clear_error(tmp_path, options, error, message):
    (tmp_path / "ckpt").mkdir()                       # the values are checked before any input is read
    with pytest.raises(InputError if error == "calibration" else error, match=message):
        build(tmp_path / "ckpt", None, tmp_path / "art", log=None, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_options_are_resolved_once_and_int8_settings_checked_only_for_int8(tmp_path, capsys):
    from nezha.export.options import BuildOptions, check
    (tmp_path / "ckpt").mkdir()
    o = check(BuildOptions(tmp_path / "ckpt", None, "art", precision=["fp16", "fp32", "fp16"], backend=["onnxruntime"],
                           calibration_method="kl", calibration_size=0))
    assert (o.precision, o.backend, o.out) == (["fp32", "fp16"], ("onnxruntime",), Path("art").absolute())
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "art"), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "error: max_batch must be a positive integer, got 0\n"


def test_unwritable_output(tmp_path, checkpoint):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write the artifact beside"):
        build(checkpoint, None, blocker / "art", log=None)
    if os.geteuid() != 0:                 # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="cannot write the artifact beside"):
            build(checkpoint, None, locked / "art", log=None)
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path, checkpoint, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("old")                                  # an old artifact: its manifest lists it
    (out / "manifest.json").write_text(json.dumps({"format": "nezha-artifact", "version": 1, "files": {
        "keep.txt": hashlib.sha256(b"old").hexdigest()}}))
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "old"
    summary = build(checkpoint, None, out, precision=("fp32",), exporter="torchscript", max_batch=4, max_beam=8,
                    force=True, log=None)
    assert not (out / "keep.txt").exists() and list(Artifact.open(out).manifest.precisions) == ["fp32"]
    assert summary.topk_agreement["fp32"] == 1.0 and _leftovers(tmp_path) == []


def test_failed_validation_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    from nezha.export import validate
    monkeypatch.setitem(validate.TOLERANCES, "fp32", validate.Tolerance(0.0, 1.0))
    with pytest.raises(StepError, match="FAIL fp32 backbone.hidden"):
        build(checkpoint, None, tmp_path / "art", precision=("fp32",), exporter="torchscript", log=None)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ["--checkpoint", "--index", "--out", "--precision", "--backend", "--max-batch", "--max-history",
                   "--max-beam", "--opset", "--exporter", "--histories", "--validation-users", "--force"]:
        assert option in text


def test_progress_output(tmp_path, checkpoint):
    lines = []
    build(checkpoint, None, tmp_path / "art", precision=("fp32",), exporter="torchscript", max_batch=4,
          max_beam=8, log=lambda *a, **k: lines.append("".join(map(str, a))))
    steps = [line for line in lines if line.startswith("[")]
    assert steps[0] == "[1/6] model_from_checkpoint ..." and steps[-1] == "[6/6] load_with_runtime ..."
    assert all(line.endswith(" s") or line.startswith("    ") for line in lines if not line.startswith("["))
    assert any("no --index: item ids are positions 0..69 in ava_sid3.pt" in line for line in lines)


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


def test_nan_outputs_never_pass_validation(built, monkeypatch):
    from nezha.export import validate
    artifact, model, _ = built("qwen2")
    graphs = {"fp32": {n: artifact.path(g.file) for n, g in artifact.manifest.graphs["fp32"].items()}}
    real_run = validate.run_graph

    def nan_head(steps, name, feed):
        out = real_run(steps, name, feed)
        return [np.full_like(o, np.nan) for o in out] if name == "head_1" else out
    monkeypatch.setattr(validate, "run_graph", nan_head)
    with pytest.raises(StepError) as e:
        _validate(model, graphs, tiny_histories(tiny_catalog(), 5))
    assert "FAIL fp32 head_1.log_probs: max |diff| inf" in str(e.value)


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
