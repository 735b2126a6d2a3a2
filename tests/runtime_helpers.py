"""What the runtime tests share: the tiny artifact (fp32 and fp16, TensorRT engines where TensorRT is
installed), built once per session, the backends to run the contract on, and loading on one."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import tiny_catalog, tiny_model, write_index
from nezha.export.build import build
from nezha.model.checkpoint import save_checkpoint
from nezha.runtime import Recommender


MAX_BATCH, MAX_BEAM = 4, 16


def _tensorrt_missing_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'nezha-deploy[tensorrt]' on a CUDA machine)"
    return None


BACKENDS = [pytest.param("onnxruntime"),
            pytest.param("tensorrt", marks=[pytest.mark.tensorrt,
                                            pytest.mark.skipif(_tensorrt_missing_reason() is not None, reason=str(_tensorrt_missing_reason()))])]


def _runtime(root):
    ckpt = save_checkpoint(tiny_model(), root / "ckpt", tiny_catalog())
    backend = ("onnxruntime", "tensorrt") if _tensorrt_missing_reason() is None else ("onnxruntime",)
    build(ckpt, write_index(tiny_catalog(), root / "tiny.index.json"), root / "art", precision=("fp32", "fp16"), backend=backend, max_batch=MAX_BATCH,
          max_beam=MAX_BEAM, log=None)
    return root / "art"


@pytest.fixture(scope="module")
def artifact(built_once):
    return built_once(_runtime)


def _load(artifact, backend, **kw):
    device = "cuda" if backend == "tensorrt" else "cpu"
    return Recommender.load(artifact, backend=backend, device=device, **kw)
