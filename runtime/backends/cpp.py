"""The C++ runtime (runtime/cpp) from Python, through its C ABI and ctypes.

``CppRecommender.load(artifact)`` then ``recommend(histories, k, beam)``: the same answers and policies
as ``Recommender`` (the C++ loop reproduces runtime/decode.py), without the Python loop's fixed cost per
level. ctypes rather than pybind11/nanobind: the shared library then carries one plain C ABI that any
language can call, and it does not depend on the Python version or on Python headers at build time; a
request crosses the boundary once (flat int64 arrays in, caller-owned result arrays out), so ctypes'
microseconds per call are small against a decode. ctypes releases the GIL during the call, so Python
threads run the C++ loop in parallel, each on its own bound buffers.

Build the library first: ``runtime/cpp/setup_ort.sh`` then CMake (README, section "C++"); set
``NEZHA_CPP_LIBRARY`` to use a library built elsewhere. Imports numpy only; never onnxruntime or torch.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from nezha.runtime.encoding import UNKNOWN_POLICIES, EncodingError, check_batch, code_array, integer_array
from nezha.runtime.errors import NezhaError, OptionError
from nezha.runtime.recommender import RequestError

_LIBRARY_NAME = "libnezha_runtime.so"
_DEFAULT_BUILD = Path(__file__).resolve().parents[1] / "cpp" / "build"


class CppRuntimeError(NezhaError, ValueError):
    """An error reported by the C++ runtime (bad artifact, request or option); the message says why."""


class CppUnavailable(NezhaError, RuntimeError):
    """The C++ runtime's shared library is not built (or cannot be opened)."""


def library_path() -> Path:
    """The libnezha_runtime.so to load: $NEZHA_CPP_LIBRARY, else runtime/cpp/build's."""
    env = os.environ.get("NEZHA_CPP_LIBRARY")
    return Path(env) if env else _DEFAULT_BUILD / _LIBRARY_NAME


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
        raise CppUnavailable(f"the C++ runtime is not built: {path} is missing (runtime/cpp/setup_ort.sh, then "
                             f"cmake -S runtime/cpp -B runtime/cpp/build && cmake --build runtime/cpp/build)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise CppUnavailable(f"cannot open the C++ runtime {path}: {e}") from None
    i64p = f32p = i32p = ctypes.c_void_p          # array addresses, passed as ints (ndarray.ctypes is slow)
    sig = {
        "nezha_last_error": (ctypes.c_char_p, []),
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
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    _lib = lib
    return lib


def _ptr(a: np.ndarray, ctype=None) -> int:
    return a.__array_interface__["data"][0]


def _last_error(lib) -> str:
    """This thread's C error message: bytes from an artifact (a UTF-16 manifest, a file name) need not be
    UTF-8, so undecodable bytes are replaced rather than raising UnicodeDecodeError."""
    return lib.nezha_last_error().decode("utf-8", errors="replace")


def _unknown_skip(unknown) -> int:
    """The unknown-item policy checked as the Python runtime checks it (a str of UNKNOWN_POLICIES)."""
    if not isinstance(unknown, str) or unknown not in UNKNOWN_POLICIES:
        raise EncodingError(f"unknown-item policy {unknown!r}; allowed: {', '.join(UNKNOWN_POLICIES)}")
    return int(unknown == "skip")


def _folder_argument(artifact_dir) -> bytes:
    if not isinstance(artifact_dir, (str, os.PathLike)) or isinstance(artifact_dir, bytes):
        raise OptionError(f"an artifact folder is a path (str or pathlib.Path), got {type(artifact_dir).__name__}")
    if "\0" in str(artifact_dir):                    # a C string would end there: another folder
        raise OptionError("an artifact folder path must not contain a NUL character")
    return os.fsencode(str(artifact_dir))


def check_artifact(artifact_dir: str | Path, verify: bool = True) -> None:
    """The C++ loader's checks of an artifact without ONNX Runtime (manifest, folder, sha256, contract,
    tables): what ``Artifact.open(artifact_dir, verify).tables()`` checks in Python. CppRuntimeError if refused."""
    lib = _load_library()
    if lib.nezha_check_artifact(_folder_argument(artifact_dir), int(bool(verify))) != 0:
        raise CppRuntimeError(_last_error(lib))


def _flat_histories(histories) -> tuple[np.ndarray, np.ndarray]:
    """Histories -> (items [N] int64, offsets [B+1] int64), checked as the Python runtime checks them."""
    check_batch(histories)
    if isinstance(histories, list) and all(type(h) is list and all(type(x) is int for x in h) for h in histories):
        arrays = histories                                         # the common case: skip the per-item checks
    else:
        arrays = [integer_array(h, f"history {b}") for b, h in enumerate(histories)]
    offsets = np.cumsum([0] + [len(h) for h in arrays], dtype=np.int64)
    try:
        items = np.array([x for h in arrays for x in h], dtype=np.int64) if offsets[-1] else np.zeros(0, np.int64)
    except OverflowError:
        raise EncodingError("item ids must fit int64") from None
    return items, offsets


class CppRecommender:
    """``CppRecommender.load(artifact_dir)`` then ``recommend(histories, k=10, beam=20)``: the C++ runtime
    with the Python ``Recommender``'s API and policies (CPU, ONNX Runtime). Thread-safe."""

    backend = "cpp"

    def __init__(self, handle: int, artifact_dir: Path, verify: bool = True):
        self._lib, self._handle, self.root, self._verify = _load_library(), handle, artifact_dir, verify
        info = [ctypes.c_int() for _ in range(4)]
        self._lib.nezha_info(handle, *[ctypes.byref(i) for i in info])
        self.levels, self.max_history, self.max_batch, self.max_beam = (i.value for i in info)
        self.precision = self._lib.nezha_precision(handle).decode()
        self.verifier_kinds = [self._lib.nezha_verifier_kind(handle, i).decode() for i in range(self.levels)]
        self._free = weakref.finalize(self, self._lib.nezha_free, handle)      # freed once: close() or collection
        self._tables = None
        self._tables_lock = threading.Lock()

    def _python_tables(self):
        """The artifact's layout, catalog and SID table read by the Python loader, for callers that work on
        codes and SID keys (the server's parsing and decode_codes): loaded on first use, the sha256 of each
        table read checked (the C++ loader has checked the rest; the graphs are not hashed twice)."""
        with self._tables_lock:
            if self._tables is None:
                from nezha.runtime.artifact import Artifact, sha256
                from nezha.runtime.catalog import Catalog
                from nezha.runtime.strict import ManifestError
                artifact = Artifact.open(self.root, verify=False)
                t = {}
                for name in ("item_ids", "item_codes", "sid_keys", "sid_offsets", "sid_items"):
                    rel = artifact.manifest.tables[name].file
                    if self._verify and sha256(artifact.path(rel)) != artifact.manifest.files[rel]:
                        raise ManifestError(f"artifact {artifact.root} failed verification: {rel}: sha256 mismatch "
                                            "(file modified or corrupt)")
                    t[name] = artifact.table(name)
                self._tables = (artifact.manifest.layout, Catalog(t["item_ids"], t["item_codes"]),
                                (t["sid_keys"], t["sid_offsets"], t["sid_items"]))
            return self._tables

    @property
    def layout(self):
        return self._python_tables()[0]

    @property
    def catalog(self):
        return self._python_tables()[1]

    @property
    def sid_table(self):
        return self._python_tables()[2]

    @classmethod
    def load(cls, artifact_dir: str | Path, precision: str | None = None, threads: int | None = None,
             verify: bool = True, dense_budget_bytes: int = 64 << 20, device: str | None = None,
             onnxruntime_library: str | None = None) -> "CppRecommender":
        """Open an artifact (see ``Recommender.load``; CPU only). ``onnxruntime_library`` defaults to the
        installed onnxruntime wheel's library."""
        if device not in (None, "cpu"):
            raise OptionError(f"device {device!r}; the C++ runtime runs on cpu only")
        from nezha.runtime.recommender import check_load_options
        check_load_options(precision, threads, dense_budget_bytes)
        folder = _folder_argument(artifact_dir)
        lib = _load_library()
        ort = onnxruntime_library or os.environ.get("NEZHA_ONNXRUNTIME_LIBRARY") or wheel_onnxruntime_library()
        handle = lib.nezha_load(folder, (precision or "").encode(), int(threads or 0), int(bool(verify)),
                                dense_budget_bytes, os.fsencode(ort or ""))
        if not handle:
            raise CppRuntimeError(_last_error(lib))
        return cls(handle, Path(artifact_dir), verify)

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise CppRuntimeError(_last_error(self._lib))

    def beam_for(self, k, beam) -> int:
        """k and beam checked as Recommender checks them (plain integers, never bools); beam defaults to
        max(k, 20) capped at max_beam."""
        integral = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        if beam is not None:
            self._check_beam(beam)
        if not integral(k) or not 1 <= k <= (self.max_beam if beam is None else beam):
            raise RequestError(f"k must be an integer in 1..beam ({self.max_beam if beam is None else beam}), got {k!r}")
        beam = min(max(int(k), 20), self.max_beam) if beam is None else beam
        self._check_beam(beam)
        return int(beam)

    def _check_beam(self, beam) -> None:
        if isinstance(beam, (bool, np.bool_)) or not isinstance(beam, (int, np.integer)) or not 1 <= beam <= self.max_beam:
            raise RequestError(f"beam must be an integer in 1..{self.max_beam} (the artifact's max_beam), got {beam!r}")

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, beam: int | None = None,
                  unknown: str = "error", stages: dict | None = None) -> list[list[tuple[int, float]]]:
        """Per history up to k (item id, summed log-prob) pairs, best first (as ``Recommender.recommend``).
        ``stages`` (if given) accumulates this thread's seconds per stage of the C++ loop."""
        beam = self.beam_for(k, beam)
        skip = _unknown_skip(unknown)
        items, offsets = _flat_histories(histories)
        n = len(offsets) - 1
        out_items = np.empty((max(n, 1), k), np.int64)
        out_scores = np.empty((max(n, 1), k), np.float32)
        lengths = np.zeros(max(n, 1), np.int32)
        if stages is not None:
            self._lib.nezha_set_stage_timing(self._handle, 1)
        try:
            self._check(self._lib.nezha_recommend(self._handle, _ptr(items, ctypes.c_int64), _ptr(offsets, ctypes.c_int64), n,
                                                  int(k), int(beam), skip, _ptr(out_items, ctypes.c_int64),
                                                  _ptr(out_scores, ctypes.c_float), _ptr(lengths, ctypes.c_int32)))
        finally:
            if stages is not None:
                self._collect_stages(stages)
        return [list(zip(out_items[b, :lengths[b]].tolist(), out_scores[b, :lengths[b]].astype(np.float64).tolist()))
                for b in range(n)]

    def decode_codes(self, code_histories: Sequence[np.ndarray], beam: int,
                     stages: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[n_b, L] code histories -> (sid_keys [B, K] uint64, scores [B, K] float32), best first: the
        C++ loop from codes (as ``Recommender.decode_codes``; codes outside a codebook are refused)."""
        self._check_beam(beam)
        if len(code_histories) == 0:
            raise RequestError("no histories given: pass a list of item-id lists")
        rows = [code_array(c, b, self.levels) for b, c in enumerate(code_histories)]
        codes = np.ascontiguousarray(np.concatenate(rows), dtype=np.int64)
        offsets = np.cumsum([0] + [len(c) for c in rows], dtype=np.int64)
        n = len(rows)
        keys = np.empty((n, int(beam)), np.uint64)
        scores = np.empty((n, int(beam)), np.float32)
        width = ctypes.c_int64(0)
        if stages is not None:
            self._lib.nezha_set_stage_timing(self._handle, 1)
        try:
            self._check(self._lib.nezha_decode_codes(self._handle, _ptr(codes), _ptr(offsets), n, int(beam), _ptr(keys),
                                                     _ptr(scores), ctypes.byref(width)))
        finally:
            if stages is not None:
                self._collect_stages(stages)
        return keys[:, :width.value], scores[:, :width.value]

    def backbone(self, histories: Sequence[Sequence[int]], unknown: str = "error", stages: dict | None = None) -> None:
        """The latency floor through the C++ runtime: encode + one backbone run (results discarded)."""
        skip = _unknown_skip(unknown)
        items, offsets = _flat_histories(histories)
        if stages is not None:
            self._lib.nezha_set_stage_timing(self._handle, 1)
        try:
            self._check(self._lib.nezha_backbone(self._handle, _ptr(items, ctypes.c_int64), _ptr(offsets, ctypes.c_int64),
                                                 len(offsets) - 1, skip))
        finally:
            if stages is not None:
                self._collect_stages(stages)

    def _collect_stages(self, stages: dict) -> None:
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
