"""KServe v2 over gRPC on Ray Serve, through Ray Serve's own gRPC proxy.

Ray Serve's proxy (``serve.start(grpc_options=gRPCOptions(port=..., grpc_servicer_functions=[...]))``)
registers a service from the import path of an ``add_*Servicer_to_server`` function, deserializes each
call with it, and calls the deployment method named like the RPC with the request message (and a
``grpc_context`` keyword when the method takes one), the same replicas that answer HTTP. ``GrpcMethods``
is that method set for a deployment holding a ``Service`` as ``self.service`` (``NezhaDeployment`` in
serve.ray_engine): each RPC runs ``grpc_server.InferenceServicer`` on the replica's service, so that the
answers, validation and messages are the uvicorn engine's, and a refusal sets its status code (the same
mapping) on Ray's context before raising, which Ray passes to the client."""

from __future__ import annotations

import grpc

from . import kserve
from .errors import refusal
from .grpc_server import InferenceServicer, unreadable

SERVICER_FUNCTION = "nezha.serve.grpc_server.add_GRPCInferenceServiceServicer_to_server"


class _Deadline:
    """What InferenceServicer reads of a grpc.aio context: Ray's proxy applies its own
    ``request_timeout_s``; the replica applies --timeout-ms."""

    @staticmethod
    def time_remaining():
        return None


class Refused(RuntimeError):
    """Raised after the status code is set on Ray's gRPC context (Ray sends that code, not INTERNAL)."""


class GrpcMethods:
    """Mixin for a Ray Serve deployment with ``self.service``: the six KServe v2 RPCs (methods named like
    them, added below from the .proto's service)."""

    async def _rpc(self, name: str, request, grpc_context):
        try:
            unreadable(request)
            return await getattr(InferenceServicer(self.service), name)(request, _Deadline())
        except Exception as e:
            told = refusal(e, f"Ray gRPC {name}")
            self.service.metrics.errors.labels(told.kind).inc()
            grpc_context.set_code(grpc.StatusCode[told.grpc_status])
            grpc_context.set_details(str(told))
            raise Refused(str(told)) from None


def _rpc_method(name: str):
    async def rpc(self, request, grpc_context):          # Ray passes grpc_context when the method names it
        return await self._rpc(name, request, grpc_context)
    rpc.__name__ = rpc.__qualname__ = name
    return rpc


for _name in kserve.METHODS:                              # ServerLive ... ModelInfer, as the .proto lists them
    setattr(GrpcMethods, _name, _rpc_method(_name))
