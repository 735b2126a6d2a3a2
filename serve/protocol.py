"""Request parsing and response shapes, shared by both engines (uvicorn and Ray Serve).

Parsing is strict and happens in one place: a body is bounded in size, must be UTF-8 JSON without
NaN/Infinity, and every field is checked for its exact JSON type (``true`` is not an item id, ``5.0``
is not an integer: the library's own strict checks of item ids, with their messages) and answered with
HTTP 400 and the library's message (``InputError``)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import numpy as np

from nezha.runtime.errors import InputError, NezhaError, PayloadTooLarge, RequestRefused, clipped


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def parse_json(body: bytes, limit: int) -> object:
    """Bytes -> a JSON value. Bodies over ``limit`` bytes, invalid UTF-8, invalid JSON, NaN/Infinity,
    duplicate keys in an object, integers past Python's digit limit and nesting too deep for the parser
    are refused with an InputError naming the problem."""
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; at most {limit} allowed (--max-body-bytes)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"request body is not UTF-8: {e}") from None

    def no_constant(name):
        raise InputError(f"request body is not valid JSON: {name} is not a JSON number")
    try:
        return json.loads(text, parse_constant=no_constant, object_pairs_hook=_unique_keys)
    except InputError:
        raise
    except json.JSONDecodeError as e:
        raise InputError(f"request body is not valid JSON: {e}") from None
    except ValueError:                  # the only other one json raises: int() past sys.get_int_max_str_digits()
        raise InputError(f"request body holds an integer of more than {sys.get_int_max_str_digits()} digits; "
                         f"numbers in a request must fit int64") from None
    except RecursionError:
        raise InputError("request body is nested too deeply to be a request") from None


def _unique_keys(pairs: list) -> dict:
    """json's object hook: a key given twice is refused (json.loads would keep the last one silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise InputError(f"request body is ambiguous: key {dup[:40]!r} appears twice in one object")
    return obj


def is_int64(x) -> bool:
    return type(x) is int and INT64_MIN <= x <= INT64_MAX          # bool is a subclass of int: refused


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", type(None): "null"}


def describe(x) -> str:
    """A JSON value as a message shows it: short, with its JSON type."""
    if isinstance(x, bool):
        return f"{json.dumps(x)} (a boolean)"
    if isinstance(x, float):
        return f"{x!r} (a float)"
    if isinstance(x, int):
        return f"{x}" if INT64_MIN <= x <= INT64_MAX else f"{str(x)[:30]}... (outside int64)"
    if x is None:
        return "null"
    text = json.dumps(x[:41]) if isinstance(x, str) else clipped(x)     # never the whole of a 1 MiB value
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({_JSON_TYPES.get(type(x), type(x).__name__)})"


@dataclass
class Query:
    """A validated request: per history its [n, L] int64 codes (``Recommender.prepare``'s), and k, beam for
    all of them."""

    codes: list[np.ndarray]
    k: int
    beam: int
    id: str | None = None


def check_fields(obj, allowed: tuple[str, ...], what: str) -> dict:
    if not isinstance(obj, dict):
        raise InputError(f"{what} must be a JSON object with {', '.join(allowed)}; got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise InputError(f"{what}: unknown field {unknown[0][:40]!r}; allowed: {', '.join(allowed) or 'none'}")
    return obj


def _optional_object(obj: dict, key: str, allowed: tuple[str, ...], what: str) -> dict:
    """``obj[key]`` when given: a JSON object with only ``allowed`` keys (null, [], 0 or "" are refused, not
    taken for "none"); {} when absent."""
    if key not in obj:
        return {}
    value = obj[key]
    if not isinstance(value, dict):
        raise InputError(f"{what}: {key!r} must be a JSON object, got {describe(value)}")
    return check_fields(value, allowed, f"{what} {key}")


def parse_recommend(obj, rec, max_histories: int) -> Query:
    """``{"histories": [[item, ...], ...], "k": 10, "beam": 20, "unknown": "error"}`` -> Query."""
    obj = check_fields(obj, ("histories", "k", "beam", "unknown"), "/v1/recommend body")
    if "histories" not in obj:
        raise InputError("/v1/recommend body: missing field 'histories' (a list of item-id lists)")
    histories = obj["histories"]
    if not isinstance(histories, list):
        raise InputError(f"histories must be a list of item-id lists, got {type(histories).__name__}")
    if len(histories) > max_histories:
        raise InputError(f"{len(histories)} histories in one request; at most {max_histories} allowed")
    return prepared(rec, histories, obj.get("k", 10), obj.get("beam"), obj.get("unknown", "error"))


def prepared(rec, histories: list, k, beam, unknown) -> Query:
    """k, beam and the item-id histories checked and mapped to codes by the library itself
    (``Recommender.beam_for``, ``Recommender.prepare``: bools, floats, strings, nesting, int64 range, unknown
    items, empty histories), with its rules, order and messages, before anything is queued: 400."""
    try:
        beam = rec.beam_for(k, beam)
        return Query(rec.prepare(histories, unknown), k, beam)
    except NezhaError as e:
        raise InputError(str(e)) from None


def recommend_response(results: list[list[tuple[int, float]]]) -> dict:
    return {"results": [[{"item": i, "score": s} for i, s in r] for r in results]}


# --- Open Inference Protocol (KServe v2) ---------------------------------------------------------------
# Inputs: "histories" INT64 [B, T], row b's items are its first lengths[b] entries (oldest first; the rest
# is padding and ignored), and "lengths" INT64 [B]. Parameters (request level): k, beam, unknown.
# Outputs: "items" INT64 [B, k] (-1 where fewer than k), "scores" FP32 [B, k] (0 where fewer), "counts" INT64 [B].

V2_INPUTS = [{"name": "histories", "datatype": "INT64", "shape": [-1, -1]},
             {"name": "lengths", "datatype": "INT64", "shape": [-1]}]
V2_PARAMETERS = ("k", "beam", "unknown")
V2_INPUT_PARAMETERS: tuple[str, ...] = ()        # per-tensor parameters understood (none yet)
V2_OUTPUTS = [{"name": "items", "datatype": "INT64", "shape": [-1, -1]},
              {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
              {"name": "counts", "datatype": "INT64", "shape": [-1]}]
V2_OUTPUT_NAMES = [o["name"] for o in V2_OUTPUTS]


def _flatten(data, shape: list[int], name: str) -> list:
    """v2 tensor data: flat row-major, or nested to the tensor's shape."""
    if not isinstance(data, list):
        raise InputError(f"input {name!r}: data must be a list, got {type(data).__name__}")
    if data and isinstance(data[0], list) and len(shape) == 2:
        if len(data) != shape[0] or any(not isinstance(r, list) or len(r) != shape[1] for r in data):
            raise InputError(f"input {name!r}: nested data does not match shape {shape}")
        data = [x for r in data for x in r]
    expected = math.prod(shape)                     # Python ints: np.prod wraps around past int64
    if len(data) != expected:
        raise InputError(f"input {name!r}: {len(data)} values for shape {shape} ({expected} expected)")
    for pos, x in enumerate(data):
        if not is_int64(x):
            raise InputError(f"input {name!r} must hold INT64 values, got {describe(x)} at position {pos}")
    return data


def parse_v2_infer(obj, rec, max_histories: int) -> Query:
    """A v2 inference request (see V2_INPUTS; its ``outputs`` taken out first by requested_outputs) -> Query."""
    obj = check_fields(obj, ("id", "inputs", "outputs", "parameters"), "v2 inference request")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InputError(f"v2 inference request: id must be a string, got {type(rid).__name__}")
    params = _optional_object(obj, "parameters", V2_PARAMETERS, "v2 inference request")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list):
        raise InputError("v2 inference request: 'inputs' must be a list of tensors 'histories' and 'lengths'")
    tensors = {}
    for t in inputs:
        t = check_fields(t, ("name", "shape", "datatype", "data", "parameters"), "v2 input tensor")
        name = t.get("name")
        if name not in ("histories", "lengths") or name in tensors:
            raise InputError(f"v2 input {describe(name)}: expected the inputs 'histories' INT64 [B, T] and 'lengths' INT64 [B], once each")
        if t.get("datatype") != "INT64":
            raise InputError(f"input {name!r}: datatype must be INT64, got {describe(t.get('datatype'))}")
        _optional_object(t, "parameters", V2_INPUT_PARAMETERS, f"input {name!r}")
        shape, rank = t.get("shape"), 2 if name == "histories" else 1
        if not isinstance(shape, list) or len(shape) != rank or not all(is_int64(s) and s >= 0 for s in shape):
            raise InputError(f"input {name!r}: shape must be {rank} non-negative integers, got {describe(shape)}")
        tensors[name] = (shape, _flatten(t.get("data"), shape, name))
    if set(tensors) != {"histories", "lengths"}:
        raise InputError("v2 inference request: needs the inputs 'histories' INT64 [B, T] and 'lengths' INT64 [B]")
    (hshape, hdata), (lshape, lengths) = tensors["histories"], tensors["lengths"]
    B, T = hshape
    if lshape[0] != B:
        raise InputError(f"input 'lengths' has {lshape[0]} values for {B} histories")
    if B > max_histories:
        raise InputError(f"{B} histories in one request; at most {max_histories} allowed")
    histories = []
    for b, n in enumerate(lengths):
        if not 0 <= n <= T:
            raise InputError(f"lengths[{b}] = {n}; must lie in 0..{T} (the histories tensor's second dimension)")
        histories.append(hdata[b * T:b * T + n])
    query = prepared(rec, histories, params.get("k", 10), params.get("beam"), params.get("unknown", "error"))
    query.id = rid
    return query


def requested_outputs(obj) -> tuple[list[tuple[str, bool]] | None, float | None]:
    """Take the outputs and the binary extension's fields out of a parsed v2 request (``obj`` is changed,
    before parse_v2_infer reads the rest): the outputs to answer, each at most once with whether it goes
    binary (None: every output as JSON, the plain v2 answer), and Triton's ``timeout`` parameter
    (microseconds) as milliseconds. The one check of ``outputs`` (HTTP JSON, HTTP binary, gRPC)."""
    if not isinstance(obj, dict):
        return None, None                                    # parse_v2_infer says what a request is
    params = obj.get("parameters")
    binary_all, timeout_ms = False, None
    if isinstance(params, dict):
        params = obj["parameters"] = dict(params)
        binary_all = params.pop("binary_data_output", False)
        if not isinstance(binary_all, bool):
            raise InputError(f"parameter binary_data_output must be true or false, got {binary_all!r}")
        if "timeout" in params:
            us = params.pop("timeout")
            if not is_int64(us) or us <= 0:
                raise InputError(f"parameter timeout must be a positive number of microseconds, got {us!r}")
            timeout_ms = us / 1e3
    outputs = obj.pop("outputs", None)
    if outputs is None:
        return ([(name, True) for name in V2_OUTPUT_NAMES] if binary_all else None), timeout_ms
    if not isinstance(outputs, list):
        raise InputError(f"'outputs' must be a list of {{\"name\": ...}} objects, got {type(outputs).__name__}")
    wanted = []
    for out in outputs:
        out = check_fields(out, ("name", "parameters"), "v2 requested output")
        name = out.get("name")
        if name not in V2_OUTPUT_NAMES or name in dict(wanted):
            raise InputError(f"requested output {name!r}: the outputs are {', '.join(V2_OUTPUT_NAMES)}, each at most once")
        flags = check_fields(out.get("parameters") or {}, ("binary_data",), f"output {name!r} parameters")
        binary = flags.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise InputError(f"output {name!r}: binary_data must be true or false, got {binary!r}")
        wanted.append((name, binary))
    return wanted, timeout_ms


def v2_response(model_name: str, version: str, rid: str | None, results, k: int,
                outputs: list[str] | None = None) -> dict:
    """The v2 answer: every output of V2_OUTPUTS, or only those named in ``outputs`` (in V2_OUTPUTS' order)."""
    B = len(results)
    items = np.full((B, k), -1, dtype=np.int64)
    scores = np.zeros((B, k), dtype=np.float64)
    for b, r in enumerate(results):
        for j, (i, s) in enumerate(r):
            items[b, j], scores[b, j] = i, s
    out = {"model_name": model_name, "model_version": version,
           "outputs": [{"name": "items", "datatype": "INT64", "shape": [B, k], "data": items.reshape(-1).tolist()},
                       {"name": "scores", "datatype": "FP32", "shape": [B, k], "data": scores.reshape(-1).tolist()},
                       {"name": "counts", "datatype": "INT64", "shape": [B], "data": [len(r) for r in results]}]}
    if outputs is not None:
        out["outputs"] = [o for o in out["outputs"] if o["name"] in outputs]
    if rid is not None:
        out["id"] = rid
    return out


def timeout_header(value: str | None) -> float | None:
    """The x-nezha-timeout-ms header -> milliseconds (None: not given)."""
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        raise InputError(f"x-nezha-timeout-ms must be a number of milliseconds, got {value!r}") from None
    if not 0 < ms <= 600_000:
        raise InputError(f"x-nezha-timeout-ms must lie in (0, 600000], got {value!r}")
    return ms


def server_version() -> str:
    from nezha import __version__
    return __version__


def allow(method: str, allowed: str) -> None:
    """RequestRefused (405) unless ``method`` is ``allowed``."""
    if method != allowed:
        raise RequestRefused(405, f"method {method} not allowed here; use {allowed}")
