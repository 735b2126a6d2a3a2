"""Recompile grpc_predict_v2.proto into grpc_predict_v2.txtpb (needs grpcio-tools, which bundles protoc):
``python -m nezha.serve.kserve [DEST_FOLDER]``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_predict_v2.proto"


def compiled_text() -> str:
    """The .proto's FileDescriptorProto in protobuf text format (source info stripped: stable output)."""
    from google.protobuf import descriptor_pb2, text_format
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        if protoc.main(["protoc", f"-I{HERE}", f"--descriptor_set_out={out}", str(HERE / PROTO)]) != 0:
            raise RuntimeError(f"protoc failed on {HERE / PROTO}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return f"# Compiled from {PROTO} by `python -m nezha.serve.kserve`: do not edit.\n" + text_format.MessageToString(files[0])


def write(dest: Path = HERE) -> Path:
    target = Path(dest) / "grpc_predict_v2.txtpb"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(compiled_text())
    tmp.replace(target)                                   # atomic: an importer never reads half a file
    return target


if __name__ == "__main__":
    print(f"wrote {write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)}")
