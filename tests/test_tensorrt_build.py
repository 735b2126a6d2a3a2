"""TensorRT engines from the exported graphs: needs TensorRT 10+ and a CUDA GPU (skipped otherwise)."""

from __future__ import annotations

import pytest

from conftest import tiny_catalog, tiny_model
from nezha.export.engines import TensorRTUnavailable, load_tensorrt, profile_shapes
from nezha.runtime.manifest import GraphEntry

try:
    load_tensorrt()
    REASON = None
except TensorRTUnavailable as e:
    REASON = str(e)


def test_profiles_follow_the_manifest_ranges():
    graph = GraphEntry.from_json({"file": "g.onnx", "external_data": None, "outputs": [],
                                  "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                                             {"name": "state", "dtype": "float32", "shape": ["batch", 32]}],
                                  "dynamic": {"batch": [1, 8], "tokens": [6, 21]}}, "g")
    assert profile_shapes(graph) == {"input_ids": [[1, 6], [8, 21], [8, 21]], "state": [[1, 32], [8, 32], [8, 32]]}


@pytest.mark.tensorrt
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT engines need TensorRT 10+ and a GPU: {REASON}")
def test_engines_are_built_and_described(tmp_path):
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint
    from nezha.runtime import Recommender
    from nezha.runtime.artifact import Artifact

    ckpt = save_checkpoint(tiny_model("qwen3"), tmp_path / "ckpt", tiny_catalog())
    summary = build(ckpt, None, tmp_path / "art", precision=("fp32", "fp16"), backend=("onnxruntime", "tensorrt"),
                    max_batch=4, max_beam=8, log=None)
    artifact = Artifact.open(summary.out)
    assert summary.engines_skipped is None
    for precision in ("fp32", "fp16"):
        for name, entry in artifact.manifest.engines[precision].items():
            assert artifact.path(entry.file).stat().st_size > 0
            assert int(entry.tensorrt.split(".")[0]) >= 10 and entry.profiles
        with Recommender.load(summary.out, backend="tensorrt", precision=precision) as rec:
            assert rec.recommend([[100, 101]], k=3, beam=8)
