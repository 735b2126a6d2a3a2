"""KServe v2 over gRPC (``inference.GRPCInferenceService``): ``nezha serve ART --grpc-port PORT``.

The servicer is a thin layer over the HTTP server's ``Service``: the same model, batcher, deadlines,
validation and metrics. A ModelInfer request becomes the same parsed v2 request the JSON route builds
(typed ``contents.int64_contents`` or ``raw_input_contents``, sizes checked against the shape first),
goes through ``protocol.parse_v2_infer`` with its messages, and its answer comes back as
``raw_output_contents`` (typed ``contents`` when the request sent typed contents). Errors are gRPC status
codes: INVALID_ARGUMENT (the library's message), NOT_FOUND, RESOURCE_EXHAUSTED (queue full; messages over
--max-body-bytes are refused by gRPC itself with the same code), DEADLINE_EXCEEDED (--timeout-ms, or the
client's gRPC deadline, whichever is first), UNAVAILABLE (starting, draining). There are no control calls
over gRPC: reloads are POST /admin/reload over HTTP (the repository RPCs answer UNIMPLEMENTED).

The servicer runs in the same event loop as uvicorn (started and stopped by the app's lifespan), so a
request's future, deadline and metrics live where the HTTP ones do, over one of two transports
(``start_grpc``): gRPC's C++ library (serve/grpc_native.py, libnezha_grpc) when it is built, else
grpc.aio."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from nezha.runtime.errors import InputError

from . import kserve
from . import protocol as P
from .errors import refusal
from .binary import OUTPUTS, int64_data, output_arrays

log = logging.getLogger("nezha.serve")

_CONTENTS = {"items": "int64_contents", "scores": "fp32_contents", "counts": "int64_contents"}


def parameter_value(p):
    """InferParameter -> its Python value (None when unset)."""
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def v2_request(request) -> tuple[dict, bool]:
    """ModelInferRequest -> (the JSON-shaped v2 request parse_v2_infer reads, whether its inputs were raw)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input, in order")
    inputs = []
    for i, t in enumerate(request.inputs):
        tensor = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if raw:
            if t.HasField("contents"):
                raise InputError(f"input {t.name!r}: both contents and raw_input_contents given; send one")
            tensor["data"] = int64_data(t.name, t.datatype, tensor["shape"], memoryview(raw[i]))
        else:
            tensor["data"] = list(t.contents.int64_contents)
        inputs.append(tensor)
    obj = {"inputs": inputs}
    if request.id:
        obj["id"] = request.id
    if request.parameters:
        obj["parameters"] = {key: parameter_value(p) for key, p in request.parameters.items()}
    if request.outputs:
        obj["outputs"] = [{"name": o.name, "parameters": {key: parameter_value(p) for key, p in o.parameters.items()}}
                          for o in request.outputs]
    return obj, bool(raw)


def infer_response(name: str, version: str, rid: str | None, arrays: dict[str, np.ndarray],
                   wanted: list[str], raw: bool):
    response = kserve.ModelInferResponse(model_name=name, model_version=version, id=rid or "")
    for out in wanted:
        a = arrays[out]
        tensor = response.outputs.add(name=out, datatype=OUTPUTS[out][0], shape=a.shape)
        if raw:
            response.raw_output_contents.append(a.tobytes())
        else:
            getattr(tensor.contents, _CONTENTS[out]).extend(a.reshape(-1).tolist())
    return response


class InferenceServicer:
    """The six v2 RPCs over one ``Service``; each method takes (request, context) like grpc.aio's."""

    def __init__(self, service):
        self.service = service

    async def ServerLive(self, request, context):
        return kserve.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return kserve.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):
        self.service.served_model(request.name, request.version)
        return kserve.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request, context):
        from .binary import EXTENSION
        return kserve.ServerMetadataResponse(name="nezha-serve", version=P.server_version(), extensions=[EXTENSION])

    async def ModelMetadata(self, request, context):
        model = self.service.served_model(request.name, request.version)
        meta = kserve.ModelMetadataResponse
        return meta(name=request.name, versions=[model.version], platform="nezha",
                    inputs=[meta.TensorMetadata(**t) for t in P.V2_INPUTS],
                    outputs=[meta.TensorMetadata(**t) for t in P.V2_OUTPUTS])

    async def ModelInfer(self, request, context):
        self.service.served_model(request.model_name, request.model_version)
        obj, raw = v2_request(request)
        wanted, timeout_ms = P.requested_outputs(obj)       # Triton's timeout parameter; binary_data: moot here
        remaining = context.time_remaining()               # the client's gRPC deadline, seconds (None: none)
        if remaining is not None:
            timeout_ms = min(timeout_ms or np.inf, max(remaining, 1e-3) * 1e3)
        model, query, results = await self.service.answer(P.parse_v2_infer, obj, timeout_ms)
        names = [n for n, _ in wanted] if wanted else list(OUTPUTS)
        return infer_response(request.model_name, model.version, query.id, output_arrays(results, query.k), names, raw)


def _metered(service, name: str, method):
    """One RPC for grpc.aio: errors -> status codes, metrics under the route ``grpc:NAME`` with the HTTP
    status the same answer has over HTTP (one label set for both protocols)."""
    route = f"grpc:{name}"

    async def call(request, context):
        t0, status = time.perf_counter(), 200
        try:
            unreadable(request)
            return await method(request, context)
        except asyncio.CancelledError:                     # the client went away or its deadline passed
            status = 499                                   # nginx's "client closed request", as a label only
            raise
        except Exception as e:
            told = refusal(e, route)
            status = told.http_status
        finally:
            if name == "ModelInfer":
                service.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            service.metrics.requests.labels(route, str(status)).inc()
        service.metrics.errors.labels(told.kind).inc()
        await context.abort(grpc.StatusCode[told.grpc_status], str(told))
    return call


def _reader(message):
    """``message.FromString`` that answers bytes which are no such message with an InputError (the RPC then
    refuses it: INVALID_ARGUMENT), where grpcio would fail the call as UNKNOWN with a traceback in the log."""
    def read(data: bytes):
        try:
            return message.FromString(data)
        except DecodeError as e:
            return InputError(f"the request is not a valid {message.DESCRIPTOR.full_name} message: {e}")
    return read


def unreadable(request) -> None:
    """Raise the InputError that ``_reader`` put in place of a request it could not read."""
    if isinstance(request, InputError):
        raise request


def add_GRPCInferenceServiceServicer_to_server(servicer, server) -> None:
    """Register ``servicer``'s methods (ServerLive ... ModelInfer) as ``inference.GRPCInferenceService``,
    as a generated ``*_pb2_grpc`` module would; Ray Serve's gRPC proxy takes this function's import path."""
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=_reader(req),
                                                          response_serializer=resp.SerializeToString)
                for name, (req, resp) in kserve.METHODS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(kserve.SERVICE, handlers),))


async def start_grpc(service, host: str, port: int, transport: str = "auto"):
    """Bind ``host:port`` and serve the v2 RPCs over ``service``; ``await server.stop(grace)`` drains.
    ``transport``: native (gRPC's C++ server, serve/grpc_native.py), grpcio (grpc.aio), or auto: native when
    libnezha_grpc is built, else grpcio."""
    from . import grpc_native

    limit = service.options.max_body_bytes
    max_calls = 4 * service.options.max_queue          # bounded like HTTP: at most 4x --max-queue RPCs in flight
    metered = {name: _metered(service, name, getattr(InferenceServicer(service), name)) for name in kserve.METHODS}
    native = transport == "native" or (transport == "auto" and grpc_native.library() is not None)
    if native:
        server = grpc_native.start({f"/{kserve.SERVICE}/{name}": (method, _reader(kserve.METHODS[name][0]))
                                    for name, method in metered.items()}, host, port, limit, max_calls,
                                   read_timeout=service.options.body_timeout_s)
    else:
        # messages over --max-body-bytes refused with RESOURCE_EXHAUSTED, as the native transport does
        server = grpc.aio.server(maximum_concurrent_rpcs=max_calls, options=[("grpc.max_receive_message_length", limit)])
        add_GRPCInferenceServiceServicer_to_server(SimpleNamespace(**metered), server)
        try:
            server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:                          # grpc's "Failed to bind": the port is taken
            raise OSError(f"gRPC cannot listen on {host}:{port}: {e}") from None
        await server.start()
    log.info("gRPC (KServe v2) on %s:%d (%s)", host, port, "gRPC C++, libnezha_grpc" if native else "grpc.aio")
    return server
