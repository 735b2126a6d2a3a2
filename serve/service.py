"""The server's logic without a web framework: routes, parsing, deadlines, reload, drain. The uvicorn
app (``serve.app``) and the Ray Serve deployment (``serve.ray_engine``) both call ``Service.handle``, so
that both engines answer the same routes with the same bodies and errors.

Routes:
  POST /v1/recommend                  {"histories": [[item, ...]], "k": 10, "beam": 20} -> {"results": ...}
  GET  /v2/health/live | /v2/health/ready | /v2 | /v2/models/{name} | /v2/models/{name}/ready
  POST /v2/models/{name}/infer        Open Inference Protocol (see serve.protocol: INT64 histories + lengths)
  GET  /metrics                       Prometheus text format
  POST /admin/reload                  {"artifact": "path"} optional: load, verify, swap atomically; off (404)
                                      unless an admin token is configured (serve.admin)"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from nezha.runtime.errors import DeadlineExceeded, NotFound, RequestRefused, Unavailable

from . import admin
from . import protocol as P
from .batching import Batcher, Item, LoadedModel, Pending
from .errors import refusal
from .binary import EXTENSION, HEADER, binary_response, fill_binary_inputs, header_length, output_arrays
from .metrics import Metrics
from .model import batch_limit, decode_workers, load_model
from .options import LoadOptions, ServeOptions
from .pool import wait_closed

log = logging.getLogger("nezha.serve")
_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
FIXED_ROUTES = ("/v1/recommend", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2", "/admin/reload")
UNMATCHED = "unmatched"
OFFLOAD_BYTES = 64 << 10        # bodies parsed in a worker thread from this size on (below it the hop costs more)
MAX_MESSAGE_CHARS = 1000


def route_template(path: str) -> str:
    """A request path -> its route's template (``/v2/models/{name}/infer``), or "unmatched": the only values
    the metrics' ``route`` label takes, whatever paths clients send (no request adds a label value)."""
    if path in FIXED_ROUTES:
        return path
    m = _MODEL_ROUTE.match(path)
    if m is None:
        return UNMATCHED
    return "/v2/models/{name}" + (m.group(3) or "")            # a version is part of the same route


@dataclass
class Reply:
    status: int
    body: dict | bytes
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)




class Service:
    def __init__(self, artifact: str | Path, options: ServeOptions | None = None, load: LoadOptions | None = None,
                 model: LoadedModel | None = None):
        self.artifact = Path(artifact)
        self.options = options or ServeOptions()
        self.load_options = load or LoadOptions()
        self.metrics = Metrics()
        root = self.options.artifact_root
        self.artifact_root = admin.artifact_root(root) if root is not None else None     # resolved once
        self.model: LoadedModel | None = model          # preloaded (the CLI), else loaded by start()
        self.batcher: Batcher | None = None
        self.draining = False
        self.reload_lock = asyncio.Lock()

    # --- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.model is None:
            self.model = await asyncio.to_thread(load_model, self.artifact, self.load_options)
        self.start_engine()
        self.metrics.ready.set(1)

    def start_engine(self) -> None:
        o = self.options
        max_batch = batch_limit(self.model, o.max_batch)
        workers = decode_workers(self.model, o.workers, max_batch)
        self.batcher = Batcher(workers, max_batch, o.max_queue, self.metrics, o.max_wait_ms / 1e3, o.max_delay_ms / 1e3)

    async def stop(self) -> None:
        """Drain: refuse new work (503), decode what is queued, close the model."""
        self.draining = True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)
        if self.model is not None:
            self.model.retire()
        await asyncio.to_thread(wait_closed)                     # no decode process outlives the server

    @property
    def ready(self) -> bool:
        return self.model is not None and self.batcher is not None and not self.draining

    async def reload(self, artifact: str | Path | None = None) -> LoadedModel:
        """Load ``artifact`` (default: the current one again), verify it and swap (serve.admin.swap)."""
        return await admin.swap(self, artifact)

    async def admin_reload(self, artifact: str | None) -> Reply:
        """POST /admin/reload: swap now (the engine here); Ray's replicas roll over instead (RayService)."""
        model = await self.reload(artifact)
        return Reply(200, {"reloaded": True, "model": model.info()})

    def served_model(self, name: str, version: str | None) -> LoadedModel:
        """The model a v2 route or RPC names (a version, if given, must be the served one), else 404."""
        model = self.model
        if name != self.options.name or model is None or (version and version != model.version):
            raise NotFound(f"model {name[:80]!r}" + (f" version {version[:80]!r}" if version else "") +
                           f" is not served here; serving {self.options.name!r}" +
                           (f" version {model.version!r}" if model else ""))
        return model

    # --- decoding -------------------------------------------------------------------------------------
    async def decode(self, model: LoadedModel, query: P.Query, deadline: float) -> list:
        """Query -> per history up to k (item id, score) pairs, best first: admission (one Item per history,
        each holding the model; the engine's ``batcher.submit`` refuses a full queue: 429) and the wait
        for the answers up to the request's deadline (504). Both engines admit here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def on_done(results, error):
            def settle():
                if not future.done():
                    future.set_exception(error) if error is not None else future.set_result(results)
            loop.call_soon_threadsafe(settle)
        pending = Pending(len(query.codes), deadline, on_done)
        items = [Item(c, model.rec.tokens(c), query.beam, query.k, model, pending, i) for i, c in enumerate(query.codes)]
        for _ in items:
            model.acquire()
        try:
            self.batcher.submit(items)
        except BaseException:
            for it in items:
                it.release()
            raise
        try:
            return await asyncio.wait_for(future, max(deadline - time.perf_counter(), 0.0))
        except asyncio.TimeoutError:
            pending.fail(DeadlineExceeded("deadline"))       # its queued histories are dropped
            raise DeadlineExceeded("no answer within the request's deadline (--timeout-ms or x-nezha-timeout-ms)") from None
        except asyncio.CancelledError:
            pending.fail(DeadlineExceeded("client went away"))
            raise

    async def answer(self, parse: Callable, body: bytes | dict, timeout_ms: float | None = None, size: int = 0):
        """Parse a body (bytes, or JSON already parsed by another encoding: serve.binary, serve.grpc_server;
        ``size``: its size on the wire) against the current model, decode, and map SIDs to items with each
        request's k."""
        if not self.ready:
            raise Unavailable("not ready: " + ("draining for shutdown" if self.draining else "no model loaded"))
        timeout_ms = self.options.timeout_ms if timeout_ms is None else min(timeout_ms, self.options.timeout_ms)
        deadline = time.perf_counter() + timeout_ms / 1e3
        model = self.model                                       # one model for the whole request
        model.acquire()
        try:
            query = await self._parse(parse, body, model, size)
            return model, query, await self.decode(model, query, deadline)
        finally:
            model.release()

    async def _parse(self, parse: Callable, body: bytes | dict, model: LoadedModel, size: int = 0) -> P.Query:
        """Parse and check a body (bytes, or JSON already parsed), a large one in a worker thread."""
        def work():
            obj = P.parse_json(body, self.options.max_body_bytes) if isinstance(body, bytes) else body
            return parse(obj, model.rec, self.options.max_queue)
        return await _offload(work, max(size, len(body) if isinstance(body, bytes) else 0))

    async def infer_v2(self, name: str, body: bytes, headers: dict, timeout_ms: float | None):
        """POST /v2/models/{name}/infer, JSON or binary -> Reply. A request that asks for no binary output
        gets the plain JSON answer (``protocol.v2_response``), byte for byte as before the extension."""
        def decode_body():
            limit = self.options.max_body_bytes
            if HEADER in headers:
                n = header_length(headers[HEADER], len(body))
                obj = P.parse_json(body[:n], limit)
                fill_binary_inputs(obj, memoryview(body)[n:])
            else:
                obj = P.parse_json(body, limit)
            return obj, *P.requested_outputs(obj)

        obj, wanted, timeout_param = await _offload(decode_body, len(body))
        if timeout_param is not None:
            timeout_ms = timeout_param if timeout_ms is None else min(timeout_ms, timeout_param)
        model, query, results = await self.answer(P.parse_v2_infer, obj, timeout_ms, size=len(body))
        if wanted is None or not any(binary for _, binary in wanted):
            names = None if wanted is None else [name for name, _ in wanted]
            return Reply(200, P.v2_response(name, model.version, query.id, results, query.k, names))
        payload, n = binary_response(name, model.version, query.id, output_arrays(results, query.k), wanted)
        return Reply(200, payload, "application/octet-stream", {"Inference-Header-Content-Length": str(n)})

    # --- routes ---------------------------------------------------------------------------------------
    async def handle(self, method: str, path: str, read_body: Callable[[int], Awaitable[bytes]],
                     headers: dict | None = None) -> Reply:
        """One HTTP request -> Reply. ``read_body(limit)`` returns the body or raises PayloadTooLarge."""
        t0 = time.perf_counter()
        route = route_template(path)

        async def body_in_time(limit: int) -> bytes:             # a client that trickles its body: 408
            try:
                return await asyncio.wait_for(read_body(limit), self.options.body_timeout_s)
            except asyncio.TimeoutError:
                raise RequestRefused(408, f"the request body did not arrive within {self.options.body_timeout_s:g} s "
                                       f"(--body-timeout)") from None
        try:
            reply = await self._route(method, path, route, body_in_time, headers or {})
        except Exception as e:
            told = refusal(e, f"{method} {route}")
            reply = self._error(told.http_status, told.kind, str(told), told.headers)
        if route in ("/v1/recommend", "/v2/models/{name}/infer"):
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(route, str(reply.status)).inc()
        return reply

    def _error(self, status: int, kind: str, message: str, headers: dict | None = None) -> Reply:
        self.metrics.errors.labels(kind).inc()
        headers = {**(headers or {}), **({"Retry-After": "1"} if status in (429, 503) else {})}
        if len(message) > MAX_MESSAGE_CHARS:                     # an echoed value can be long; the answer is not
            message = message[:MAX_MESSAGE_CHARS] + f"... ({len(message)} characters)"
        return Reply(status, {"error": message, "kind": kind}, headers=headers)

    async def _route(self, method, path, route, read_body, headers) -> Reply:
        timeout_ms = P.timeout_header(headers.get("x-nezha-timeout-ms"))
        if route == "/v1/recommend":
            P.allow(method, "POST")
            _, _, results = await self.answer(P.parse_recommend, await read_body(self.options.max_body_bytes), timeout_ms)
            return Reply(200, P.recommend_response(results))
        if route == "/metrics":
            P.allow(method, "GET")
            return Reply(200, self.metrics.exposition(), self.metrics.content_type)
        if route == "/v2/health/live":
            P.allow(method, "GET")
            return Reply(200, {"live": True})
        if route == "/v2/health/ready":
            P.allow(method, "GET")
            return Reply(200 if self.ready else 503, {"ready": self.ready})
        if route == "/v2":
            P.allow(method, "GET")
            return Reply(200, {"name": "nezha-serve", "version": P.server_version(), "extensions": [EXTENSION]})
        if route == "/admin/reload" and self.options.admin_token_sha256 is not None:
            admin.check_token(headers, self.options.admin_token_sha256)
            P.allow(method, "POST")
            admin.check_json(headers)
            artifact = admin.reload_artifact(await read_body(self.options.max_body_bytes), self.options.max_body_bytes)
            return await self.admin_reload(None if artifact is None else
                                           admin.artifact_under(self.artifact_root, artifact))
        if route.startswith("/v2/models/"):
            name, version, tail = _MODEL_ROUTE.match(path).groups()
            model = self.served_model(name, version)
            if tail is None:
                P.allow(method, "GET")
                return Reply(200, {"name": name, "versions": [model.version], "platform": "nezha",
                                   "inputs": P.V2_INPUTS, "outputs": P.V2_OUTPUTS,
                                   "parameters": {**model.info(), "artifact": Path(model.artifact).name}})   # no path for anyone
            if tail == "/ready":
                P.allow(method, "GET")
                return Reply(200 if self.ready else 503, {"name": name, "ready": self.ready})
            P.allow(method, "POST")
            body = await read_body(self.options.max_body_bytes)            # JSON, or binary tensors: serve.binary
            return await self.infer_v2(name, body, headers, timeout_ms)
        # the same answer for /admin/* when the admin API is off: its existence is not revealed
        raise NotFound(f"no route {method} {path[:80]}; see /v2/models/{self.options.name} and /v1/recommend")


async def _offload(work: Callable, size: int):
    """work(), in a worker thread for a body of ``size`` >= OFFLOAD_BYTES, so that the event loop answers
    other requests meanwhile (json.loads of 1 MiB holds the GIL ~10-20 ms; the checks after it yield it)."""
    return await asyncio.to_thread(work) if size >= OFFLOAD_BYTES else work()
