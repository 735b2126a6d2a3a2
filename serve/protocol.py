"""Request parsing and response shapes, shared by both engines (uvicorn and Ray Serve).

Parsing is strict and happens in one place: a body is bounded in size, must be UTF-8 JSON without
NaN/Infinity, and every field is checked for its exact JSON type (``true`` is not an item id, ``5.0``
is not an integer: the library's own strict checks of item ids, with their messages) and answered with
HTTP 400 and the library's message (``RequestError``, ``EncodingError``). All errors here derive from
``NezhaError``."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from nezha.runtime.encoding import history_codes
from nezha.runtime.errors import NezhaError, clipped

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class ServeError(NezhaError):
    """A request the server refuses; ``status`` is its HTTP status, ``kind`` its metrics label and ``headers``
    what the answer must carry besides."""

    status, kind = 500, "internal"
    headers: dict = {}


class BadRequest(ServeError, ValueError):
    status, kind = 400, "bad_request"


class PayloadTooLarge(ServeError, ValueError):
    status, kind = 413, "too_large"


class NotFound(ServeError, LookupError):
    status, kind = 404, "not_found"


class Overloaded(ServeError, RuntimeError):
    """The bounded queue is full: answered at once so that latency stays bounded (clients retry)."""

    status, kind = 429, "overloaded"


class Unavailable(ServeError, RuntimeError):
    """Not ready: starting, draining for shutdown, or without a model."""

    status, kind = 503, "unavailable"


class DeadlineExceeded(ServeError, TimeoutError):
    status, kind = 504, "deadline"


class Conflict(ServeError, RuntimeError):
    status, kind = 409, "conflict"


class Unauthorized(ServeError, PermissionError):
    status, kind = 401, "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="nezha-admin"'}            # RFC 6750: names the scheme


class Forbidden(ServeError, PermissionError):
    status, kind = 403, "forbidden"


class RequestTimeout(ServeError, TimeoutError):
    """The body did not arrive in time (--body-timeout); the connection is closed after the answer."""

    status, kind = 408, "request_timeout"
    headers = {"Connection": "close"}                   # the rest of the body may still be on its way


class ClientGone(ServeError, ConnectionError):
    """Nobody reads this answer; counted under nginx's 499 ("client closed request")."""
    status, kind = 499, "client_gone"


class UnsupportedMediaType(ServeError, ValueError):
    status, kind = 415, "media_type"


def parse_json(body: bytes, limit: int) -> object:
    """Bytes -> a JSON value. Bodies over ``limit`` bytes, invalid UTF-8, invalid JSON, NaN/Infinity,
    duplicate keys in an object, integers past Python's digit limit and nesting too deep for the parser
    are refused with a BadRequest naming the problem."""
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; at most {limit} allowed (--max-body-bytes)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not UTF-8: {e}") from None

    def no_constant(name):
        raise BadRequest(f"request body is not valid JSON: {name} is not a JSON number")
    try:
        return json.loads(text, parse_constant=no_constant, object_pairs_hook=_unique_keys)
    except BadRequest:
        raise
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except ValueError:                  # the only other one json raises: int() past sys.get_int_max_str_digits()
        raise BadRequest(f"request body holds an integer of more than {sys.get_int_max_str_digits()} digits; "
                         f"numbers in a request must fit int64") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply to be a request") from None


def _unique_keys(pairs: list) -> dict:
    """json's object hook: a key given twice is refused (json.loads would keep the last one silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise BadRequest(f"request body is ambiguous: key {dup[:40]!r} appears twice in one object")
    return obj


def _is_int(x) -> bool:
    return type(x) is int and INT64_MIN <= x <= INT64_MAX          # bool is a subclass of int: refused


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", type(None): "null"}


def _describe(x) -> str:
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


def check_k_beam(k, beam, rec) -> tuple[int, int]:
    """k and beam checked by the library itself (``Recommender.beam_for``): the same rules, order and
    messages as ``recommend``; beam defaults to max(k, 20) capped at max_beam."""
    try:
        return k, rec.beam_for(k, beam)
    except NezhaError as e:
        raise BadRequest(str(e)) from None


@dataclass
class Query:
    """A validated request: per history its [n, L] int64 codes, and k, beam for all of them."""

    codes: list[np.ndarray]
    k: int
    beam: int
    id: str | None = None
    extra: dict = field(default_factory=dict)


def codes_of(histories: list[list[int]], rec, unknown: str) -> list[np.ndarray]:
    """Item ids -> codes with the library's encoder (its messages for unknown items); empty histories
    are refused with the library's message and the request's own history index."""
    if not histories:
        raise BadRequest("no histories given: pass a list of item-id lists")
    try:
        codes = history_codes(histories, rec.catalog, unknown)
    except NezhaError as e:
        raise BadRequest(str(e)) from None
    for b, c in enumerate(codes):
        if len(c) == 0:
            raise BadRequest(f"history {b} is empty (after dropping unknown items): NEZHA needs at least one item")
    return codes


def _check_fields(obj, allowed: tuple[str, ...], what: str) -> dict:
    if not isinstance(obj, dict):
        raise BadRequest(f"{what} must be a JSON object with {', '.join(allowed)}; got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise BadRequest(f"{what}: unknown field {unknown[0][:40]!r}; allowed: {', '.join(allowed) or 'none'}")
    return obj


def _optional_object(obj: dict, key: str, allowed: tuple[str, ...], what: str) -> dict:
    """``obj[key]`` when given: a JSON object with only ``allowed`` keys (null, [], 0 or "" are refused, not
    taken for "none"); {} when absent."""
    if key not in obj:
        return {}
    value = obj[key]
    if not isinstance(value, dict):
        raise BadRequest(f"{what}: {key!r} must be a JSON object, got {_describe(value)}")
    return _check_fields(value, allowed, f"{what} {key}")


def parse_recommend(obj, rec, max_histories: int) -> Query:
    """``{"histories": [[item, ...], ...], "k": 10, "beam": 20, "unknown": "error"}`` -> Query."""
    obj = _check_fields(obj, ("histories", "k", "beam", "unknown"), "/v1/recommend body")
    if "histories" not in obj:
        raise BadRequest("/v1/recommend body: missing field 'histories' (a list of item-id lists)")
    histories = obj["histories"]
    if not isinstance(histories, list):
        raise BadRequest(f"histories must be a list of item-id lists, got {type(histories).__name__}")
    if len(histories) > max_histories:
        raise BadRequest(f"{len(histories)} histories in one request; at most {max_histories} allowed")
    k, beam = check_k_beam(obj.get("k", 10), obj.get("beam"), rec)
    # item ids (bools, floats, strings, nesting, int64 range, unknown items): the library's checks and messages
    return Query(codes_of(histories, rec, obj.get("unknown", "error")), k, beam)


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
V2_OUTPUT_PARAMETERS: tuple[str, ...] = ()
V2_OUTPUTS = [{"name": "items", "datatype": "INT64", "shape": [-1, -1]},
              {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
              {"name": "counts", "datatype": "INT64", "shape": [-1]}]


def _flatten(data, shape: list[int], name: str) -> list:
    """v2 tensor data: flat row-major, or nested to the tensor's shape."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: data must be a list, got {type(data).__name__}")
    if data and isinstance(data[0], list) and len(shape) == 2:
        if len(data) != shape[0] or any(not isinstance(r, list) or len(r) != shape[1] for r in data):
            raise BadRequest(f"input {name!r}: nested data does not match shape {shape}")
        data = [x for r in data for x in r]
    expected = math.prod(shape)                     # Python ints: np.prod wraps around past int64
    if len(data) != expected:
        raise BadRequest(f"input {name!r}: {len(data)} values for shape {shape} ({expected} expected)")
    for pos, x in enumerate(data):
        if not _is_int(x):
            raise BadRequest(f"input {name!r} must hold INT64 values, got {_describe(x)} at position {pos}")
    return data


def parse_v2_infer(obj, rec, max_histories: int) -> Query:
    """A v2 inference request (see V2_INPUTS) -> Query."""
    obj = _check_fields(obj, ("id", "inputs", "outputs", "parameters"), "v2 inference request")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"v2 inference request: id must be a string, got {type(rid).__name__}")
    params = _optional_object(obj, "parameters", V2_PARAMETERS, "v2 inference request")
    outputs = _requested_outputs(obj)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list):
        raise BadRequest("v2 inference request: 'inputs' must be a list of tensors 'histories' and 'lengths'")
    tensors = {}
    for t in inputs:
        t = _check_fields(t, ("name", "shape", "datatype", "data", "parameters"), "v2 input tensor")
        name = t.get("name")
        if name not in ("histories", "lengths") or name in tensors:
            raise BadRequest(f"v2 input {_describe(name)}: expected the inputs 'histories' INT64 [B, T] and 'lengths' INT64 [B], once each")
        if t.get("datatype") != "INT64":
            raise BadRequest(f"input {name!r}: datatype must be INT64, got {_describe(t.get('datatype'))}")
        _optional_object(t, "parameters", V2_INPUT_PARAMETERS, f"input {name!r}")
        shape, rank = t.get("shape"), 2 if name == "histories" else 1
        if not isinstance(shape, list) or len(shape) != rank or not all(_is_int(s) and s >= 0 for s in shape):
            raise BadRequest(f"input {name!r}: shape must be {rank} non-negative integers, got {_describe(shape)}")
        tensors[name] = (shape, _flatten(t.get("data"), shape, name))
    if set(tensors) != {"histories", "lengths"}:
        raise BadRequest("v2 inference request: needs the inputs 'histories' INT64 [B, T] and 'lengths' INT64 [B]")
    (hshape, hdata), (lshape, lengths) = tensors["histories"], tensors["lengths"]
    B, T = hshape
    if lshape[0] != B:
        raise BadRequest(f"input 'lengths' has {lshape[0]} values for {B} histories")
    if B > max_histories:
        raise BadRequest(f"{B} histories in one request; at most {max_histories} allowed")
    histories = []
    for b, n in enumerate(lengths):
        if not 0 <= n <= T:
            raise BadRequest(f"lengths[{b}] = {n}; must lie in 0..{T} (the histories tensor's second dimension)")
        histories.append(hdata[b * T:b * T + n])
    k, beam = check_k_beam(params.get("k", 10), params.get("beam"), rec)
    return Query(codes_of(histories, rec, params.get("unknown", "error")), k, beam, id=rid, extra={"outputs": outputs})


def _requested_outputs(obj: dict) -> list[str] | None:
    """The request's ``outputs``: each {"name": one of V2_OUTPUTS, "parameters": {...}} at most once; None when
    absent (then every output is returned)."""
    if "outputs" not in obj:
        return None
    outputs, known = obj["outputs"], [o["name"] for o in V2_OUTPUTS]
    if not isinstance(outputs, list):
        raise BadRequest(f"v2 inference request: 'outputs' must be a list of {{\"name\": ...}} objects, got {_describe(outputs)}")
    names = []
    for o in outputs:
        o = _check_fields(o, ("name", "parameters"), "v2 requested output")
        name = o.get("name")
        if not isinstance(name, str) or name not in known or name in names:
            raise BadRequest(f"v2 requested output {_describe(name)}: the outputs are {', '.join(known)}, each at most once")
        _optional_object(o, "parameters", V2_OUTPUT_PARAMETERS, f"output {name!r}")
        names.append(name)
    return names


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
