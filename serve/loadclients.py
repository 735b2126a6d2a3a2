"""What ``nezha loadtest --protocol`` sends: the same histories encoded per protocol, in advance, so that
the client spends its CPU on the network and not on encoding.

  recommend  POST /v1/recommend, JSON (the default; the server's own route)
  json       POST /v2/models/{name}/infer, KServe v2 JSON tensors
  binary     POST /v2/models/{name}/infer, KServe v2 binary tensor data (inputs and outputs), as
             tritonclient.http sends by default
  grpc       inference.GRPCInferenceService/ModelInfer with raw_input_contents, as tritonclient.grpc does;
             every client of one run shares one channel (HTTP/2 multiplexes), as an application would.
             The clients run without an event loop: each call's completion callback sends that client's
             next request, as tritonclient.grpc's async_infer works; grpc.aio's client costs ~30% more
             CPU per call (its poller thread wakes the event loop for every event; docs/protocols.md)

A request is (extra HTTP header lines, body bytes); for gRPC the body is the serialized ModelInferRequest
and the header lines are empty."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import numpy as np

PROTOCOLS = ("recommend", "json", "binary", "grpc")
GRPC_OK = 200            # a gRPC OK is counted as HTTP's 200, so that one summary counts both protocols


def check_protocols(protocols, grpc_port: int | None, error: type[Exception]) -> None:
    if not protocols or any(p not in PROTOCOLS for p in protocols) or len(set(protocols)) != len(protocols):
        raise error(f"--protocol: one or more of {', '.join(PROTOCOLS)}, each once; got {' '.join(protocols)}")
    if "grpc" in protocols and grpc_port is None:
        raise error("--protocol grpc needs --grpc-port (the server's, as given to nezha serve)")


def address(url: str, protocol: str, grpc_port: int | None) -> str:
    """Where ``protocol``'s requests go, for the reports."""
    if protocol == "grpc":
        return f"grpc://{urlsplit(url).hostname}:{grpc_port}"
    return url if protocol == "recommend" else f"{url} ({protocol})"


def _padded(histories: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """-> histories [B, T] int64 padded with 0, lengths [B] int64 (the v2 inputs)."""
    T = max(len(h) for h in histories)
    return (np.array([h + [0] * (T - len(h)) for h in histories], dtype="<i8"),
            np.array([len(h) for h in histories], dtype="<i8"))


def encode(protocol: str, histories: list[list[int]], k: int, beam: int, model: str = "nezha") -> tuple[bytes, bytes]:
    """One request of ``histories`` for ``model`` in ``protocol`` -> (extra header lines, body)."""
    if protocol == "recommend":
        return b"", json.dumps({"histories": histories, "k": k, "beam": beam}).encode()
    padded, lengths = _padded(histories)
    shapes = (list(padded.shape), list(lengths.shape))
    if protocol == "json":
        inputs = [{"name": "histories", "datatype": "INT64", "shape": shapes[0], "data": padded.reshape(-1).tolist()},
                  {"name": "lengths", "datatype": "INT64", "shape": shapes[1], "data": lengths.tolist()}]
        return b"", json.dumps({"inputs": inputs, "parameters": {"k": k, "beam": beam}}).encode()
    if protocol == "binary":
        raws = (padded.tobytes(), lengths.tobytes())
        inputs = [{"name": name, "datatype": "INT64", "shape": shape, "parameters": {"binary_data_size": len(raw)}}
                  for name, shape, raw in zip(("histories", "lengths"), shapes, raws)]
        header = json.dumps({"inputs": inputs, "parameters": {"k": k, "beam": beam, "binary_data_output": True}}).encode()
        return b"Inference-Header-Content-Length: %d\r\n" % len(header), header + b"".join(raws)
    if protocol == "grpc":
        from . import kserve

        request = kserve.ModelInferRequest(model_name=model)
        for name, shape in zip(("histories", "lengths"), shapes):
            request.inputs.add(name=name, datatype="INT64", shape=shape)
        request.raw_input_contents.extend((padded.tobytes(), lengths.tobytes()))
        request.parameters["k"].int64_param = k
        request.parameters["beam"].int64_param = beam
        return b"", request.SerializeToString()
    raise ValueError(f"protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")


# the loadtest never retries: without the retry machinery (on by default) a call buffers nothing for it
GRPC_CHANNEL_OPTIONS = (("grpc.enable_retries", 0),)


def grpc_client() -> str:
    """Which gRPC client the load test runs: gRPC's C++ library (libnezha_grpc) when built, else grpcio's."""
    from .grpc_native import library

    return "gRPC C++ (libnezha_grpc)" if library() is not None else "grpcio"


def grpc_closed_loop(host: str, port: int, bodies: list[tuple[bytes, bytes]], concurrency: int, duration: float,
                     offset: int = 0, timeout: float = 60.0, native: bool | None = None) -> dict:
    """``concurrency`` gRPC clients for ``duration`` s, each sending pre-serialized ModelInferRequest bytes and
    the next when its answer is in (from the completion callback, on grpc's own thread; the answer is not
    decoded, like the HTTP client's). Returns latencies (s) of OK answers, counts by status (OK as 200).
    ``native`` (default: when built): gRPC's C++ client (serve.grpc_native.load), ~50 us of CPU per call
    at one client where grpcio's takes ~160 us (docs/protocols.md); else grpcio's, below."""
    import threading
    import time

    import grpc

    from . import grpc_native, kserve

    if native or (native is None and grpc_native.library() is not None):
        return grpc_native.load(host, port, f"/{kserve.SERVICE}/ModelInfer", [body for _, body in bodies], concurrency,
                                duration, offset, timeout)

    channel = grpc.insecure_channel(f"{host}:{port}", options=GRPC_CHANNEL_OPTIONS)
    call = channel.unary_unary(f"/{kserve.SERVICE}/ModelInfer")
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock, finished = threading.Lock(), threading.Semaphore(0)
    stop = time.perf_counter() + duration

    def send(i: int) -> None:
        t0 = time.perf_counter()
        call.future(bodies[i % len(bodies)][1], timeout=timeout).add_done_callback(lambda f: done(i, t0, f))

    def count(status, t0: float | None = None) -> None:
        with lock:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if t0 is not None:
                latencies.append(time.perf_counter() - t0)

    def done(i: int, t0: float, future) -> None:
        try:
            future.result()
            count(GRPC_OK, t0)
        except grpc.RpcError as e:
            count(e.code().name)
        except grpc.FutureCancelledError:
            count("CANCELLED")
        try:
            if time.perf_counter() < stop:
                return send(i + 1)
        except (grpc.RpcError, ValueError, RuntimeError) as e:     # it cannot send again: it ends, counted
            count(type(e).__name__)
        finished.release()

    t0 = time.perf_counter()
    try:
        for c in range(concurrency):
            send(offset + c * 7919)
        for _ in range(concurrency):
            finished.acquire()
    finally:
        channel.close()
    return {"latencies": latencies, "statuses": statuses, "seconds": time.perf_counter() - t0}


async def check_grpc(host: str, port: int, error: type[Exception]) -> None:
    """Raise ``error`` unless the gRPC server at host:port answers ServerReady with ready."""
    import asyncio

    import grpc

    from . import kserve

    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        ready = channel.unary_unary(f"/{kserve.SERVICE}/ServerReady", request_serializer=kserve.ServerReadyRequest.SerializeToString,
                                    response_deserializer=kserve.ServerReadyResponse.FromString)
        try:
            answer = await asyncio.wait_for(ready(kserve.ServerReadyRequest()), 5)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
            raise error(f"gRPC server {host}:{port} is not reachable: {getattr(e, 'details', lambda: e)()}") from None
    if not answer.ready:
        raise error(f"gRPC server {host}:{port} is not ready")
