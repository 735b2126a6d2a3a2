"""The C++ runtime (runtime/cpp) from Python, through its C ABI and ctypes.

``Recommender.load(artifact, backend="cpp")`` gives a ``CppRecommender``: the Recommender contract
(runtime/contract.py) with the same answers and the same checks as the Python backend (the C++ loop
reproduces runtime/decode.py), without the Python loop's fixed cost per level. The C++ runtime owns the
artifact: the catalog lookup (``prepare``: nezha_item_codes), the decode and the SID -> item mapping
(``decode_batch``: nezha_decode_batch) run there; Python never re-opens the tables. An error the C ABI
reports comes back as its kind's Python class (the Python backend's class for the same mistake).

ctypes rather than pybind11/nanobind: the shared library then carries one plain C ABI that any language
can call, and it does not depend on the Python version or on Python headers at build time; a request
crosses the boundary twice (flat int64 arrays in, caller-owned result arrays out), so ctypes' microseconds
per call are small against a decode. ctypes releases the GIL during the call, so Python threads run the
C++ loop in parallel, each on its own bound buffers.

Build the library first: ``runtime/cpp/setup_ort.sh`` then CMake (README, section "C++"); set
``NEZHA_CPP_LIBRARY`` to use a library built elsewhere. Imports numpy only; never onnxruntime or torch.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import struct
import weakref
from contextlib import contextmanager
from itertools import accumulate
from pathlib import Path
from typing import Sequence

import numpy as np

from nezha.runtime.contract import Recommender
from nezha.runtime.encoding import check_unknown, code_array, flat_histories
from nezha.runtime.errors import ArtifactError, GraphRunError, InputError, Unavailable

_LIBRARY_NAME = "libnezha_runtime.so"
_DEFAULT_BUILD = Path(__file__).resolve().parents[1] / "cpp" / "build"


def library_path(name: str = _LIBRARY_NAME, variable: str = "NEZHA_CPP_LIBRARY") -> Path:
    """The library ``name`` to load: $``variable``, else runtime/cpp/build's (libnezha_grpc.so: NEZHA_GRPC_LIBRARY)."""
    env = os.environ.get(variable)
    return Path(env) if env else _DEFAULT_BUILD / name


def wheel_onnxruntime_library() -> str | None:
    """The pip onnxruntime wheel's libonnxruntime.so.1.* (found without importing onnxruntime), or None."""
    spec = importlib.util.find_spec("onnxruntime")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(root, "capi", "libonnxruntime.so.1*")))
        if found:
            return found[-1]
    return None


_lib = None


def _load_library():
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if not path.is_file():
        raise Unavailable(f"the C++ runtime is not built: {path} is missing (runtime/cpp/setup_ort.sh, then "
                          f"cmake -S runtime/cpp -B runtime/cpp/build && cmake --build runtime/cpp/build)")
    try:
        lib = open_library(path)
    except OSError as e:
        raise Unavailable(f"cannot open the C++ runtime {path}: {e}") from None
    i64p = f32p = i32p = ctypes.c_void_p          # array addresses, passed as ints (ndarray.ctypes is slow)
    sig = {
        "nezha_last_error": (ctypes.c_char_p, []),
        "nezha_last_error_kind": (ctypes.c_int, []),
        "nezha_item_codes": (ctypes.c_int, [ctypes.c_void_p, i64p, i64p, ctypes.c_size_t, ctypes.c_int, i64p, i64p]),
        "nezha_decode_batch": (ctypes.c_int, [ctypes.c_void_p, i64p, i64p, ctypes.c_size_t, ctypes.c_int, i32p, i64p, f32p,
                                              i32p]),
        "nezha_item_count": (ctypes.c_int64, [ctypes.c_void_p]),
        "nezha_codebook_size": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        "nezha_load": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                         ctypes.c_char_p]),
        "nezha_free": (None, [ctypes.c_void_p]),
        "nezha_recommend": (ctypes.c_int, [ctypes.c_void_p, i64p, i64p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                           ctypes.c_int, i64p, f32p, i32p]),
        "nezha_backbone": (ctypes.c_int, [ctypes.c_void_p, i64p, i64p, ctypes.c_size_t, ctypes.c_int]),
        "nezha_decode_codes": (ctypes.c_int, [ctypes.c_void_p, i64p, i64p, ctypes.c_size_t, ctypes.c_int, i64p, f32p,
                                              ctypes.POINTER(ctypes.c_int64)]),
        "nezha_info": (ctypes.c_int, [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_int)] * 4),
        "nezha_precision": (ctypes.c_char_p, [ctypes.c_void_p]),
        "nezha_verifier_kind": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int]),
        "nezha_set_stage_timing": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        "nezha_stage_seconds": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double), ctypes.c_int,
                                               ctypes.c_char_p, ctypes.c_size_t]),
        "nezha_rebinds": (ctypes.c_int64, [ctypes.c_void_p]),
        "nezha_check_artifact": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]),
    }
    _lib = bind(lib, sig)
    return _lib


def open_library(path: Path):
    """``ctypes.CDLL(path)`` for a whole 64-bit ELF shared object; OSError otherwise. The loader maps a
    truncated library (a half-copied build) and the process dies of SIGBUS when it reads past the end:
    the headers' tables and loaded segments must lie within the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4:6] != b"\x02\x01":
            raise OSError("not a 64-bit little-endian ELF file")
        phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    if shoff + shentsize * shnum > size or len(table) < phentsize * phnum or phentsize < 56:
        raise OSError(f"truncated: its headers run past its {size} bytes")
    for i in range(phnum):
        kind, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if kind == 1 and offset + filesz > size:                       # PT_LOAD
            raise OSError(f"truncated: a segment runs past its {size} bytes")
    return ctypes.CDLL(str(path))


def bind(lib, signatures: dict):
    """Give ``lib``'s functions their ctypes types ({name: (restype, argtypes)}); AttributeError for one it lacks."""
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _flat_codes(code_histories: Sequence, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Code histories -> (codes [N, L] int64 C-contiguous, offsets [B+1] int64) for the C ABI."""
    rows = [code_array(c, b, levels) for b, c in enumerate(code_histories)]
    codes = np.ascontiguousarray(np.concatenate(rows), dtype=np.int64)
    return codes, np.cumsum([0] + [len(c) for c in rows], dtype=np.int64)


# nezha_error_kind (nezha_c.h) -> the class the Python backend raises for the same mistake; an internal
# error (out of memory, a bug) is no user error.
_ERROR_CLASSES = {1: InputError, 2: InputError, 3: InputError, 4: ArtifactError, 5: GraphRunError, 6: RuntimeError}


def _error(lib, kind: int | None = None) -> Exception:
    """This thread's C error as the Python runtime's class for its kind. Bytes from an artifact (a UTF-16
    manifest, a file name) need not be UTF-8: undecodable bytes are replaced, never a UnicodeDecodeError."""
    kind = lib.nezha_last_error_kind() if kind is None else kind
    return _ERROR_CLASSES.get(kind, RuntimeError)(lib.nezha_last_error().decode("utf-8", errors="replace"))


def _folder_argument(artifact_dir) -> bytes:
    if not isinstance(artifact_dir, (str, os.PathLike)) or isinstance(artifact_dir, bytes):
        raise InputError(f"an artifact folder is a path (str or pathlib.Path), got {type(artifact_dir).__name__}")
    if "\0" in str(artifact_dir):                    # a C string would end there: another folder
        raise InputError("an artifact folder path must not contain a NUL character")
    return os.fsencode(str(artifact_dir))


def check_artifact(artifact_dir: str | Path, verify: bool = True) -> None:
    """The C++ loader's checks of an artifact without ONNX Runtime (manifest, folder, sha256, contract,
    tables): what ``Artifact.open(artifact_dir, verify).tables()`` checks in Python. InputError if refused."""
    lib = _load_library()
    rc = lib.nezha_check_artifact(_folder_argument(artifact_dir), int(bool(verify)))
    if rc != 0:
        raise _error(lib, rc)


class CppRecommender(Recommender):
    """The Recommender contract on the C++ runtime (CPU, ONNX Runtime): ``Recommender.load(artifact,
    backend="cpp")``. Thread-safe. Keeps, outside the contract, ``decode_codes`` (SID keys and scores) and
    ``backbone`` (the latency floor) for bench and validation, and ``rebinds``."""

    backend = default_backend = "cpp"

    def __init__(self, handle: int, artifact_dir: Path):
        self._lib, self._handle, self.root = _load_library(), handle, Path(artifact_dir)
        info = [ctypes.c_int() for _ in range(4)]
        self._lib.nezha_info(handle, *[ctypes.byref(i) for i in info])
        self.levels, self.max_history, self.max_batch, self.max_beam = (i.value for i in info)
        self.codebook_sizes = tuple(self._lib.nezha_codebook_size(handle, i) for i in range(self.levels))
        self.item_count = int(self._lib.nezha_item_count(handle))
        self.precision = self._lib.nezha_precision(handle).decode()
        self.verifier_kinds = [self._lib.nezha_verifier_kind(handle, i).decode() for i in range(self.levels)]
        self._free = weakref.finalize(self, self._lib.nezha_free, handle)      # freed once: close() or collection

    @classmethod
    def _open(cls, artifact_dir, backend, device, precision, threads, verify, dense_budget_bytes) -> "CppRecommender":
        """CPU only; ONNX Runtime's library: $NEZHA_ONNXRUNTIME_LIBRARY, else the installed wheel's."""
        if device not in (None, "cpu"):
            raise InputError(f"device {device!r}; the C++ runtime runs on cpu only")
        folder = _folder_argument(artifact_dir)
        lib = _load_library()
        ort = os.environ.get("NEZHA_ONNXRUNTIME_LIBRARY") or wheel_onnxruntime_library()
        handle = lib.nezha_load(folder, (precision or "").encode(), int(threads or 0), int(bool(verify)),
                                dense_budget_bytes, os.fsencode(ort or ""))
        if not handle:
            raise _error(lib)
        return cls(handle, Path(artifact_dir))

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise _error(self._lib, rc)

    def _item_codes(self, items: np.ndarray, offsets: np.ndarray, skip: bool) -> list[np.ndarray]:
        n = len(offsets) - 1
        codes = np.empty((len(items), self.levels), np.int64)
        code_offsets = np.empty(n + 1, np.int64)
        self._check(self._lib.nezha_item_codes(self._handle, _ptr(items), _ptr(offsets), n, int(skip), _ptr(codes),
                                               _ptr(code_offsets)))
        bounds = code_offsets.tolist()
        return [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _decode_batch(self, codes, beam, ks, stages):
        flat = np.ascontiguousarray(codes[0] if len(codes) == 1 else np.concatenate(codes))    # int64 [N, L]: checked
        offsets = np.array([0, *accumulate(len(c) for c in codes)], np.int64)
        starts = [0, *accumulate(ks)]
        out_items = np.empty(starts[-1], np.int64)
        out_scores = np.empty(starts[-1], np.float32)
        lengths = np.empty(len(ks), np.int32)
        ks_array = np.array(ks, np.int32)
        call = lambda: self._lib.nezha_decode_batch(self._handle, _ptr(flat), _ptr(offsets), len(ks), beam, _ptr(ks_array),
                                                    _ptr(out_items), _ptr(out_scores), _ptr(lengths))
        if stages is None:
            self._check(call())
        else:
            with self._timed(stages):
                self._check(call())
        items, scores = out_items.tolist(), out_scores.tolist()
        return [list(zip(items[s:s + m], scores[s:s + m])) for s, m in zip(starts, lengths.tolist())]

    def decode_codes(self, code_histories: Sequence[np.ndarray], beam: int,
                     stages: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[n_b, L] code histories -> (sid_keys [B, K] uint64, scores [B, K] float32), best first: the
        C++ loop from codes (as ``GraphRecommender.decode_codes``; codes outside a codebook are refused)."""
        self._check_beam(beam)
        self._check_count(len(code_histories))
        codes, offsets = _flat_codes(code_histories, self.levels)
        n = len(code_histories)
        keys = np.empty((n, int(beam)), np.uint64)
        scores = np.empty((n, int(beam)), np.float32)
        width = ctypes.c_int64(0)
        with self._timed(stages):
            self._check(self._lib.nezha_decode_codes(self._handle, _ptr(codes), _ptr(offsets), n, int(beam), _ptr(keys),
                                                     _ptr(scores), ctypes.byref(width)))
        return keys[:, :width.value], scores[:, :width.value]

    def backbone(self, histories: Sequence[Sequence[int]], unknown: str = "error", stages: dict | None = None) -> None:
        """The latency floor through the C++ runtime: encode + one backbone run (results discarded)."""
        skip = check_unknown(unknown)
        items, offsets = flat_histories(histories)
        with self._timed(stages):
            self._check(self._lib.nezha_backbone(self._handle, _ptr(items), _ptr(offsets), len(offsets) - 1, int(skip)))

    @contextmanager
    def _timed(self, stages: dict | None):
        """Adds this thread's seconds per stage of the C++ loop to ``stages`` (if a dict) over the body."""
        if stages is None:
            yield
            return
        self._lib.nezha_set_stage_timing(self._handle, 1)
        try:
            yield
        finally:
            seconds = (ctypes.c_double * 64)()
            names = ctypes.create_string_buffer(4096)
            count = self._lib.nezha_stage_seconds(self._handle, seconds, 64, names, len(names))
            self._lib.nezha_set_stage_timing(self._handle, 0)
            for name, s in zip(names.value.decode("utf-8", errors="replace").split("\n"), seconds[:max(count, 0)]):
                if s > 0:
                    stages[name] = stages.get(name, 0.0) + s

    @property
    def rebinds(self) -> int:
        """ONNX Runtime rebinds of this thread's bindings so far (shape changes)."""
        return int(self._lib.nezha_rebinds(self._handle))

    def close(self) -> None:
        """Free the C++ recommender (sessions, every thread's buffers); do not call it while requests run."""
        self._free()
        self._handle = None
