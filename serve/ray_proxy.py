"""A Ray Serve proxy middleware: requests lost with their replica (its node died) are retried once on
another replica; where that is not possible, the client gets a clean 503 with ``Retry-After``.

Without it, Ray's proxy answers a request whose replica died mid-request with a bare 500 (it sends nothing
and uvicorn fills in "Internal Server Error"). That case is recognisable: the proxy returns without
starting a response (every answer of the service itself, errors included, starts one). Every route but
``/admin/reload`` is a pure function of the artifact, so sending it again is safe; the router has by then
dropped the dead replica. A retry that gets no answer start within ``RETRY_WAIT_S`` (no replica left: Ray
is starting one) is cancelled and answered 503, so that nothing hangs.

The body is buffered for the retry before the service sees it, so the middleware holds it to the service's
own bounds first, else it would be the way around them: a declared ``Content-Length`` over
``--max-body-bytes`` is answered 413 before any of it is read, a body that grows past it 413 as it does, a
body not complete within ``--body-timeout`` 408 (``nezha serve --engine ray`` passes both to the Ray it
starts through ``MAX_BODY_ENV`` and ``BODY_TIMEOUT_ENV``; on a cluster, set them next to the callback).

Ray loads proxy middlewares from an environment variable read by each proxy, so set it where the proxies
run (each node, for Ray Serve's default of one proxy per node) before ``ray start``:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=nezha.serve.ray_proxy.middlewares \
    NEZHA_MAX_BODY_BYTES=1048576 NEZHA_BODY_TIMEOUT_S=30 ray start --head

``nezha serve --engine ray`` without ``--ray-address`` sets it for the Ray it starts."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from starlette.middleware import Middleware

log = logging.getLogger("ray.serve")                 # the proxy's own log (logs/serve/proxy_*.log)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "nezha.serve.ray_proxy.middlewares"
MAX_BODY_ENV, BODY_TIMEOUT_ENV = "NEZHA_MAX_BODY_BYTES", "NEZHA_BODY_TIMEOUT_S"
RETRY_WAIT_S = 10.0                  # the retry's wait for an answer to start
NOT_RETRIED = ("/admin/reload",)     # not idempotent: it may have started before the replica died


def middlewares() -> list:
    """The callback Ray's proxy calls (``CALLBACK``); the body bounds from the environment (ServeOptions'
    defaults without it)."""
    from .options import ServeOptions
    defaults = ServeOptions()
    return [Middleware(RetryLostReplica, max_body_bytes=int(os.environ.get(MAX_BODY_ENV, defaults.max_body_bytes)),
                       body_timeout_s=float(os.environ.get(BODY_TIMEOUT_ENV, defaults.body_timeout_s)))]


class RetryLostReplica:
    def __init__(self, app, max_body_bytes: int = 1 << 20, body_timeout_s: float = 30.0):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            return await _answer(send, 413, "too_large", f"request body is {declared.decode()} bytes; at most "
                                                         f"{limit} allowed (--max-body-bytes)")
        body = []
        try:
            complete = await asyncio.wait_for(_buffer(receive, body, limit), self.body_timeout_s)
        except asyncio.TimeoutError:
            return await _answer(send, 408, "request_timeout", f"the request body did not arrive within "
                                                               f"{self.body_timeout_s:g} s (--body-timeout)",
                                 [(b"connection", b"close")])
        if not complete:
            return await _answer(send, 413, "too_large", f"request body is over {limit} bytes (--max-body-bytes)")
        gone = asyncio.Event()                        # the client disconnected: nobody to answer

        async def client():
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        if await self._attempt(scope, body, client, send, None, retried=False) or gone.is_set():
            return
        retry = scope["path"] not in NOT_RETRIED
        log.warning("request %s lost with its replica: %s", scope["path"], "sending it again" if retry else "503")
        if retry and (await self._attempt(scope, body, client, send, RETRY_WAIT_S, retried=True) or gone.is_set()):
            return
        why = "its replica was lost and no other answered in time" if retry else "its replica was lost"
        await _answer(send, 503, "unavailable", f"the request could not be served: {why} (a node failed?); retry",
                      [(b"retry-after", b"1")])

    async def _attempt(self, scope, body, receive, send, wait_s, retried: bool) -> bool:
        """Run the proxy on the buffered request -> whether it started an answer (then it finishes it). The
        answer to a retry carries ``x-nezha-retried: 1``."""
        started, pending = asyncio.Event(), list(body)

        async def replay():
            return pending.pop(0) if pending else await receive()

        async def watch(message):
            if message["type"] == "http.response.start":
                started.set()
                if retried:
                    message = {**message, "headers": [*message.get("headers", []), (b"x-nezha-retried", b"1")]}
            await send(message)

        task = asyncio.ensure_future(self.app(scope, replay, watch))
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({task, waiter}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not started.is_set():
            task.cancel()                             # no answer in time, or the proxy gave up: ours instead
            await asyncio.gather(task, return_exceptions=True)
            return False
        await task
        return True


async def _buffer(receive, body: list, limit: int) -> bool:
    """Receive the request into ``body`` (its ASGI messages) -> True once complete, False once over ``limit``
    bytes (nothing more is read)."""
    size = 0
    while True:
        message = await receive()
        body.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            return False
        if message["type"] != "http.request" or not message.get("more_body", False):
            return True


async def _answer(send, status: int, kind: str, message: str, headers: list = ()) -> None:
    """An error answered by the middleware itself, in the service's form ({"error": ..., "kind": ...})."""
    answer = json.dumps({"error": message, "kind": kind}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers,
                            (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
