"""The single-machine engine: a Starlette app on uvicorn around ``Service``.

Why Starlette (not FastAPI): the server validates bodies itself, strictly and in one place, so that a bad
request gets the library's message; FastAPI's pydantic layer would add a second validator with other
messages (and 422 instead of 400) for no gain. Starlette is the ASGI core FastAPI is built on, and its
``Request`` is what Ray Serve hands to a deployment, so one handler serves both engines. uvicorn is the
reference ASGI server: HTTP/1.1 keep-alive, graceful shutdown that lets in-flight requests finish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nezha.runtime.errors import PayloadTooLarge, RequestRefused

from .connections import ConnectionLimits, Guard
from .service import Reply, Service

log = logging.getLogger("nezha.serve")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise PayloadTooLarge(f"request body is {declared} bytes; at most {limit} allowed (--max-body-bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:                 # gone, or evicted by serve.connections at the connection cap
        raise RequestRefused(499, "the client closed the connection before its request body was complete") from None
    return b"".join(chunks)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a string echoed from a request may hold a lone surrogate
    (``"\\ud800"`` is valid JSON), which Starlette's UTF-8 encoding cannot encode (a 500 after the reply was
    counted); escaped, every answer encodes, so the metrics count what was sent."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def to_response(reply: Reply) -> Response:
    if isinstance(reply.body, bytes):
        return Response(reply.body, reply.status, reply.headers, media_type=reply.content_type)
    return AsciiJSONResponse(reply.body, reply.status, reply.headers)


async def dispatch(service: Service, request: Request) -> Response:
    reply = await service.handle(request.method, request.url.path, lambda limit: read_body(request, limit),
                                 dict(request.headers))
    return to_response(reply)


def create_app(service: Service, reload_on_sighup: bool = False, grpc_port: int | None = None,
               grpc_host: str = "127.0.0.1", drain_timeout: float = 30.0, grpc_transport: str = "auto") -> Starlette:
    """The ASGI app: every path goes to ``service.handle``; startup loads the model, shutdown drains.
    With ``grpc_port`` the KServe v2 gRPC service (serve.grpc_server) runs alongside, in the same loop, over
    ``grpc_transport`` (serve.grpc_server.start_grpc)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        grpc_server = None
        if grpc_port is not None:
            from .grpc_server import start_grpc
            grpc_server = await start_grpc(service, grpc_host, grpc_port, grpc_transport)
        loop = asyncio.get_running_loop()
        if reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_sighup_reload(service)))
        try:
            yield
        finally:
            if reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            if grpc_server is not None:                      # in-flight RPCs finish before the batcher closes
                await grpc_server.stop(drain_timeout)
            await service.stop()

    async def endpoint(request: Request) -> Response:
        return await dispatch(service, request)

    async def other_method(request: Request, exc) -> Response:
        return await dispatch(service, request)

    # every other method (OPTIONS, TRACE, ...) also goes to the service: its JSON 405, counted in the metrics
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)], lifespan=lifespan,
                     exception_handlers={405: other_method})


async def _sighup_reload(service: Service) -> None:
    try:
        model = await service.reload()
        log.info("SIGHUP: now serving version %s", model.version)
    except Exception as e:                                       # logged: a signal has nobody to answer to
        log.error("SIGHUP: %s", e)


def uvicorn_config(service: Service, host: str = "127.0.0.1", port: int = 8000, limits: ConnectionLimits | None = None,
                   drain_timeout: float = 30.0, log_level: str = "info", reload_on_sighup: bool = False,
                   grpc_port: int | None = None, grpc_transport: str = "auto"):
    """uvicorn's Config for ``service``, its connections held to ``limits`` (serve.connections)."""
    import uvicorn

    limits = limits or ConnectionLimits()
    metrics = service.metrics
    guard = Guard(limits, on_close=lambda reason: metrics.connections_closed.labels(reason).inc(),
                  on_count=metrics.connections.set)
    app = create_app(service, reload_on_sighup=reload_on_sighup, grpc_port=grpc_port, grpc_host=host,
                     drain_timeout=drain_timeout, grpc_transport=grpc_transport)
    return uvicorn.Config(app, host=host, port=port,
                          log_level=log_level, timeout_graceful_shutdown=drain_timeout, access_log=False, lifespan="on",
                          http=guard.protocol(), timeout_keep_alive=limits.keep_alive_timeout_s)


def run(service: Service, host: str = "127.0.0.1", port: int = 8000, limits: ConnectionLimits | None = None,
        drain_timeout: float = 30.0, log_level: str = "info", grpc_port: int | None = None,
        grpc_transport: str = "auto") -> None:
    """Serve until SIGINT/SIGTERM (then drain: in-flight requests finish, new ones get 503); SIGHUP reloads."""
    import uvicorn

    uvicorn.Server(uvicorn_config(service, host, port, limits, drain_timeout, log_level, reload_on_sighup=True,
                                  grpc_port=grpc_port, grpc_transport=grpc_transport)).run()
