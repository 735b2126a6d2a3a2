"""KServe v2 binary tensors over HTTP and KServe v2 over gRPC, spoken by Triton's own clients
(tritonclient.http and tritonclient.grpc at their defaults: binary data on, raw contents): health,
metadata, answers equal to the library's bit for bit (single, batched, 64 concurrent clients), bad
requests refused with the right status and the library's message, gRPC status codes for overload,
deadline and drain. Every call is local and bounded by a timeout."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
grpc = pytest.importorskip("grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.grpc import service_pb2 as triton_pb2, service_pb2_grpc as triton_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import tiny_catalog, tiny_histories  # noqa: E402
from nezha.runtime import Recommender  # noqa: E402
from nezha.serve import LoadOptions, ServeOptions, Service  # noqa: E402
from nezha.serve.app import create_app  # noqa: E402
from test_serve import _build, _slow  # noqa: E402

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("protocols"), 0)


@pytest.fixture(scope="module")
def library(artifact):
    with Recommender.load(artifact, threads=1) as rec:
        yield rec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn with the gRPC service alongside, in a thread on free 127.0.0.1 ports; both Triton clients."""

    def __init__(self, service: Service):
        import uvicorn

        self.service, port, self.grpc_port = service, _free_port(), _free_port()
        app = create_app(service, grpc_port=self.grpc_port, drain_timeout=5)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"127.0.0.1:{port}"
        self.http = httpclient.InferenceServerClient(self.url, network_timeout=TIMEOUT, connection_timeout=TIMEOUT)
        self.grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")
        self.raw = httpx.Client(base_url=f"http://{self.url}", timeout=TIMEOUT)

    def stop(self):
        self.http.close()
        self.grpc.close()
        self.raw.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def serve(artifact):
    servers = []

    def start(**options) -> Server:
        servers.append(Server(Service(artifact, ServeOptions(**{"workers": 2, **options}), LoadOptions(threads=1))))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


def _tensors(module, histories, dtype=np.int64):
    """Histories -> the v2 inputs (INT64 histories [B, T] padded with 0, lengths [B]) for ``module``'s client."""
    T = max(len(h) for h in histories)
    padded = np.array([h + [0] * (T - len(h)) for h in histories], dtype=dtype)
    lengths = np.array([len(h) for h in histories], dtype=dtype)
    datatype = {np.int64: "INT64", np.int32: "INT32"}[dtype]
    inputs = [module.InferInput("histories", padded.shape, datatype), module.InferInput("lengths", lengths.shape, datatype)]
    inputs[0].set_data_from_numpy(padded)
    inputs[1].set_data_from_numpy(lengths)
    return inputs


def _answers(result, k):
    """An InferResult -> per history [(item, score)], exactly as the library returns them."""
    items, scores, counts = result.as_numpy("items"), result.as_numpy("scores"), result.as_numpy("counts")
    assert items.dtype == np.int64 and scores.dtype == np.float32 and items.shape[1] == k
    return [list(zip(items[b, :n].tolist(), scores[b, :n].tolist())) for b, n in enumerate(counts.tolist())]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_clients_get_the_library_answers_bit_for_bit(serve, library, protocol):
    s = serve()
    client, module = (s.http, httpclient) if protocol == "http" else (s.grpc, grpcclient)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("nezha")
    meta = client.get_server_metadata()
    extensions = meta["extensions"] if protocol == "http" else list(meta.extensions)
    assert "binary_tensor_data" in extensions
    model = client.get_model_metadata("nezha", as_json=True) if protocol == "grpc" else client.get_model_metadata("nezha")
    assert [t["name"] for t in model["inputs"]] == ["histories", "lengths"]
    assert [t["name"] for t in model["outputs"]] == ["items", "scores", "counts"]

    histories = tiny_histories(tiny_catalog(), n=6)
    for k, beam, batch in ((5, None, histories[:1]), (3, 7, histories), (10, 16, histories)):
        params = {"k": k, **({"beam": beam} if beam else {})}
        result = client.infer("nezha", _tensors(module, batch), parameters=params, request_id="q1")
        assert result.get_response()["id"] == "q1" if protocol == "http" else result.get_response().id == "q1"
        # each history's answer is the library's for it alone (the server never pads), scores to the bit
        assert _answers(result, k) == [library.recommend([h], k=k, beam=beam)[0] for h in batch]

    outputs = [module.InferRequestedOutput("items"), module.InferRequestedOutput("counts")]
    result = client.infer("nezha", _tensors(module, histories[:2]), outputs=outputs)
    assert result.as_numpy("scores") is None and result.as_numpy("counts").tolist() == [10, 10]


def test_64_concurrent_clients_of_each_protocol_get_their_solo_answers(serve, library):
    s = serve(workers=2, max_wait_ms=5)
    rng = np.random.default_rng(5)
    ids = tiny_catalog().item_ids
    requests = [[rng.choice(ids, size=int(rng.integers(1, 12))).tolist() for _ in range(int(rng.integers(1, 4)))]
                for _ in range(128)]
    expected = [[library.recommend([h], k=4, beam=8)[0] for h in r] for r in requests]
    http = httpclient.InferenceServerClient(s.url, concurrency=64, network_timeout=TIMEOUT)
    try:
        pending = [http.async_infer("nezha", _tensors(httpclient, r), parameters={"k": 4, "beam": 8}) for r in requests]
        assert [_answers(p.get_result(), 4) for p in pending] == expected
    finally:
        http.close()

    with ThreadPoolExecutor(64) as pool:           # 64 threads, one channel: how gRPC clients share a server
        assert list(pool.map(lambda r: _answers(s.grpc.infer("nezha", _tensors(grpcclient, r), client_timeout=TIMEOUT,
                                                             parameters={"k": 4, "beam": 8}), 4), requests)) == expected
    metrics = s.raw.get("/metrics").text
    assert 'nezha_requests_total{route="grpc:ModelInfer",status="200"} 128.0' in metrics


def _status(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value.status()), e.value.message()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_tensors_get_the_library_message(serve, protocol):
    s = serve()
    client, module = (s.http, httpclient) if protocol == "http" else (s.grpc, grpcclient)
    bad = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    one = [[100, 101]]
    rank1 = module.InferInput("histories", [2], "INT64")
    rank1.set_data_from_numpy(np.array([100, 101], np.int64))
    for inputs, params, message in ((_tensors(module, one, np.int32), {}, "datatype must be INT64, got \"INT32\""),
                                    ([rank1, _tensors(module, one)[1]], {}, "shape must be 2 non-negative integers"),
                                    (_tensors(module, one)[:1], {}, "needs the inputs 'histories' INT64 [B, T] and 'lengths'"),
                                    (_tensors(module, [[100, 10 ** 6]]), {}, "item ids not in the catalog: [1000000]"),
                                    (_tensors(module, one), {"k": 99}, "k must be an integer in 1..beam"),
                                    (_tensors(module, one), {"shoe_size": 3}, "unknown field 'shoe_size'")):
        status, text = _status(lambda: client.infer("nezha", inputs, parameters=params))
        assert status == bad and message in text, (status, text)
    assert _status(lambda: client.infer("other", _tensors(module, one)))[0] in ("404", "StatusCode.NOT_FOUND")
    if protocol == "grpc":                                # no control calls over gRPC
        assert _status(lambda: client.load_model("nezha"))[0] == "StatusCode.UNIMPLEMENTED"


def test_http_size_fields_that_lie_are_400_and_a_large_body_413(serve):
    s = serve(max_body_bytes=4096)
    hist, lengths = np.array([[100, 101]], np.int64).tobytes(), np.array([2], np.int64).tobytes()

    def request(h_size=16, l_size=8, extra=b"", header_delta=0):
        header = {"inputs": [{"name": "histories", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": h_size}},
                             {"name": "lengths", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": l_size}}],
                  "parameters": {"binary_data_output": True}}
        head = json.dumps(header).encode()
        return s.raw.post("/v2/models/nezha/infer", content=head + hist + lengths + extra,
                          headers={"Inference-Header-Content-Length": str(len(head) + header_delta)})
    ok = request()
    assert ok.status_code == 200 and "binary_data_size" in ok.text     # binary outputs, as asked
    for r, message in ((request(h_size=1 << 40), "runs past the end of the body"),
                       (request(h_size=8, l_size=16), "8 bytes of binary data; INT64 shape [1, 2] needs 16"),
                       (request(extra=b"\0" * 8), "8 bytes of the body follow the inputs' binary data"),
                       (request(header_delta=10 ** 6), "whole body is"),
                       (request(header_delta=-3), "not valid JSON"),
                       (request(h_size=-1), "binary_data_size must be a byte count")):
        assert r.status_code == 400 and message in r.json()["error"], (message, r.text)
    r = s.raw.post("/v2/models/nezha/infer", content=b"{}", headers={"Inference-Header-Content-Length": "1" * 30})
    assert r.status_code == 400 and "must be a byte count" in r.json()["error"]

    status, text = _status(lambda: s.http.infer("nezha", _tensors(httpclient, [[100] * 600])))
    assert status == "413" and "at most 4096" in text


def test_grpc_size_fields_that_lie_and_a_large_message(serve):
    s = serve(max_body_bytes=4096)
    stub = triton_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}"))

    def infer(raw, *, typed=False, **kw):
        request = triton_pb2.ModelInferRequest(model_name="nezha", **kw)
        request.inputs.add(name="histories", datatype="INT64", shape=[1, 2])
        request.inputs.add(name="lengths", datatype="INT64", shape=[1])
        if typed:
            request.inputs[0].contents.int64_contents.extend([100, 101])
            request.inputs[1].contents.int64_contents.extend([2])
        request.raw_input_contents.extend(raw)
        return stub.ModelInfer(request, timeout=TIMEOUT)
    hist, lengths = np.array([[100, 101]], np.int64).tobytes(), np.array([2], np.int64).tobytes()
    raw_answer, typed_answer = infer([hist, lengths]), infer([], typed=True)
    assert len(raw_answer.raw_output_contents) == 3 and not raw_answer.outputs[0].HasField("contents")
    assert np.frombuffer(raw_answer.raw_output_contents[0], "<i8").tolist() == list(typed_answer.outputs[0].contents.int64_contents)
    for raw, message in (([hist[:8], lengths], "8 bytes of binary data; INT64 shape [1, 2] needs 16"),
                         ([hist], "1 raw_input_contents for 2 inputs")):
        with pytest.raises(grpc.RpcError) as e:
            infer(raw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        infer([np.zeros(600, np.int64).tobytes(), lengths])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_overload_deadline_and_drain_have_their_status_codes(serve):
    s = serve(workers=1, max_queue=1, timeout_ms=300)
    _slow(s.service, 0.5)

    def one(_):
        try:
            s.grpc.infer("nezha", _tensors(grpcclient, [[100, 101]]), client_timeout=TIMEOUT)
            return "OK"
        except InferenceServerException as e:
            return e.status()
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(4)))
    assert "StatusCode.RESOURCE_EXHAUSTED" in codes and "StatusCode.DEADLINE_EXCEEDED" in codes, codes
    time.sleep(0.6)                                       # the slow decodes end
    status, _ = _status(lambda: s.grpc.infer("nezha", _tensors(grpcclient, [[100]]), client_timeout=0.05))
    assert status == "StatusCode.DEADLINE_EXCEEDED"       # the client's own gRPC deadline
    time.sleep(0.6)
    s.service.draining = True
    status, text = _status(lambda: s.grpc.infer("nezha", _tensors(grpcclient, [[100]])))
    assert status == "StatusCode.UNAVAILABLE" and "draining" in text
    assert not s.grpc.is_server_ready()
    s.service.draining = False


def test_the_compiled_descriptor_matches_the_proto():
    pytest.importorskip("grpc_tools")
    from nezha.serve.kserve import DESCRIPTOR_TEXT
    from nezha.serve.kserve.__main__ import compiled_text

    assert compiled_text() == DESCRIPTOR_TEXT.read_text(), "run: python -m nezha.serve.kserve"


def test_grpc_port_option_errors_are_one_line(tmp_path):
    from test_serve import _cli

    for args, message in ((["--grpc-port", "0"], "--grpc-port must be a port in 1..65535"),
                          (["--grpc-port", "8000"], "other than --port"),
                          (["--grpc-port", "65536", "--engine", "ray"], "got 65536")):
        r = _cli("serve", str(tmp_path / "missing"), *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_loadtest_measures_the_protocols_side_by_side(serve, tmp_path):
    from nezha.serve.loadtest import run_loadtest
    from nezha.runtime.errors import InputError
    from test_serve import _tiny_data

    s = serve()
    data = _tiny_data(tmp_path / "data", tiny_histories(tiny_catalog(), n=40))
    # one client and two: gRPC's clients send their next request from the last one's completion callback
    result = run_loadtest([f"http://{s.url}"], concurrency=[1, 2], duration=0.6, warmup=0.1, k=5, beam=8, data=data,
                          histories_per_request=3, protocol=["json", "binary", "grpc"], grpc_port=s.grpc_port,
                          out=tmp_path / "lt")
    for point in result["points"]:
        assert list(point["servers"]) == ["json", "binary", "grpc"]
        for r in point["servers"].values():
            assert r["errors"] == 0 and r["requests"] > 0 and r["p50_ms"] <= r["p99_ms"]
    metrics = s.raw.get("/metrics").text
    assert 'route="grpc:ModelInfer",status="200"' in metrics and 'route="/v2/models/{name}/infer",status="200"' in metrics
    with pytest.raises(InputError, match="needs --grpc-port"):
        run_loadtest([f"http://{s.url}"], protocol=["grpc"], data=data, out=None)


def test_protocol_cost_reads_the_server_cpu_per_protocol(serve, tmp_path):
    from nezha.bench.protocol_cost import measure, report
    from test_serve import _tiny_data

    s = serve()
    data = _tiny_data(tmp_path / "data", tiny_histories(tiny_catalog(), n=40))
    acc = measure(f"http://{s.url}", os.getpid(), s.grpc_port, ["json", "grpc"], 2, 3, 0.4, 1, data=data, k=5, beam=8)
    for a in acc.values():                                # the server runs in this process: its CPU is ours too
        assert a["requests"] > 0 and sum(a["cpu"].values()) > 0 and a["batch"][1] > 0
    assert [line.split("|")[1].strip() for line in report(acc, 2, 3).splitlines()[3:]] == ["json", "grpc"]


def test_the_readme_client_snippet_gets_the_library_answers(serve, library):
    """README's tritonclient snippet, run as written against this server (its item ids swapped for the tiny
    catalog's, its ports for this server's): both clients print the library's items and scores."""
    from pathlib import Path
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "tritonclient" in b]
    s = serve()
    swaps = {"[[12, 55, 102], [7, 0, 0]]": "[[100, 105, 110], [107, 0, 0]]", "127.0.0.1:8000": s.url,
             "127.0.0.1:8001": f"127.0.0.1:{s.grpc_port}", '"beam": 20': '"beam": 16'}
    for old, new in swaps.items():
        assert old in snippet, f"README's snippet no longer has {old}"
        snippet = snippet.replace(old, new)
    printed = []
    exec(compile(snippet, "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    want = library.recommend([[100, 105, 110], [107]], k=10, beam=16)
    assert len(printed) == 2
    for items, scores in printed:
        assert [list(zip(i.tolist(), s.tolist())) for i, s in zip(items, scores)] == want
