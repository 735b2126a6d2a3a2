"""The binary tensor data extension of the Open Inference Protocol over HTTP (KServe v2 / Triton): its wire
format. The v2 infer route (``Service.infer_v2``) speaks it next to JSON; the extension's request fields
(``binary_data_output``, ``binary_data``, ``timeout``) are read with ``outputs`` by ``protocol.requested_outputs``.

A binary request is a JSON header of ``Inference-Header-Content-Length`` bytes followed by each input's
raw little-endian bytes, in input order, ``parameters.binary_data_size`` bytes each. Outputs come back
the same way when the request asks (``binary_data_output`` for all, an output's ``binary_data`` for one),
with the answer's header length in the same header. tritonclient.http does both by default.

Every size a client states is checked against the body already read (which the route bounded by
--max-body-bytes) before anything is decoded, so that a lying size is a 400, never an allocation: the
raw bytes are read in place (``np.frombuffer``). The decoded inputs then go through the JSON path's own
validation (``protocol.parse_v2_infer``: datatype, shape, lengths, the library's item checks and
messages), so that both encodings refuse the same requests with the same words."""

from __future__ import annotations

import json
import math

import numpy as np

from nezha.runtime.errors import InputError

from . import protocol as P

EXTENSION = "binary_tensor_data"
HEADER = "inference-header-content-length"
# name -> (v2 datatype, little-endian numpy dtype), in the order the outputs are answered
OUTPUTS = {"items": ("INT64", "<i8"), "scores": ("FP32", "<f4"), "counts": ("INT64", "<i8")}
_MAX_HEADER_DIGITS = 19                                       # int64: a longer count is refused unread


def output_arrays(results: list[list[tuple[int, float]]], k: int) -> dict[str, np.ndarray]:
    """Per history up to k (item, score) pairs -> items [B, k] int64 (-1 pads), scores [B, k] float32 (0
    pads; the library's float32 scores, exact), counts [B] int64."""
    B = len(results)
    items = np.full((B, k), -1, dtype=OUTPUTS["items"][1])
    scores = np.zeros((B, k), dtype=OUTPUTS["scores"][1])
    for b, r in enumerate(results):
        if r:
            ids, values = zip(*r)
            items[b, :len(r)], scores[b, :len(r)] = ids, values
    return {"items": items, "scores": scores, "counts": np.array([len(r) for r in results], OUTPUTS["counts"][1])}


def header_length(value: str, body_size: int) -> int:
    """The Inference-Header-Content-Length header -> the JSON header's size in bytes (within the body)."""
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_HEADER_DIGITS):
        raise InputError(f"Inference-Header-Content-Length must be a byte count, got {value[:40]!r}")
    n = int(value)
    if n > body_size:
        raise InputError(f"Inference-Header-Content-Length is {n} bytes but the whole body is {body_size}")
    return n


def int64_data(name, datatype, shape, raw: memoryview) -> list | None:
    """Raw little-endian INT64 bytes -> a flat list for parse_v2_infer, after checking that their size is
    what the shape needs. None when the datatype or shape is wrong: parse_v2_infer refuses those with its
    own message."""
    if datatype != "INT64" or not (isinstance(shape, list) and all(P.is_int64(s) and s >= 0 for s in shape)):
        return None
    needed = math.prod(shape) * 8                             # Python ints: a huge shape cannot overflow
    if len(raw) != needed:
        raise InputError(f"input {name!r}: {len(raw)} bytes of binary data; INT64 shape {shape} needs {needed}")
    return np.frombuffer(raw, dtype="<i8").tolist()


def fill_binary_inputs(obj, blob: memoryview) -> None:
    """Replace each input's ``binary_data_size`` by its ``data``, read from ``blob`` (the body after the
    JSON header) in input order; the sizes must add up to the blob exactly."""
    inputs = obj.get("inputs") if isinstance(obj, dict) else None
    offset = 0
    for t in inputs if isinstance(inputs, list) else ():     # not a list: parse_v2_infer says so
        params = t.get("parameters") if isinstance(t, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        name, size = t.get("name"), params.pop("binary_data_size")
        if not P.is_int64(size) or size < 0:
            raise InputError(f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
        if "data" in t:
            raise InputError(f"input {name!r}: both 'data' and binary_data_size given; send one")
        if size > len(blob) - offset:
            raise InputError(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                               f"({len(blob) - offset} bytes of binary data left)")
        t["data"] = int64_data(name, t.get("datatype"), t.get("shape"), blob[offset:offset + size])
        offset += size
        if not params:
            del t["parameters"]
    if offset != len(blob):
        raise InputError(f"{len(blob) - offset} bytes of the body follow the inputs' binary data: "
                           f"binary_data_size and Inference-Header-Content-Length do not add up to the body")


def binary_response(model_name: str, version: str, rid: str | None, arrays: dict[str, np.ndarray],
                    wanted: list[tuple[str, bool]]) -> tuple[bytes, int]:
    """-> (body, JSON header length): the header names every output, the binary ones' bytes follow it."""
    outputs, blobs = [], []
    for name, binary in wanted:
        a = arrays[name]
        tensor = {"name": name, "datatype": OUTPUTS[name][0], "shape": list(a.shape)}
        if binary:
            blobs.append(a.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = a.reshape(-1).tolist()
        outputs.append(tensor)
    head = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if rid is not None:
        head["id"] = rid
    header = json.dumps(head, separators=(",", ":")).encode()
    return header + b"".join(blobs), len(header)
