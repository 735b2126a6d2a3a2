"""TensorRT, everything that can be checked without a GPU: profiles, the engine-vs-manifest comparison on
recorded engine descriptions, the compatibility record and its checks, every TensorRT return value, the
timing cache, and each missing piece (TensorRT, Polygraphy, libcudart, a GPU) as one clear message.
The end-to-end engine build needs TensorRT 10.8+ and a GPU and skips with the reason."""

from __future__ import annotations

import re
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_model
from nezha.export.engines import gpu_for_engines, profile_shapes, set_timing_cache, typical_dims
from nezha.runtime.backends import cuda as C
from nezha.runtime.backends import tensorrt as T
from nezha.runtime.errors import ArtifactError, Unavailable
from nezha.runtime.manifest import EngineEntry, GraphEntry, Limits

try:
    gpu_for_engines()
    REASON = None
except Unavailable as e:
    REASON = str(e)

HEAD = GraphEntry.from_json({
    "file": "g.onnx", "external_data": None,
    "inputs": [{"name": "parent_state", "dtype": "float32", "shape": ["parents", 32]},
               {"name": "parent", "dtype": "int64", "shape": ["beams"]},
               {"name": "hidden", "dtype": "float32", "shape": ["beams", 32]}],
    "outputs": [{"name": "log_probs", "dtype": "float32", "shape": ["beams", 6]}],
    "dynamic": {"beams": [1, 128], "parents": [1, 128]}}, "g")
TYPICAL = {"batch": 1, "tokens": 21, "beams": 20, "parents": 20}
SHAPES = profile_shapes(HEAD, TYPICAL)
ENTRY = EngineEntry("engines/fp16/head_1.plan", "9.0", "10.13.0", True,
                    ({n: {"min": lo, "opt": opt, "max": hi} for n, (lo, opt, hi) in SHAPES.items()},))


def test_profiles_span_the_manifest_ranges_with_opt_at_a_typical_request():
    assert SHAPES == {"parent_state": [[1, 32], [20, 32], [128, 32]], "parent": [[1], [20], [128]],
                      "hidden": [[1, 32], [20, 32], [128, 32]]}
    assert profile_shapes(HEAD)["hidden"] == [[1, 32], [128, 32], [128, 32]]     # no typical request: opt = max
    assert profile_shapes(HEAD, {"beams": 1000})["parent"][1] == [128]           # clamped into the range
    limits = Limits(max_history=20, max_batch=64, max_beam=512, hidden_size=32)
    assert typical_dims(4, limits, [3, 5, 7, 40]) == {"batch": 1, "tokens": (6 + 1) * 4, "beams": 20, "parents": 20}
    assert typical_dims(4, limits)["tokens"] == (10 + 1) * 4                      # no histories: half of max_history
    assert typical_dims(3, Limits(20, 8, 8, 32), [30])["beams"] == 8 and typical_dims(3, Limits(5, 8, 8, 32), [30])["tokens"] == 18


# ---------------------------------------------------------------- engine tensors vs the manifest

def described(**change) -> tuple[int, list[T.EngineTensor]]:
    """The description a faithful engine of HEAD/ENTRY gives, with ``change`` applied to tensor fields."""
    tensors = [T.EngineTensor(t.name, "input", t.dtype, tuple(-1 if isinstance(d, str) else d for d in t.shape),
                              tuple(tuple(s) for s in SHAPES[t.name])) for t in HEAD.inputs]
    tensors += [T.EngineTensor("log_probs", "output", "float32", (-1, 6))]
    for name, fields in change.items():
        tensors = [T.EngineTensor(**{**t.__dict__, **fields}) if t.name == name else t for t in tensors]
    return 1, tensors


@pytest.mark.parametrize("engine, message", [
    (described(), None),
    ((1, described()[1][:-1]), r"tensor 'log_probs' \(output\) is missing"),
    ((1, described()[1] + [T.EngineTensor("state", "output", "float32", (-1, 32))]), r"tensor 'state' \(output\) is not in"),
    (described(parent={"dtype": "int32"}), "tensor 'parent' is input int32, the manifest says input int64"),
    (described(hidden={"mode": "output"}), "tensor 'hidden' is output float32, the manifest says input"),
    (described(log_probs={"shape": (-1, 7)}), r"tensor 'log_probs' has dims \[-1, 7\], the manifest says \['beams', 6\]"),
    (described(hidden={"shape": (-1, -1, 32)}), "tensor 'hidden' has dims"),
    (described(parent={"profile": ((1,), (20,), (64,))}), r"tensor 'parent' accepts shapes .* range is \[1\] .. \[128\]"),
    (described(parent={"profile": ((2,), (20,), (128,))}), "tensor 'parent' accepts shapes"),
    (described(parent={"profile": ((1,), (64,), (128,))}), r"tensor 'parent' has profile \[\[1\], \[64\], \[128\]\], the manifest records"),
    ((2, described()[1]), "2 optimization profiles"),
])
def test_engine_tensors_are_compared_with_the_manifest(engine, message):
    problems = T.engine_io_problems(*engine, HEAD, ENTRY)
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_describe_engine_reads_every_io_tensor():
    """describe_engine over a stand-in for ICudaEngine: the calls and enums of TensorRT 10's Python API."""
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="IN", OUTPUT="OUT"), nptype=lambda t: t)
    io = {"hidden": ("IN", np.float32, (-1, 32)), "log_probs": ("OUT", np.float32, (-1, 6))}
    engine = SimpleNamespace(num_io_tensors=2, num_optimization_profiles=1, get_tensor_name=lambda i: list(io)[i],
                             get_tensor_mode=lambda n: io[n][0], get_tensor_dtype=lambda n: io[n][1],
                             get_tensor_shape=lambda n: io[n][2], get_tensor_profile_shape=lambda n, p: [(1, 32), (20, 32), (128, 32)])
    assert T.describe_engine(engine, trt) == (1, [T.EngineTensor("hidden", "input", "float32", (-1, 32), ((1, 32), (20, 32), (128, 32))),
                                                  T.EngineTensor("log_probs", "output", "float32", (-1, 6))])
    with pytest.raises(ArtifactError, match=r"engines/fp16/head_1.plan does not match the manifest: tensor 'parent_state'"):
        T.check_engine_io(engine, trt, HEAD, ENTRY)


# ---------------------------------------------------------------- compatibility

H100, H200 = C.Device("NVIDIA H100 80GB HBM3", "GPU-1", "9.0"), C.Device("NVIDIA H200", "GPU-2", "9.0")


@pytest.mark.parametrize("built, version, here, message", [
    (T.Compatibility("10.13.0", H100), "10.13.0", H100, None),
    (T.Compatibility("10.13.0", H100), "10.13.0", C.Device(H100.name, "GPU-other", "9.0"), None),  # same model
    (T.Compatibility("10.13.0", H100), "10.13.1", H100, "built with TensorRT 10.13.0, this is 10.13.1"),
    (T.Compatibility("10.13.0", H100), "10.13.0", H200, "built on a NVIDIA H100 80GB HBM3, this GPU is a NVIDIA H200"),
    (T.Compatibility("10.13.0", H100, "same_compute_capability"), "10.13.0", H200, None),
    (T.Compatibility("10.13.0", H100, "same_compute_capability"), "10.13.0", C.Device("NVIDIA A100", "G", "8.0"),
     "built for compute capability 9.0, this GPU is 8.0"),
    (T.Compatibility("10.13.0", H100, "ampere_plus"), "10.13.0", C.Device("NVIDIA A100", "G", "8.0"), None),
    (T.Compatibility("10.13.0", H100, "ampere_plus"), "10.13.0", C.Device("Tesla T4", "G", "7.5"), "Ampere or newer"),
    (T.Compatibility("10.13.0", H100, "turing_plus"), "10.13.0", H100, "unknown hardware-compatibility level"),
])
def test_compatibility_record_is_enforced(built, version, here, message):
    problems = T.check_compatibility(built, version, here)
    assert problems == [] if message is None else (len(problems) == 1 and message in problems[0]), problems


def test_check_engine_refuses_with_the_rebuild_hint(monkeypatch):
    monkeypatch.setattr(T, "load_tensorrt", lambda: SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setattr(C, "device", lambda device_id=0: C.Device("NVIDIA L4", "GPU-9", "8.9"))
    with pytest.raises(ArtifactError, match="built for compute capability 9.0, this GPU is 8.9: rebuild"):
        T.check_engine(ENTRY)


# ---------------------------------------------------------------- return values and the timing cache

def FakeContext(fail=None, output_shape=None):
    """An IExecutionContext stand-in whose calls fail where ``fail`` says."""
    return SimpleNamespace(set_tensor_address=lambda name, ptr: fail != ("address", name),
                           set_input_shape=lambda name, shape: fail != ("shape", name),
                           get_tensor_shape=lambda name: output_shape or (0,),
                           execute_async_v3=lambda stream: fail != "execute")


@pytest.fixture
def fake_polygraphy(monkeypatch):
    cuda = ModuleType("polygraphy.cuda")
    cuda.Stream = lambda: SimpleNamespace(ptr=1, free=lambda: None, synchronize=lambda: None)
    package = ModuleType("polygraphy")
    package.cuda = cuda
    monkeypatch.setitem(sys.modules, "polygraphy", package)
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", cuda)


def runner(context):
    device = SimpleNamespace(ptr=8, resize=lambda shape: None, copy_from=lambda a, s: None, copy_to=lambda a, s: None)
    buffers = SimpleNamespace(get=lambda graph, t: (device, np.zeros(128 * 32, t.dtype)))
    return T.TrtRunner("head_1", HEAD, SimpleNamespace(create_execution_context=lambda: context), buffers)


@pytest.mark.parametrize("fail, output_shape, message", [
    (("address", "hidden"), None, "refused the address of tensor 'hidden'"),
    (("shape", "parent"), (3, 6), r"refused shape \[3\] for input 'parent'"),
    (None, (3, 7), r"output 'log_probs' has shape \[3, 7\] for these inputs, the manifest says \[3, 6\]"),
    ("execute", (3, 6), "TensorRT failed to run graph head_1"),
])
def test_every_tensorrt_return_value_is_checked(fake_polygraphy, fail, output_shape, message):
    feed = {"parent_state": np.zeros((2, 32), np.float32), "parent": np.zeros(3, np.int64),
            "hidden": np.zeros((3, 32), np.float32)}
    with pytest.raises((ArtifactError, RuntimeError), match=message):
        runner(FakeContext(fail, output_shape)).run(feed)
    assert runner(FakeContext(None, (3, 6))).run(feed)["log_probs"].shape == (3, 6)


def test_timing_cache_is_reused_or_replaced_with_a_note(tmp_path):
    (tmp_path / "t.cache").write_bytes(b"old timings")
    made = []
    config = SimpleNamespace(create_timing_cache=lambda data: made.append(data) or data,
                             set_timing_cache=lambda cache, ignore_mismatch: cache in (b"old timings", b""))
    assert set_timing_cache(None, config, tmp_path / "t.cache") == (b"old timings", None)
    (tmp_path / "t.cache").write_bytes(b"from another GPU")
    cache, note = set_timing_cache(None, config, tmp_path / "t.cache")
    assert made[-1] == b"" and "was refused by TensorRT" in note


# ---------------------------------------------------------------- each missing piece: one clear message

def fake_module(monkeypatch, name: str, **attrs) -> ModuleType:
    module = ModuleType(name)
    module.__spec__ = ModuleSpec(name, None)                # libraries that probe with importlib.util.find_spec
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def fake_gpu_stack(monkeypatch, tmp_path):
    """TensorRT 10.13 and Polygraphy importable, a libcudart in a pip wheel, a driver that sees ``gpus`` GPUs:
    each test then takes one piece away."""
    fake_module(monkeypatch, "tensorrt", __version__="10.13.0")
    lib = tmp_path / "site" / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.12").write_bytes(b"")
    monkeypatch.setattr(C, "wheel_roots", lambda: [str(tmp_path / "site")])
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    monkeypatch.setattr(C, "POLYGRAPHY_DIRS", ())              # this host's /usr/local/cuda plays no part
    state = SimpleNamespace(gpus=1, lib=lib)

    def count(n):
        n._obj.value = state.gpus
        return 0 if state.gpus else 100                                  # cudaErrorNoDevice
    def properties(buffer, device_id):
        C.ctypes.memmove(buffer, b"NVIDIA Fake GPU\0".ljust(C.NAME_BYTES, b"\0") + bytes(range(16)), C.NAME_BYTES + 16)
        return 0

    def attribute(value, attr, device_id):
        value._obj.value = {C.CC_MAJOR: 9, C.CC_MINOR: 0}[attr]
        return 0
    handle = SimpleNamespace(cudaGetDeviceCount=count, cudaGetDeviceProperties_v2=properties,
                             cudaDeviceGetAttribute=attribute)
    cuda = fake_module(monkeypatch, "polygraphy.cuda", wrapper=lambda: SimpleNamespace(handle=handle))
    fake_module(monkeypatch, "polygraphy", cuda=cuda)
    return state


def test_the_fake_stack_is_complete(fake_gpu_stack):
    import os
    assert T.load_tensorrt().__version__ == "10.13.0"
    assert C.device(0) == C.Device("NVIDIA Fake GPU", "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f", "9.0")
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(fake_gpu_stack.lib)   # Polygraphy will find it


@pytest.mark.parametrize("take_away, message", [
    ("tensorrt", "TensorRT is not installed"),
    ("old tensorrt", "TensorRT 8.6.1 found; nezha-deploy needs 10.8+"),
    ("polygraphy", "Polygraphy is not installed"),
    ("libcudart", r"the CUDA runtime library \(libcudart.so\) was not found in LD_LIBRARY_PATH, .*pip's nvidia/\*/lib"),
    ("unloadable libcudart", "the CUDA runtime library could not be loaded"),
    ("gpu", r"no CUDA GPU 0 here \(the CUDA runtime sees 0\)"),
])
def test_each_missing_piece_is_one_message_everywhere(fake_gpu_stack, monkeypatch, take_away, message):
    """The same Unavailable at load (Engines), as Unavailable at build (gpu_for_engines,
    which the engine step turns into 'engines skipped'), never an ImportError, OSError or traceback."""
    if take_away == "tensorrt":
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    elif take_away == "old tensorrt":
        sys.modules["tensorrt"].__version__ = "8.6.1"
    elif take_away == "polygraphy":
        monkeypatch.setitem(sys.modules, "polygraphy", None)
    elif take_away == "libcudart":
        (fake_gpu_stack.lib / "libcudart.so.12").unlink()
        monkeypatch.setattr(C.ctypes.util, "find_library", lambda name: None)
    elif take_away == "unloadable libcudart":
        sys.modules["polygraphy.cuda"].wrapper = lambda: (_ for _ in ()).throw(OSError("libcudart.so.12: bad ELF"))
    else:
        fake_gpu_stack.gpus = 0
    with pytest.raises(Unavailable, match=message):
        T.Engines({}, {})
    with pytest.raises(Unavailable, match=message):
        gpu_for_engines()


def test_a_build_without_polygraphy_skips_engines_with_the_reason(tmp_path, fake_gpu_stack, monkeypatch):
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    ckpt = save_checkpoint(tiny_model("qwen3"), tmp_path / "ckpt", tiny_catalog())
    summary = build(ckpt, None, tmp_path / "art", precision=("fp32",), backend=("onnxruntime", "tensorrt"),
                    exporter="torchscript", max_batch=4, max_beam=8, log=None)
    assert "Polygraphy is not installed" in summary.engines_skipped and summary.engines == {}


# ---------------------------------------------------------------- on a GPU

@pytest.mark.tensorrt
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT engines need TensorRT 10.8+, Polygraphy and a GPU: {REASON}")
def test_engines_are_built_checked_and_run(tmp_path):
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint
    from nezha.runtime import Recommender
    from nezha.runtime.artifact import Artifact

    ckpt = save_checkpoint(tiny_model("qwen3"), tmp_path / "ckpt", tiny_catalog())
    summary = build(ckpt, None, tmp_path / "art", precision=("fp32", "fp16"), backend=("onnxruntime", "tensorrt"),
                    max_batch=4, max_beam=8, log=None)
    artifact = Artifact.open(summary.out)
    assert summary.engines_skipped is None and artifact.manifest.files["engines/timing.cache"]
    for precision in ("fp32", "fp16"):
        for name, entry in artifact.manifest.engines[precision].items():
            assert artifact.path(entry.file).stat().st_size > 0
            assert T.version_tuple(entry.tensorrt) >= (10, 8) and entry.profiles[0]
        with Recommender.load(summary.out, backend="tensorrt", precision=precision) as rec:
            assert rec.recommend([[100, 101]], k=3, beam=8)


def test_gpu_check_says_why_tensorrt_is_not_timed(fake_gpu_stack, monkeypatch):
    from nezha.bench.gpu_check import runtime_available
    assert "tensorrt" in runtime_available("cuda")[0]
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    backends, why_not = runtime_available("cuda")
    assert "tensorrt" not in backends and "Polygraphy is not installed" in why_not["tensorrt"]
