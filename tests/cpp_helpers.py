"""What the C++ runtime tests share: the CMake build (re)made here when the toolchain and ONNX Runtime's
headers are present (runtime/cpp/setup_ort.sh), else the tests skip with the reason; the tiny artifact
(fp32 and int8-cpu, built once per session); the C++ backend's Recommender and a comparison of answers."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_artifact
from nezha.runtime import Recommender


ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "runtime" / "cpp"
BUILD = Path(os.environ.get("NEZHA_CPP_BUILD", CPP / "build"))
ASAN_BUILD = Path(os.environ.get("NEZHA_CPP_ASAN_BUILD", CPP / "build-asan"))
MAX_BATCH, MAX_BEAM = 4, 16
PRECISIONS = ("fp32", "int8-cpu")


def toolchain_missing() -> str | None:
    """Why the C++ runtime cannot be built here, or None."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install cmake g++)"
    ort_root = os.environ.get("ONNXRUNTIME_ROOT")
    if not ort_root and not (CPP / "third_party" / "onnxruntime" / "include" / "onnxruntime_cxx_api.h").is_file():
        return "ONNX Runtime's C++ headers are missing: run runtime/cpp/setup_ort.sh (or set ONNXRUNTIME_ROOT)"
    for header, package in (("/usr/include/nlohmann/json.hpp", "nlohmann-json3-dev"), ("/usr/include/openssl/evp.h", "libssl-dev")):
        if not Path(header).is_file():
            return f"{header} is missing (apt-get install {package})"
    return None


def cmake_build(build: Path, *flags: str) -> None:
    if not (build / "CMakeCache.txt").is_file():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), *generator, *flags], check=True,
                       capture_output=True, text=True)
    done = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"the C++ build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """runtime/cpp/build, brought up to date (or as it is when it cannot be rebuilt here)."""
    reason = toolchain_missing()
    if reason is None:
        cmake_build(BUILD, "-DCMAKE_BUILD_TYPE=Release")
    elif not (BUILD / "libnezha_runtime.so").is_file():
        pytest.skip(f"the C++ runtime is not built ({BUILD}) and cannot be built here: {reason}")
    os.environ.setdefault("NEZHA_CPP_LIBRARY", str(BUILD / "libnezha_runtime.so"))
    use_the_wheels_onnxruntime()
    return BUILD


def use_the_wheels_onnxruntime() -> None:
    """The test binaries and the CLI open the installed wheel's ONNX Runtime (the library CMake found at
    configure time may be absent, e.g. in a worktree whose venv borrows its packages)."""
    from nezha.runtime.backends.cpp import wheel_onnxruntime_library
    wheel = wheel_onnxruntime_library()
    if wheel and not os.environ.get("NEZHA_ONNXRUNTIME_LIBRARY"):
        os.environ["NEZHA_ONNXRUNTIME_LIBRARY"] = wheel


def _cpp_artifact(root: Path) -> Path:
    return tiny_artifact(root, PRECISIONS, MAX_BATCH, MAX_BEAM)


@pytest.fixture(scope="module")
def artifact(built_once) -> Path:
    """A tiny public-format checkpoint built with --index, fp32 and int8-cpu (once per session)."""
    return built_once(_cpp_artifact)


def cpp(artifact, precision="fp32", **kw):
    return Recommender.load(artifact, backend="cpp", precision=precision, threads=1, **kw)


def assert_same(expected, got, tolerance=1e-5, label=""):
    """Same items in the same order per history; scores within ``tolerance``."""
    assert len(expected) == len(got), label
    for b, (e, g) in enumerate(zip(expected, got)):
        assert [i for i, _ in e] == [i for i, _ in g], f"{label} history {b}: {e} != {g}"
        assert np.allclose([s for _, s in e], [s for _, s in g], rtol=0, atol=tolerance), f"{label} history {b}"
