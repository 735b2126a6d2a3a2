"""The CUDA runtime, found and asked through ctypes: is there a libcudart and a GPU, which GPU is it, how
much memory is free, page-locked host buffers. Polygraphy's thin wrapper (``polygraphy.cuda``) loads the
library and moves the data; this module makes sure it finds the library and says clearly when a piece is
missing. Nothing here imports torch or needs a GPU to be imported."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Unavailable

INSTALL = "pip install 'nezha-deploy[tensorrt]' on a machine with an NVIDIA GPU and driver"
# Where Polygraphy looks for libcudart.so* (polygraphy/cuda/cuda.py), in its order.
POLYGRAPHY_DIRS = ("/usr/local/cuda/lib64", "/usr/lib", "/lib")
# cudaDeviceProp starts with char name[256] then cudaUUID_t uuid (16 bytes) in every CUDA since 10.0; the
# rest of the struct changes between versions, so only a generous buffer and these two fields are used.
PROP_BYTES, NAME_BYTES, UUID_BYTES = 4096, 256, 16
CC_MAJOR, CC_MINOR = 75, 76        # cudaDevAttrComputeCapabilityMajor / Minor


def wheel_roots() -> list[str]:
    """Where pip's CUDA wheels may sit: every sys.path entry (site-packages holds ``nvidia/``)."""
    return list(sys.path)


def cudart_candidates(search_path=None, env=None) -> list[Path]:
    """libcudart.so* files in Polygraphy's search folders (LD_LIBRARY_PATH first), then in pip's CUDA
    wheels (``nvidia/cuda_runtime/lib`` and any ``nvidia/*/lib`` on ``sys.path``), which Polygraphy
    never searches. ``search_path``/``env`` default to sys.path / os.environ (tests pass their own)."""
    env = os.environ if env is None else env
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d] + list(POLYGRAPHY_DIRS)
    for entry in wheel_roots() if search_path is None else search_path:
        dirs += sorted(str(p) for p in Path(entry or ".").glob("nvidia/*/lib"))
    found = []
    for d in dict.fromkeys(dirs):
        found += sorted(Path(d).glob("libcudart.so*")) if Path(d).is_dir() else []
    return found


def expose_cudart(env=None, search_path=None) -> Path:
    """Find libcudart and make sure Polygraphy will: a library found only in a pip wheel has its folder
    prepended to ``LD_LIBRARY_PATH`` of this process (Polygraphy reads it when it first loads CUDA).
    Raises Unavailable naming every folder searched when there is none."""
    env = os.environ if env is None else env
    found = cudart_candidates(search_path, env)
    if not found:
        system = ctypes.util.find_library("cudart")        # ldconfig's cache (e.g. /usr/lib/x86_64-linux-gnu)
        if system:
            return Path(system)
        raise Unavailable("the CUDA runtime library (libcudart.so) was not found in LD_LIBRARY_PATH, "
                          f"{', '.join(POLYGRAPHY_DIRS)}, pip's nvidia/*/lib or the loader cache: install "
                          f"the CUDA runtime (pip install nvidia-cuda-runtime-cu12) or {INSTALL}")
    lib_dir = str(found[0].parent)
    polygraphy_sees = [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d] + list(POLYGRAPHY_DIRS)
    if lib_dir not in polygraphy_sees:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([lib_dir] + [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d])
    return found[0]


def cudart():
    """The CUDA runtime handle Polygraphy loaded (ctypes.CDLL), after ``expose_cudart``; a library that
    will not load is Unavailable, not a raw OSError."""
    expose_cudart()
    try:
        from polygraphy import cuda
        return cuda.wrapper().handle
    except ImportError as e:
        raise Unavailable(f"Polygraphy is not installed ({e}): {INSTALL}") from None
    except OSError as e:
        raise Unavailable(f"the CUDA runtime library could not be loaded ({e}): {INSTALL}") from None


def call(name: str, *args) -> None:
    """Call CUDA runtime function ``name``; any status but cudaSuccess (0) is Unavailable."""
    status = getattr(cudart(), name)(*args)
    if status != 0:
        raise Unavailable(f"CUDA runtime call {name} failed with error {status} (cudaError_t)")


def device_count() -> int:
    """GPUs visible to the CUDA runtime; 0 when the driver reports none (cudaErrorNoDevice, 100) or is
    missing or too old (cudaErrorInsufficientDriver 35, cudaErrorNoDevice)."""
    n = ctypes.c_int(0)
    status = cudart().cudaGetDeviceCount(ctypes.byref(n))
    return n.value if status == 0 else 0


def require_gpu(device_id: int = 0) -> None:
    """Unavailable unless CUDA GPU ``device_id`` exists here."""
    n = device_count()
    if device_id >= n:
        raise Unavailable(f"no CUDA GPU {device_id} here (the CUDA runtime sees {n}): TensorRT engines "
                          "are built and run on an NVIDIA GPU")


@dataclass(frozen=True)
class Device:
    """One GPU as the CUDA runtime names it: model name, UUID (as nvidia-smi prints it), compute capability."""

    name: str
    uuid: str
    compute_capability: str


def format_uuid(raw: bytes) -> str:
    """16 bytes -> 'GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx' (nvidia-smi's form)."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def device(device_id: int = 0) -> Device:
    """Name, UUID and compute capability of GPU ``device_id``."""
    require_gpu(device_id)
    props = ctypes.create_string_buffer(PROP_BYTES)
    handle = cudart()
    get = getattr(handle, "cudaGetDeviceProperties_v2", None) or handle.cudaGetDeviceProperties   # CUDA 12+ / 11
    if get(props, device_id) != 0:
        raise Unavailable(f"cudaGetDeviceProperties failed for GPU {device_id}")
    major, minor = ctypes.c_int(), ctypes.c_int()
    call("cudaDeviceGetAttribute", ctypes.byref(major), CC_MAJOR, device_id)
    call("cudaDeviceGetAttribute", ctypes.byref(minor), CC_MINOR, device_id)
    name = props.raw[:NAME_BYTES].split(b"\0", 1)[0].decode("utf-8", "replace")
    return Device(name, format_uuid(props.raw[NAME_BYTES:NAME_BYTES + UUID_BYTES]), f"{major.value}.{minor.value}")


def memory_info(device_id: int = 0) -> dict:
    """{"free_mb", "total_mb"} of GPU ``device_id`` (cudaMemGetInfo on the current device)."""
    call("cudaSetDevice", device_id)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    call("cudaMemGetInfo", ctypes.byref(free), ctypes.byref(total))
    return {"free_mb": round(free.value / 2**20, 1), "total_mb": round(total.value / 2**20, 1)}


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost) as a flat NumPy array: copies to and from the GPU run
    at full bus speed and truly asynchronously, which pageable memory does not. ``free()`` once."""

    def __init__(self, count: int, dtype):
        self.dtype, self.nbytes = np.dtype(dtype), max(1, int(count)) * np.dtype(dtype).itemsize
        ptr = ctypes.c_void_p()
        call("cudaMallocHost", ctypes.byref(ptr), ctypes.c_size_t(self.nbytes))
        self.ptr = ptr.value
        self.array = np.ctypeslib.as_array((ctypes.c_byte * self.nbytes).from_address(self.ptr)).view(self.dtype)

    def free(self) -> None:
        if self.ptr:
            self.array, ptr, self.ptr = None, self.ptr, None
            call("cudaFreeHost", ctypes.c_void_p(ptr))
