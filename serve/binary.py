"""The binary tensor data extension of the Open Inference Protocol over HTTP (KServe v2 / Triton), and
the v2 infer route that speaks it next to JSON.

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

import asyncio
import json
import math

import numpy as np

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
        raise P.BadRequest(f"Inference-Header-Content-Length must be a byte count, got {value[:40]!r}")
    n = int(value)
    if n > body_size:
        raise P.BadRequest(f"Inference-Header-Content-Length is {n} bytes but the whole body is {body_size}")
    return n


def int64_data(name, datatype, shape, raw: memoryview) -> list | None:
    """Raw little-endian INT64 bytes -> a flat list for parse_v2_infer, after checking that their size is
    what the shape needs. None when the datatype or shape is wrong: parse_v2_infer refuses those with its
    own message."""
    if datatype != "INT64" or not (isinstance(shape, list) and all(P._is_int(s) and s >= 0 for s in shape)):
        return None
    needed = math.prod(shape) * 8                             # Python ints: a huge shape cannot overflow
    if len(raw) != needed:
        raise P.BadRequest(f"input {name!r}: {len(raw)} bytes of binary data; INT64 shape {shape} needs {needed}")
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
        if not P._is_int(size) or size < 0:
            raise P.BadRequest(f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
        if "data" in t:
            raise P.BadRequest(f"input {name!r}: both 'data' and binary_data_size given; send one")
        if size > len(blob) - offset:
            raise P.BadRequest(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                               f"({len(blob) - offset} bytes of binary data left)")
        t["data"] = int64_data(name, t.get("datatype"), t.get("shape"), blob[offset:offset + size])
        offset += size
        if not params:
            del t["parameters"]
    if offset != len(blob):
        raise P.BadRequest(f"{len(blob) - offset} bytes of the body follow the inputs' binary data: "
                           f"binary_data_size and Inference-Header-Content-Length do not add up to the body")


def requested_outputs(obj) -> tuple[list[tuple[str, bool]] | None, float | None]:
    """Take the extension's fields out of a parsed v2 request (``obj`` is changed): the outputs to answer,
    each with whether it goes binary (None: every output as JSON, the plain v2 answer), and Triton's
    ``timeout`` parameter (microseconds) as milliseconds."""
    if not isinstance(obj, dict):
        return None, None                                    # parse_v2_infer says what a request is
    params = obj.get("parameters")
    binary_all, timeout_ms = False, None
    if isinstance(params, dict):
        params = obj["parameters"] = dict(params)
        binary_all = params.pop("binary_data_output", False)
        if not isinstance(binary_all, bool):
            raise P.BadRequest(f"parameter binary_data_output must be true or false, got {binary_all!r}")
        if "timeout" in params:
            us = params.pop("timeout")
            if not P._is_int(us) or us <= 0:
                raise P.BadRequest(f"parameter timeout must be a positive number of microseconds, got {us!r}")
            timeout_ms = us / 1e3
    outputs = obj.pop("outputs", None)
    if outputs is None:
        return ([(name, True) for name in OUTPUTS] if binary_all else None), timeout_ms
    if not isinstance(outputs, list):
        raise P.BadRequest(f"'outputs' must be a list of {{\"name\": ...}} objects, got {type(outputs).__name__}")
    wanted = []
    for out in outputs:
        out = P._check_fields(out, ("name", "parameters"), "v2 requested output")
        name = out.get("name")
        if name not in OUTPUTS or name in dict(wanted):
            raise P.BadRequest(f"requested output {name!r}: the outputs are {', '.join(OUTPUTS)}, each at most once")
        flags = P._check_fields(out.get("parameters") or {}, ("binary_data",), f"output {name!r} parameters")
        binary = flags.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise P.BadRequest(f"output {name!r}: binary_data must be true or false, got {binary!r}")
        wanted.append((name, binary))
    return wanted, timeout_ms


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


async def answer_v2(service, name: str, body: bytes, headers: dict, timeout_ms: float | None):
    """POST /v2/models/{name}/infer, JSON or binary -> Reply. A request that asks for no binary output
    gets the plain JSON answer (``protocol.v2_response``), byte for byte as before the extension."""
    from .service import OFFLOAD_BYTES, Reply

    def decode_body():
        limit = service.options.max_body_bytes
        if HEADER in headers:
            n = header_length(headers[HEADER], len(body))
            obj = P.parse_json(body[:n], limit)
            fill_binary_inputs(obj, memoryview(body)[n:])
        else:
            obj = P.parse_json(body, limit)
        return obj, *requested_outputs(obj)

    # a large body is read in a worker thread (as service._parse does), so health answers meanwhile
    obj, wanted, timeout_param = (await asyncio.to_thread(decode_body) if len(body) >= OFFLOAD_BYTES
                                  else decode_body())
    if timeout_param is not None:
        timeout_ms = timeout_param if timeout_ms is None else min(timeout_ms, timeout_param)
    model, query, results = await service.answer(P.parse_v2_infer, obj, timeout_ms, size=len(body))
    if wanted is None or not any(binary for _, binary in wanted):
        names = None if wanted is None else [name for name, _ in wanted]
        return Reply(200, P.v2_response(name, model.version, query.id, results, query.k, names))
    payload, n = binary_response(name, model.version, query.id, output_arrays(results, query.k), wanted)
    return Reply(200, payload, "application/octet-stream", {"Inference-Header-Content-Length": str(n)})
