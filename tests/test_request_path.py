"""How many of our modules one request crosses, from HTTP to ONNX Runtime and back (issue 22: at most 9).

A profile hook on every thread (the event loop's, the batcher's workers) records the module of every Python
function that runs while one request is answered; the library's error classes (``nezha.runtime.errors``) do
not count. Printed in the order they are first entered (``pytest -s`` shows it)."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from conftest import tiny_catalog, tiny_model, write_index
from nezha.export.build import build
from nezha.model.checkpoint import save_checkpoint
from nezha.serve import LoadOptions, ServeOptions, Service
from nezha.serve.app import create_app
from nezha.serve.model import load_model

MAX_MODULES = 9
NOT_COUNTED = ("nezha.runtime.errors",)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("path")
    ckpt = save_checkpoint(tiny_model(), root / "ckpt", tiny_catalog())
    build(ckpt, write_index(tiny_catalog(), root / "tiny.index.json"), root / "art", precision=("fp32",),
          max_batch=8, max_beam=16, log=None)
    return root / "art"


class ModuleTrace:
    """sys.setprofile on this thread and on every thread started while installed; ``modules`` lists the
    nezha.* modules whose functions ran while ``recording`` (in first-entered order), and whether ONNX
Runtime's own Python layer was entered (``InferenceSession.run_with_iobinding``). The batcher's worker may
    still be returning from the warm-up request when recording starts, so the order is not asserted."""

    def __init__(self):
        self.recording = self.reached_onnxruntime = False
        self.modules: dict[str, None] = {}
        self._lock = threading.Lock()

    def hook(self, frame, event, arg):
        if event == "call" and self.recording:
            name = frame.f_globals.get("__name__", "")
            if name.startswith("onnxruntime."):
                self.reached_onnxruntime = True
            elif name.startswith("nezha.") and name not in NOT_COUNTED and name not in self.modules:
                with self._lock:
                    self.modules.setdefault(name, None)

    def __enter__(self):
        threading.setprofile(self.hook)
        sys.setprofile(self.hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        threading.setprofile(None)


V2_BODY = {"inputs": [{"name": "histories", "datatype": "INT64", "shape": [1, 3], "data": [100, 101, 102]},
                      {"name": "lengths", "datatype": "INT64", "shape": [1], "data": [3]}], "parameters": {"k": 3}}


@pytest.mark.parametrize("path, body", [("/v1/recommend", {"histories": [[100, 101, 102]], "k": 3}),
                                        ("/v2/models/nezha/infer", V2_BODY)], ids=["v1", "v2"])
def test_a_request_crosses_at_most_nine_of_our_modules(artifact, path, body):
    from starlette.testclient import TestClient

    model = load_model(artifact, LoadOptions(threads=1))           # loading is not the request
    with ModuleTrace() as trace:                                   # before the app starts its worker threads
        service = Service(artifact, ServeOptions(workers=1), LoadOptions(threads=1), model=model)
        with TestClient(create_app(service)) as client:
            assert client.post(path, content=json.dumps(body)).status_code == 200     # warm: buffers bound
            trace.recording = True
            reply = client.post(path, content=json.dumps(body))
            trace.recording = False
    assert reply.status_code == 200, reply.text
    modules = list(trace.modules)
    print(f"\n{path}: {len(modules)} modules: {' -> '.join(modules)}")
    assert "nezha.serve.app" in modules and trace.reached_onnxruntime                   # from HTTP down to ORT
    assert len(modules) <= MAX_MODULES, f"{len(modules)} modules per request, at most {MAX_MODULES}: {modules}"
