"""KServe v2 over HTTP and gRPC at their limits: size fields that lie are refused, a large body or message is
413 or RESOURCE_EXHAUSTED, gRPC's status codes for overload, deadline and drain. Every call is local and
bounded by a timeout."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
grpc = pytest.importorskip("grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.grpc import service_pb2 as triton_pb2, service_pb2_grpc as triton_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_fixtures import _slow  # noqa: E402
from protocol_clients import TIMEOUT, TRANSPORTS, _status, _tensors, artifact, serve  # noqa: E402,F401


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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_grpc_size_fields_that_lie_and_a_large_message(serve, transport):
    s = serve(transport, max_body_bytes=4096)
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
    garbage = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}").unary_unary(   # bytes that are no protobuf message
        "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        garbage(b"\xff\xff\xff\xff garbage", timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest message" in e.value.details()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_grpc_overload_deadline_and_drain_have_their_status_codes(serve, transport):
    s = serve(transport, workers=1, max_queue=1, timeout_ms=300)
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
