"""A server that does nothing but speak the protocols: ``python -m nezha.bench.null_server --port P --grpc-port G``.

Built like ``nezha serve`` (Starlette on uvicorn, gRPC in the same event loop over grpc.aio or libnezha_grpc
(--grpc-transport), each request handed to a worker thread and its answer back to the loop, as the batcher
does) but with no model: every request gets a fixed answer. ``bench/protocol_cost.py`` against it measures
what uvicorn and the gRPC transports themselves cost per call, client and server (docs/protocols.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

ANSWER = b'{"outputs": []}'


def serve(port: int, grpc_port: int, transport: str = "grpcio") -> None:
    import grpc
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    worker = ThreadPoolExecutor(1)

    async def via_worker() -> None:                       # the batcher's two hops: loop -> worker -> loop
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        worker.submit(loop.call_soon_threadsafe, done.set_result, None)
        await done

    async def http(request):
        await request.body()
        await via_worker()
        return Response(ANSWER, media_type="application/json")

    async def model_infer(request: bytes, context) -> bytes:
        await via_worker()
        return ANSWER

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if transport == "native":
            from nezha.serve import grpc_native
            server = grpc_native.start({"/inference.GRPCInferenceService/ModelInfer": (model_infer, bytes)},
                                       "127.0.0.1", grpc_port, 1 << 20, 1 << 16)
        else:
            server = grpc.aio.server()
            handler = grpc.unary_unary_rpc_method_handler(model_infer)      # bytes in, bytes out
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": handler}),))
            server.add_insecure_port(f"127.0.0.1:{grpc_port}")
            await server.start()
        yield
        await server.stop(1)

    app = Starlette(routes=[Route("/{path:path}", http, methods=["GET", "POST"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--grpc-transport", choices=["grpcio", "native"], default="grpcio")
    a = ap.parse_args(argv)
    serve(a.port, a.grpc_port, a.grpc_transport)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
