"""KServe v2 binary tensors over HTTP and KServe v2 over gRPC, spoken by Triton's own clients
(tritonclient.http and tritonclient.grpc at their defaults: binary data on, raw contents): health,
metadata, answers equal to the library's bit for bit (single, batched, 64 concurrent clients, README's
snippet), bad tensors refused with the right status and the library's message. Every call is local and
bounded by a timeout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
grpc = pytest.importorskip("grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from conftest import tiny_catalog, tiny_histories  # noqa: E402
from protocol_clients import FRONTS, TIMEOUT, TRANSPORTS, _answers, _status, _tensors, artifact, serve  # noqa: E402,F401


@pytest.mark.parametrize("front", FRONTS)
def test_triton_clients_get_the_library_answers_bit_for_bit(serve, library, front):
    protocol, _, transport = front.partition("-")
    s = serve(transport or "auto")
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_64_concurrent_clients_of_each_protocol_get_their_solo_answers(serve, library, transport):
    s = serve(transport, workers=2, max_wait_ms=5)
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


@pytest.mark.parametrize("front", FRONTS)
def test_bad_tensors_get_the_library_message(serve, front):
    protocol, _, transport = front.partition("-")
    s = serve(transport or "auto")
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
