"""TensorRT engines from the exported graphs: needs TensorRT 10+ and a CUDA GPU (skipped otherwise)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_catalog, tiny_model
from nezha.export.tensorrt import TensorRTUnavailable, load_tensorrt, profile_shapes

try:
    load_tensorrt()
    REASON = None
except TensorRTUnavailable as e:
    REASON = str(e)


def test_profiles_follow_the_manifest_ranges():
    graph = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                        {"name": "state", "dtype": "float32", "shape": ["batch", 32]}],
             "dynamic": {"batch": [1, 8], "tokens": [6, 21]}}
    assert profile_shapes(graph) == {"input_ids": [[1, 6], [8, 21], [8, 21]], "state": [[1, 32], [8, 32], [8, 32]]}


@pytest.mark.tensorrt
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT engines need TensorRT 10+ and a GPU: {REASON}")
def test_engines_are_built_and_described(tmp_path):
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint
    from nezha.runtime.manifest import Manifest

    ckpt = save_checkpoint(tiny_model("qwen3"), tmp_path / "ckpt", tiny_catalog())
    summary = build(ckpt, None, tmp_path / "art", precision=("fp32", "fp16"), backend=("onnxruntime", "tensorrt"),
                    max_batch=4, max_beam=8, log=None)
    manifest = Manifest.load(summary.out)
    assert summary.engines_skipped is None
    for precision in ("fp32", "fp16"):
        for name in manifest.raw["graphs"][precision]:
            entry = manifest.raw["engines"][precision][name]
            sidecar = json.loads(manifest.path(entry["sidecar"]).read_text())
            assert manifest.path(entry["file"]).stat().st_size > 0
            assert int(sidecar["tensorrt"].split(".")[0]) >= 10 and sidecar["profiles"]
