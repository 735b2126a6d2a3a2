"""ONNX Runtime backend: sessions shared by all threads, one IOBinding per graph and thread, bound to
host buffers allocated once for the manifest's largest shapes and rebound only when a shape changes.

Threading on CPU: every session gets ``intra_op_num_threads`` threads with spinning switched off
(``session.intra_op.allow_spinning = 0``). Spinning pools, one per session, were measured to double
end-to-end latency on 2 cores when several sessions (backbone + L heads) are open: an idle pool that
spins steals the cores the active session needs. With CUDA the same host buffers are bound and ONNX
Runtime copies through its device arena (no new device buffers in the steady state)."""

from __future__ import annotations

from ..errors import ArtifactError, Unavailable
from ..manifest import GraphEntry
from .base import GraphSteps, HostBuffers, OrtRunner, parse_device


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # the core dependency, but give the fix
        raise Unavailable("the onnxruntime backend needs onnxruntime: pip install onnxruntime "
                          "(or onnxruntime-gpu for CUDA)") from e
    return onnxruntime


def providers_for(device: str) -> list:
    ort = _ort()
    kind, device_id = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Unavailable(f"device {device!r} needs onnxruntime-gpu with the CUDA execution provider; this "
                          f"onnxruntime offers {ort.get_available_providers()}")
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def session_options(threads: int | None = None):
    """The one set of session options every ONNX Runtime session of the project uses (runtime, build
    validation, calibration, benchmark)."""
    ort = _ort()
    so = ort.SessionOptions()
    # fatal only: a failed run is raised as one GraphRunError line (OrtRunner._execute), a failed load as
    # ArtifactError; ONNX Runtime's own log would print each again. (Not per-run RunOptions: passing them
    # through the binding costs a C++ exception per run, +43% of the runtime's own instructions.)
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def open_session(path, device: str = "cpu", threads: int | None = None):
    """One InferenceSession (thread-safe) with the project's options; a file ONNX Runtime cannot open
    is an ArtifactError naming it."""
    ort, providers = _ort(), providers_for(device)
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:      # onnxruntime's InvalidProtobuf, Fail, NoSuchFile ... derive from Exception only
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: ONNX Runtime cannot open this graph: {first}") from None


def open_sessions(paths: dict, device: str = "cpu", threads: int | None = None,
                  entries: dict[str, GraphEntry] | None = None) -> dict:
    """Graph name -> InferenceSession (shared by all runners); with ``entries``, each graph's inputs and
    outputs must be the manifest's (names in order, dtypes, fixed dims), else ArtifactError."""
    sessions = {name: open_session(p, device, threads) for name, p in paths.items()}
    for name, entry in (entries or {}).items():
        check_io(sessions[name], entry, paths[name], name)
    return sessions


_ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)", "uint64": "tensor(uint64)"}


GRAPH_DESCRIPTION = "nezha-deploy graph "     # + the graph's name: what export/graphs.py writes in each graph


def check_io(session, entry: GraphEntry, path, name: str) -> None:
    """The graph ONNX Runtime opened against its manifest entry: a manifest that lies about a graph is
    refused at load, not at the first request. Checked: inputs and outputs (names in order, types, fixed
    dims, the names of dynamic dims) and the graph's own name (two heads can share one interface)."""
    for what, have, want in (("inputs", session.get_inputs(), entry.inputs), ("outputs", session.get_outputs(), entry.outputs)):
        got = [(a.name, a.type, list(a.shape)) for a in have]
        expected = [(t.name, _ORT_TYPES[t.dtype], list(t.shape)) for t in want]
        if got != expected:
            raise ArtifactError(f"{path}: the graph's {what} {got} differ from the manifest's {expected} "
                                "(name, type, dims)")
    described = session.get_modelmeta().description
    if (name.startswith("head_") or described.startswith(GRAPH_DESCRIPTION)) and described != GRAPH_DESCRIPTION + name:
        raise ArtifactError(f"{path}: this graph says it is {described!r}, the manifest uses it as {name!r}")


def ort_steps(entries: dict[str, GraphEntry], sessions: dict) -> GraphSteps:
    """One thread's runners over shared ``sessions``: the graphs of ``entries`` bound to one buffer set."""
    buffers = HostBuffers(entries)
    return GraphSteps({g: OrtRunner(g, e, sessions[g], buffers) for g, e in entries.items()}, buffers)
