"""export/: graphs vs PyTorch for every architecture and precision (every graph has a parity test), the
manifest and its checksums, tables, the dynamo exporter and its fallback, validation that lists every
output and never passes NaN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_CODES, tiny_catalog, tiny_histories, tiny_model
from nezha.export import graphs as graphs_module
from nezha.export.build import build
from nezha.export.graphs import graph_specs, onnx_from_model, save_onnx, token_range
from nezha.export.validate import TOLERANCES, ort_validation_steps, validate_artifact
from nezha.model.checkpoint import save_checkpoint
from nezha.runtime.artifact import Artifact
from nezha.runtime.catalog import Catalog
from nezha.runtime.encoding import encode_histories
from nezha.runtime.errors import ArtifactError, StepError
from export_helpers import LIMITS


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
