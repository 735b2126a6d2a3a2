"""The server's logic without a web framework: routes, parsing, deadlines, reload, drain. The uvicorn
app (``serve.app``) and the Ray Serve deployment (``serve.ray_engine``) both call ``Service.handle``, so
that both engines answer the same routes with the same bodies and errors.

Routes:
  POST /v1/recommend                  {"histories": [[item, ...]], "k": 10, "beam": 20} -> {"results": ...}
  GET  /v2/health/live | /v2/health/ready | /v2 | /v2/models/{name} | /v2/models/{name}/ready
  POST /v2/models/{name}/infer        Open Inference Protocol (see serve.protocol: INT64 histories + lengths)
  GET  /metrics                       Prometheus text format
  POST /admin/reload                  {"artifact": "path"} optional: load, verify, swap atomically; off (404)
                                      unless an admin token is configured (serve.admin)

Metrics count requests by route template (a fixed set, ``unmatched`` for every other path), so that no
request can add a label value.
"""

from __future__ import annotations

import asyncio
import os
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from nezha.runtime.errors import GraphRunError, NezhaError

from . import admin
from . import protocol as P
from .batching import Batcher, Item, Pending, tokens_of
from .binary import EXTENSION, answer_v2
from .metrics import Metrics
from .model import LoadedModel, load_model
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
    the metrics' ``route`` label takes, whatever paths clients send."""
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


def auto_workers(backend_share: float, decode_seconds: float, cores: int | None = None) -> int:
    """Decode threads by default. One per core when a decode runs mostly in the backend with the GIL
    released (large models, the C++ loop): the threads compute in parallel; else one (the Python loop on a
    small model: a second thread only contends for the GIL with the first and the event loop). And when a
    decode is short, one core fewer: the event loop's HTTP work per request is then a sizeable share of
    the CPU, and a decode thread on every core starves it (measured: demo model, C++ loop, 2 cores)."""
    cores = cores or os.cpu_count() or 1
    if backend_share < WORKERS_SHARE:
        return 1
    return max(1, cores - 1) if decode_seconds < SHORT_DECODE_SECONDS else cores


WORKERS_SHARE = 0.75
SHORT_DECODE_SECONDS = 0.002


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
        self._reload_lock = asyncio.Lock()

    # --- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.model is None:
            self.model = await asyncio.to_thread(load_model, self.artifact, self.load_options)
        self.start_engine()
        self.metrics.ready.set(1)

    def start_engine(self) -> None:
        o = self.options
        max_batch = self.model.rec.max_batch if o.max_batch is None else min(o.max_batch, self.model.rec.max_batch)
        pool = self.model.pool
        workers = pool.processes if pool else o.workers or auto_workers(self.model.backend_share, self.model.decode_seconds)
        log.info("%d decode %s, batches of up to %d histories", workers,
                 "process(es), one worker thread each" if pool else "thread(s)", max_batch)
        self.batcher = Batcher(workers, max_batch, o.max_queue, o.max_wait_ms / 1e3, self.metrics.observe,
                               o.max_delay_ms / 1e3)

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
        """Load ``artifact`` (default: the current one again), verify it and swap. Requests already
        admitted finish on the model they started with; a bad artifact raises and the old model stays."""
        if self._reload_lock.locked():
            raise P.Conflict("a reload is already in progress")
        async with self._reload_lock:
            path = Path(artifact) if artifact is not None else self.artifact
            new = await self.checked_load(path)
            old, self.model, self.artifact = self.model, new, path
            self.metrics.reloads.labels("swapped").inc()
            log.info("reloaded: version %s -> %s", old.version if old else None, new.version)
            if old is not None:
                old.retire()
            return new

    async def checked_load(self, path: Path) -> LoadedModel:
        """Load and verify ``path`` for a reload; a bad artifact -> 400 naming the version still served."""
        try:
            return await asyncio.to_thread(load_model, path, self.load_options)
        except NezhaError as e:
            self.metrics.reloads.labels("refused").inc()
            raise P.BadRequest(f"reload refused, still serving version {self.model.version}: {e}") from None

    async def admin_reload(self, artifact: str | None) -> Reply:
        """POST /admin/reload: swap now (the engine here); Ray's replicas roll over instead (RayService)."""
        model = await self.reload(artifact)
        return Reply(200, {"reloaded": True, "model": model.info()})

    # --- decoding -------------------------------------------------------------------------------------
    async def decode(self, model: LoadedModel, query: P.Query, deadline: float) -> list:
        """Query -> per history up to k (item id, score) pairs, best first, through the batcher."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def on_done(results, error):
            def settle():
                if not future.done():
                    future.set_exception(error) if error is not None else future.set_result(results)
            loop.call_soon_threadsafe(settle)
        pending = Pending(len(query.codes), deadline, on_done)
        rec = model.rec
        items = [Item(c, tokens_of(c, rec.max_history, rec.layout.levels), query.beam, query.k, model, pending, i)
                 for i, c in enumerate(query.codes)]
        for _ in items:
            model.acquire()
        try:
            self.batcher.submit(items)
        except BaseException:
            for _ in items:
                model.release()
            raise
        try:
            return await asyncio.wait_for(future, max(deadline - time.perf_counter(), 0.0))
        except asyncio.TimeoutError:
            pending.fail(P.DeadlineExceeded("deadline"))       # its queued histories are dropped
            raise P.DeadlineExceeded("no answer within the request's deadline (--timeout-ms or x-nezha-timeout-ms)") from None
        except asyncio.CancelledError:
            pending.fail(P.DeadlineExceeded("client went away"))
            raise

    async def answer(self, parse: Callable, body: bytes | dict, timeout_ms: float | None = None, size: int = 0):
        """Parse a body (bytes, or JSON already parsed by another encoding: serve.binary, serve.grpc_server;
        ``size``: its size on the wire) against the current model, decode, and map SIDs to items with each
        request's k."""
        if not self.ready:
            raise P.Unavailable("not ready: " + ("draining for shutdown" if self.draining else "no model loaded"))
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
        """Parse and check a body; a large one in a worker thread, so that the event loop answers other
        requests meanwhile (json.loads of 1 MiB holds the GIL ~10-20 ms; the checks after it yield it)."""
        def work():
            obj = P.parse_json(body, self.options.max_body_bytes) if isinstance(body, bytes) else body
            return parse(obj, model.rec, self.options.max_queue)
        large = max(size, len(body) if isinstance(body, bytes) else 0) >= OFFLOAD_BYTES
        return await asyncio.to_thread(work) if large else work()

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
                raise P.RequestTimeout(f"the request body did not arrive within {self.options.body_timeout_s:g} s "
                                       f"(--body-timeout)") from None
        try:
            reply = await self._route(method, path, route, body_in_time, headers or {})
        except P.ServeError as e:
            reply = self._error(e.status, e.kind, str(e), e.headers)
        except NezhaError as e:                                  # a library user error not caught in parsing
            if isinstance(e, GraphRunError):                     # ... but a graph failing mid-run is the server's
                log.error("internal error on %s %s: %s", method, route, e)
                reply = self._error(500, "internal", "internal error; the server log has the details")
            else:
                reply = self._error(400, "bad_request", str(e))
        except Exception:
            log.exception("internal error on %s %s", method, route)
            reply = self._error(500, "internal", "internal error; the server log has the details")
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
        timeout_ms = _header_ms(headers.get("x-nezha-timeout-ms"))
        if route == "/v1/recommend":
            _allow(method, "POST")
            _, _, results = await self.answer(P.parse_recommend, await read_body(self.options.max_body_bytes), timeout_ms)
            return Reply(200, P.recommend_response(results))
        if route == "/metrics":
            _allow(method, "GET")
            return Reply(200, self.metrics.exposition(), self.metrics.content_type)
        if route == "/v2/health/live":
            _allow(method, "GET")
            return Reply(200, {"live": True})
        if route == "/v2/health/ready":
            _allow(method, "GET")
            return Reply(200 if self.ready else 503, {"ready": self.ready})
        if route == "/v2":
            _allow(method, "GET")
            return Reply(200, {"name": "nezha-serve", "version": _version(), "extensions": [EXTENSION]})
        if route == "/admin/reload" and self.options.admin_token_sha256 is not None:
            admin.check_token(headers, self.options.admin_token_sha256)
            _allow(method, "POST")
            admin.check_json(headers)
            body = await read_body(self.options.max_body_bytes)
            obj = P.parse_json(body, self.options.max_body_bytes) if body.strip() else {}
            obj = P._check_fields(obj, ("artifact",), "/admin/reload body")
            if "artifact" in obj and not isinstance(obj["artifact"], str):
                raise P.BadRequest("/admin/reload body: 'artifact' must be a path string")
            artifact = obj.get("artifact")
            return await self.admin_reload(None if artifact is None else
                                           admin.artifact_under(self.artifact_root, artifact))
        if route.startswith("/v2/models/"):
            name, version, tail = _MODEL_ROUTE.match(path).groups()
            model = self.model
            if name != self.options.name or model is None or (version is not None and version != model.version):
                raise P.NotFound(f"model {name[:80]!r}" + (f" version {version[:80]!r}" if version else "") +
                                 f" is not served here; serving {self.options.name!r}" +
                                 (f" version {model.version!r}" if model else ""))
            if tail is None:
                _allow(method, "GET")
                return Reply(200, {"name": name, "versions": [model.version], "platform": "nezha",
                                   "inputs": P.V2_INPUTS, "outputs": P.V2_OUTPUTS,
                                   "parameters": {**model.info(), "artifact": Path(model.artifact).name}})   # no path for anyone
            if tail == "/ready":
                _allow(method, "GET")
                return Reply(200 if self.ready else 503, {"name": name, "ready": self.ready})
            _allow(method, "POST")
            body = await read_body(self.options.max_body_bytes)            # JSON, or binary tensors: serve.binary
            return await answer_v2(self, name, body, headers, timeout_ms)
        # the same answer for /admin/* when the admin API is off: its existence is not revealed
        raise P.NotFound(f"no route {method} {path[:80]}; see /v2/models/{self.options.name} and /v1/recommend")


class MethodNotAllowed(P.ServeError):
    status, kind = 405, "method"


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(f"method {method} not allowed here; use {allowed}")


def _header_ms(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        raise P.BadRequest(f"x-nezha-timeout-ms must be a number of milliseconds, got {value!r}") from None
    if not 0 < ms <= 600_000:
        raise P.BadRequest(f"x-nezha-timeout-ms must lie in (0, 600000], got {value!r}")
    return ms


def _version() -> str:
    from nezha import __version__
    return __version__
