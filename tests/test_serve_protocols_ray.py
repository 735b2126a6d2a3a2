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
from nezha.serve import LoadOptions, ServeOptions, Service  # noqa: E402
from test_serve_protocols import _answers, _free_port, _status, _tensors, artifact, library  # noqa: E402,F401

@pytest.mark.ray
def test_ray_serve_grpc_proxy_speaks_v2(artifact, library):
    from ray import serve
    from ray.serve.config import gRPCOptions

    from nezha.serve.ray_grpc import SERVICER_FUNCTION, GrpcMethods

    class NezhaV2(GrpcMethods):
        """The v2 RPCs over a uvicorn-engine Service in a replica (NezhaDeployment in serve.ray_engine gets
        the same by adding GrpcMethods to its bases). Defined here: Ray ships it by value."""

        def __init__(self, artifact: str):
            from nezha.serve.model import load_model

            self.service = Service(artifact, ServeOptions(workers=1), LoadOptions(threads=1))
            self.service.model = load_model(artifact, LoadOptions(threads=1))
            self.service.start_engine()
    deployment = serve.deployment(NezhaV2)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION]))
        serve.run(deployment.bind(str(artifact)), name="nezha-v2")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready() and client.is_model_ready("nezha")
        histories = tiny_histories(tiny_catalog(), n=3)
        result = client.infer("nezha", _tensors(grpcclient, histories), parameters={"k": 5})
        assert _answers(result, 5) == [library.recommend([h], k=5)[0] for h in histories]
        status, text = _status(lambda: client.infer("nezha", _tensors(grpcclient, [[100]], np.int32)))
        assert status == "StatusCode.INVALID_ARGUMENT" and "datatype must be INT64, got 'INT32'" in text
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
