"""The runtime's checks on a real artifact built from a tiny checkpoint: input policies and load options,
unknown items, the runner's feed, corrupt or mismatched artifacts, engines for another GPU, CUDA without its
provider; the runtime loads no torch and the CLI answers (TensorRT and CUDA skip with the reason)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import corrupted, tiny_catalog, tiny_histories, tiny_model
from nezha.model.reference import Reference
from nezha.runtime import Recommender
from nezha.runtime.errors import ArtifactError, InputError
from runtime_helpers import MAX_BATCH, MAX_BEAM, _tensorrt_missing_reason, artifact  # noqa: F401


@pytest.mark.parametrize("call, error, message", [
    (dict(histories=[[100, 987654]]), InputError, "not in the catalog"),
    (dict(histories=[[]]), InputError, "is empty"),
    (dict(histories=[]), InputError, "no histories"),
    (dict(histories=[[100]], k=0), InputError, "k must be an integer in 1..beam"),
    (dict(histories=[[100]], k=6, beam=5), InputError, "k must be an integer in 1..beam"),
    (dict(histories=[[100]], k=1, beam=MAX_BEAM + 1), InputError, f"1..{MAX_BEAM}"),
    (dict(histories=[[100]], k=2.5, beam=5), InputError, "k must be an integer"),
    (dict(histories=[["a", "b"]]), InputError, "item ids are integers"),
    (dict(histories=[[[100, 101], [102, 103]]]), InputError, "nested lists"),
    (dict(histories=[[100, True]]), InputError, "True"),
    (dict(histories=[{100, 101}]), InputError, "got set"),
    (dict(histories=[{100: 1}]), InputError, "got dict"),
    (dict(histories={(100,)}), InputError, "got set"),
    (dict(histories=[b"\x64\x65"]), InputError, "got bytes"),
    (dict(histories=[bytearray(b"d")]), InputError, "got bytearray"),
    (dict(histories=[memoryview(b"d")]), InputError, "got memoryview"),
    (dict(histories=[np.array([100, 101], dtype="timedelta64[s]")]), InputError, "timedelta64"),
    (dict(histories=[np.array(100)]), InputError, "1-D array"),
    (dict(histories=[np.array([100.0, 101.0])]), InputError, "float64"),
    (dict(histories=[[2 ** 70]]), InputError, "fit int64"),
    (dict(histories="100"), InputError, "got str"),
    (dict(histories=[[100]], k=None), InputError, "k must be an integer"),
    (dict(histories=[[100]], k=True), InputError, "k must be an integer"),
    (dict(histories=[[100]], k=2, beam=True), InputError, "beam must be an integer"),
    (dict(histories=[[100]], k=2, beam=4.0), InputError, "beam must be an integer"),
    (dict(histories=[np.ma.array([100, 101], mask=[0, 1])]), InputError, "masked array"),
    (dict(histories=[[100]], unknown=np.array(["skip"])), InputError, "unknown-item policy"),
])
def test_bad_requests_get_clear_errors(artifact, call, error, message):
    with Recommender.load(artifact) as rec:
        with pytest.raises(error, match=message):
            rec.recommend(**call)


@pytest.mark.parametrize("options, message", [
    (dict(threads=10 ** 6), "threads must be an integer in 1..256"), (dict(threads=0), "threads must be"),
    (dict(precision=["fp32"]), "precision \\['fp32'\\]; allowed"), (dict(precision=""), "precision ''; allowed"),
    (dict(dense_budget_bytes="x"), "dense_budget_bytes"), (dict(backend="tvm"), "backend 'tvm'; allowed"),
])
def test_bad_load_options_get_clear_errors(artifact, options, message):
    with pytest.raises(InputError, match=message):
        Recommender.load(artifact, **options)


def test_unknown_items_can_be_skipped(artifact):
    with Recommender.load(artifact) as rec:
        assert rec.recommend([[100, 987654, 101]], k=3, beam=5, unknown="skip") == rec.recommend([[100, 101]], k=3, beam=5)


def test_runner_checks_its_feed(artifact):
    with Recommender.load(artifact) as rec:
        runner = rec.steps.runners["head_1"]
        with pytest.raises(InputError, match="dtype int32, expected int64"):
            runner.run({"parent_state": np.zeros((1, 32), np.float32), "parent": np.zeros(2, np.int64),
                        "code": np.zeros(2, np.int32),
                        "hidden": np.zeros((2, 32), np.float32)})
        with pytest.raises(InputError, match="outside the built range"):
            runner.run({"parent_state": np.zeros((1, 32), np.float32),
                        "parent": np.zeros(MAX_BATCH * MAX_BEAM + 1, np.int64),
                        "code": np.zeros(MAX_BATCH * MAX_BEAM + 1, np.int64),
                        "hidden": np.zeros((MAX_BATCH * MAX_BEAM + 1, 32), np.float32)})


def test_corrupt_or_mismatched_artifacts_are_refused(artifact, tmp_path):
    bad = corrupted(artifact, tmp_path, "tables/valid_prefixes_1.npy")
    with pytest.raises(ArtifactError, match="valid_prefixes_1.npy: sha256 mismatch"):
        Recommender.load(bad)
    manifest = json.loads((artifact / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ArtifactError, match="version: 99; this runtime reads version 4"):
        Recommender.load(bad)
    with pytest.raises(ArtifactError, match="not a nezha artifact"):
        Recommender.load(tmp_path)
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        Recommender.load(artifact / "manifest.json")
    with pytest.raises(ArtifactError, match="no 'int8' graphs"):
        Recommender.load(artifact, precision="int8")
    with pytest.raises(ArtifactError, match="no TensorRT engines"):
        Recommender.load(artifact, backend="tensorrt") if _tensorrt_missing_reason() else pytest.skip("engines exist here")


def test_fewer_valid_items_than_k_gives_fewer_results():
    from nezha.runtime.catalog import Catalog
    catalog = tiny_catalog()
    small = Catalog(catalog.item_ids[:3], catalog.item_codes[:3])          # items 100 and 101 share a SID
    recs = Reference(tiny_model(), small).recommend([[100, 102]], k=8, beam=8)[0]
    assert sorted(i for i, _ in recs) == [100, 101, 102]


def test_runtime_loads_no_torch_and_the_cli_answers(artifact):
    code = (f"import sys; from nezha.runtime import Recommender; r = Recommender.load({str(artifact)!r}); "
            "r.recommend([[100, 101]], k=3, beam=5); assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "nezha.cli", "recommend", str(artifact), "--history", "100,101,102",
                          "--history", "103", "-k", "4", "--beam", "8", "--json"], check=True, capture_output=True,
                         text=True).stdout
    result = json.loads(out)
    assert [r["history"] for r in result] == [[100, 101, 102], [103]]
    assert all(len(r["items"]) == 4 and all(100 <= x["item"] < 170 for x in r["items"]) for r in result)
    for args, message in ((["--history", "5"], "not in the catalog"),
                          (["--history", "1_00"], "ASCII digits"),
                          (["--history", "\u0661\u0660\u0660"], "ASCII digits"),            # Arabic-Indic 100
                          (["--history", "100,,101"], "ASCII digits"),
                          (["--history", "100", "-k", "0"], "k must be an integer"),
                          (["--history", "100", "--device", "cuda:x"], "allowed: cpu, cuda, cuda:N")):
        bad = subprocess.run([sys.executable, "-m", "nezha.cli", "recommend", str(artifact)] + args,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
    for folder in (artifact / "manifest.json", artifact / "missing"):
        bad = subprocess.run([sys.executable, "-m", "nezha.cli", "recommend", str(folder), "--history", "100"],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "is not an artifact folder" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("versions, message", [
    (("10.9.0", "9.0"), "built with TensorRT 10.9.0, this is 10.13.0"),
    (("10.13.0", "8.6"), "built for compute capability 8.6, this GPU is 9.0"),
])
def test_engines_for_another_gpu_or_tensorrt_are_refused(monkeypatch, versions, message):
    """The engine check runs without TensorRT: the version and GPU it compares against are stubbed."""
    from types import SimpleNamespace

    from nezha.runtime.backends import tensorrt as trt_backend
    from nezha.runtime.manifest import EngineEntry
    monkeypatch.setattr(trt_backend, "load_tensorrt", lambda: SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setattr(trt_backend.C, "device", lambda device_id=0: trt_backend.C.Device("NVIDIA H100", "GPU-0", "9.0"))
    with pytest.raises(ArtifactError, match=message):
        trt_backend.check_engine(EngineEntry("engines/fp32/backbone.plan", versions[1], versions[0], True, ()))
    trt_backend.check_engine(EngineEntry("engines/fp32/backbone.plan", "9.0", "10.13.0", True, ()))


def _cuda_provider_missing() -> str | None:
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "ONNX Runtime has no CUDA execution provider here (pip install onnxruntime-gpu on a CUDA machine)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_provider_missing() is not None, reason=str(_cuda_provider_missing()))
def test_onnxruntime_cuda_matches_cpu(artifact):
    histories = tiny_histories(tiny_catalog(), 6, seed=8)
    with Recommender.load(artifact, device="cpu") as cpu, Recommender.load(artifact, device="cuda") as gpu:
        a, b = cpu.recommend(histories, k=5, beam=10), gpu.recommend(histories, k=5, beam=10)
    assert [[i for i, _ in r] for r in a] == [[i for i, _ in r] for r in b]
    np.testing.assert_allclose([s for r in a for _, s in r], [s for r in b for _, s in r], atol=1e-4)


def test_cuda_without_its_provider_is_refused_with_the_fix(artifact):
    if _cuda_provider_missing() is None:
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(RuntimeError, match="needs onnxruntime-gpu with the CUDA execution provider"):
        Recommender.load(artifact, device="cuda")
    for device in ("tpu", "cuda:x", "cpu:1", 3):
        with pytest.raises(ValueError, match="allowed: cpu, cuda, cuda:N"):
            Recommender.load(artifact, device=device)
