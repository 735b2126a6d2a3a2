"""KServe v2 gRPC through Ray Serve's own gRPC proxy (serve/ray_grpc.py), spoken by tritonclient.grpc: one
small local Ray (2 CPUs, no dashboard), one replica on 127.0.0.1, shut down at the end (about a minute)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402

from conftest import tiny_catalog, tiny_histories  # noqa: E402
from nezha.serve import LoadOptions, ServeOptions  # noqa: E402
from protocol_clients import _answers, _status, _tensors, artifact  # noqa: E402,F401
from serve_fixtures import free_port  # noqa: E402

@pytest.mark.ray
def test_ray_serve_grpc_proxy_speaks_v2(artifact, library):
    """`nezha serve --engine ray --grpc-port P`: the deployment's replicas answer the v2 RPCs through Ray
    Serve's gRPC proxy (serve.ray_deploy.grpc_options), the same answers and codes as uvicorn's."""
    from ray import serve

    from nezha.serve.ray_deploy import deploy, grpc_options, shutdown

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, **grpc_options(port))
        deploy(artifact, ServeOptions(workers=1), LoadOptions(threads=1), replicas=1)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready() and client.is_model_ready("nezha")
        histories = tiny_histories(tiny_catalog(), n=3)
        result = client.infer("nezha", _tensors(grpcclient, histories), parameters={"k": 5})
        assert _answers(result, 5) == [library.recommend([h], k=5)[0] for h in histories]
        status, text = _status(lambda: client.infer("nezha", _tensors(grpcclient, [[100]], np.int32)))
        assert status == "StatusCode.INVALID_ARGUMENT" and 'datatype must be INT64, got "INT32"' in text
        client.close()
    finally:
        shutdown()
        ray.shutdown()
