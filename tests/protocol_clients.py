"""What the KServe v2 protocol tests share: uvicorn with the gRPC service alongside (Server, the ``serve``
fixture) on ``artifacts[0]`` (conftest), Triton's tensors in and the library's answers out, a refusal's status."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
grpc = pytest.importorskip("grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from nezha.serve import LoadOptions, ServeOptions, Service  # noqa: E402
from nezha.serve.app import create_app  # noqa: E402
from serve_fixtures import free_port  # noqa: E402

TIMEOUT = 20.0


def _native_built() -> bool:
    from nezha.serve.grpc_native import library
    return library() is not None


_NATIVE = pytest.mark.skipif(not _native_built(), reason="libnezha_grpc is not built (make cpp with Debian's libgrpc++-dev)")
TRANSPORTS = [pytest.param("native", marks=_NATIVE), "grpcio"]     # nezha serve --grpc-transport
FRONTS = ["http", pytest.param("grpc-native", marks=_NATIVE), "grpc-grpcio"]   # a client's way in: HTTP, or gRPC over each


@pytest.fixture(scope="session")
def artifact(artifacts):
    """The served artifact: conftest's ``artifacts[0]``, the one its ``library`` fixture loads."""
    return artifacts[0]


class Server:
    """uvicorn with the gRPC service alongside, in a thread on free 127.0.0.1 ports; both Triton clients."""

    def __init__(self, service: Service, transport: str = "auto"):
        import uvicorn

        self.service, port, self.grpc_port = service, free_port(), free_port()
        app = create_app(service, grpc_port=self.grpc_port, drain_timeout=5, grpc_transport=transport)
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

    def start(transport: str = "auto", **options) -> Server:
        servers.append(Server(Service(artifact, ServeOptions(**{"workers": 2, **options}), LoadOptions(threads=1)),
                              transport))
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


def _status(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value.status()), e.value.message()
