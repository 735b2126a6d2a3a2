"""The uvicorn and the Ray Serve engine share one decode path (serve.batching.decode_items): the same requests
(one history, several, concurrent ones with mixed k and beams, unknown=skip, v2, a bad one) get the same
answers, byte for byte, from both. One small local Ray (2 CPUs), one replica on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import tiny_catalog, tiny_histories                             # noqa: E402
from nezha.serve import LoadOptions, ServeOptions, Service                    # noqa: E402
from serve_fixtures import Server, _build                                     # noqa: E402

pytestmark = pytest.mark.ray
OPTIONS = {"max_wait_ms": 20, "workers": 2}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("engines"), seed=0)


@pytest.fixture(scope="module")
def engines(artifact):
    """-> (uvicorn client, Ray Serve client) on the same artifact and options."""
    from ray import serve

    from nezha.serve.ray_deploy import deploy, shutdown

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    local = Server(Service(artifact, ServeOptions(**OPTIONS), LoadOptions(threads=1)))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(artifact, ServeOptions(**OPTIONS), LoadOptions(threads=1), replicas=1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as on_ray:
            yield local.client, on_ray
    finally:
        local.stop()
        shutdown()
        ray.shutdown()


HISTORIES = tiny_histories(tiny_catalog(), n=6, seed=3)
V2 = {"inputs": [{"name": "histories", "datatype": "INT64", "shape": [2, 3], "data": [100, 101, 102, 103, 104, 0]},
                 {"name": "lengths", "datatype": "INT64", "shape": [2], "data": [3, 2]}],
      "parameters": {"k": 4, "beam": 8}, "outputs": [{"name": "items"}, {"name": "scores"}]}
CASES = {
    "one history": ("/v1/recommend", {"histories": HISTORIES[:1], "k": 5}),
    "a batch of mixed lengths": ("/v1/recommend", {"histories": HISTORIES, "k": 3}),
    "unknown=skip": ("/v1/recommend", {"histories": [[100, 99_999, 101], [99_998, 102]], "k": 4, "unknown": "skip"}),
    "v2 infer": ("/v2/models/nezha/infer", V2),
    "a bad request": ("/v1/recommend", {"histories": [[100, 99_999]], "k": 4}),
}


def _answer(client, path, body) -> tuple[int, dict]:
    r = client.post(path, json=body)
    return r.status_code, r.json()


@pytest.mark.parametrize("case", CASES)
def test_both_engines_answer_alike(engines, case):
    local, on_ray = engines
    path, body = CASES[case]
    status, answer = _answer(local, path, body)
    assert status == (400 if case == "a bad request" else 200), answer
    assert _answer(on_ray, path, body) == (status, answer)


def test_concurrent_requests_with_mixed_k_batch_alike_on_both_engines(engines):
    """Concurrent requests of different k (and two beams) decode in shared batches on both engines; each gets
    its own k from the batch, the same on both."""
    local, on_ray = engines
    requests = [{"histories": [h], "k": k, "beam": 16 if i % 3 else 8}
                for i, (h, k) in enumerate(zip(tiny_histories(tiny_catalog(), n=24, seed=4), [1, 3, 5, 8] * 6))]
    with ThreadPoolExecutor(8) as pool:
        here = list(pool.map(lambda body: _answer(local, "/v1/recommend", body), requests))
        there = list(pool.map(lambda body: _answer(on_ray, "/v1/recommend", body), requests))
    assert all(status == 200 for status, _ in here), here
    assert [len(a["results"][0]) for _, a in here] == [b["k"] for b in requests]      # each its own k
    assert there == here
