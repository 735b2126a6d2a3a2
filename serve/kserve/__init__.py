"""The KServe v2 gRPC protocol's messages, built from grpc_predict_v2.proto (written here from the public
specification) in a private descriptor pool.

Why not generated ``*_pb2.py`` modules, ours or tritonclient's: both register the messages under the
spec's names (``inference.ModelInferRequest``...) in protobuf's process-wide default pool, and a second
copy of those names (tritonclient.grpc, kserve, any other v2 stub imported in the same process: a test,
a Ray app that also calls Triton) fails at import with "duplicate symbol". A private pool keeps the spec's
package and service names (``inference.GRPCInferenceService``, what clients call) and coexists with any
of them. It also needs no compiler and no generated-code version check at run time: the compiled
descriptor ships as text (grpc_predict_v2.txtpb), which any protobuf >= 5.26 reads. tritonclient's
modules would tie the server to a client package and its pins (protobuf < 7)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

HERE = Path(__file__).resolve().parent
SERVICE = "inference.GRPCInferenceService"
DESCRIPTOR_TEXT = HERE / "grpc_predict_v2.txtpb"

_pool = descriptor_pool.DescriptorPool()
_pool.Add(text_format.Parse(DESCRIPTOR_TEXT.read_text(), descriptor_pb2.FileDescriptorProto()))


def _message(name: str):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest, ServerLiveResponse = _message("ServerLiveRequest"), _message("ServerLiveResponse")
ServerReadyRequest, ServerReadyResponse = _message("ServerReadyRequest"), _message("ServerReadyResponse")
ModelReadyRequest, ModelReadyResponse = _message("ModelReadyRequest"), _message("ModelReadyResponse")
ServerMetadataRequest, ServerMetadataResponse = _message("ServerMetadataRequest"), _message("ServerMetadataResponse")
ModelMetadataRequest, ModelMetadataResponse = _message("ModelMetadataRequest"), _message("ModelMetadataResponse")
ModelInferRequest, ModelInferResponse = _message("ModelInferRequest"), _message("ModelInferResponse")
InferParameter = _message("InferParameter")

# rpc name -> (request class, response class): the service's methods, read from the .proto itself
METHODS = {m.name: (message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type))
           for m in _pool.FindServiceByName(SERVICE).methods}
