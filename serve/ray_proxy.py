"""A Ray Serve proxy middleware: requests lost with their replica (its node died) are retried once on
another replica; where that is not possible, the client gets a clean 503 with ``Retry-After``.

Without it, Ray's proxy answers a request whose replica died mid-request with a bare 500 (it sends nothing
and uvicorn fills in "Internal Server Error"). That case is recognisable: the proxy returns without
starting a response (every answer of the service itself, errors included, starts one). Every route but
``/admin/reload`` is a pure function of the artifact, so sending it again is safe; the router has by then
dropped the dead replica. A retry that gets no answer start within ``RETRY_WAIT_S`` (no replica left: Ray
is starting one) is cancelled and answered 503, so that nothing hangs.

Ray loads proxy middlewares from an environment variable read by each proxy, so set it where the proxies
run (each node, for Ray Serve's default of one proxy per node) before ``ray start``:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=nezha.serve.ray_proxy.middlewares ray start --head

``nezha serve --engine ray`` without ``--ray-address`` sets it for the Ray it starts."""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.middleware import Middleware

log = logging.getLogger("ray.serve")                 # the proxy's own log (logs/serve/proxy_*.log)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "nezha.serve.ray_proxy.middlewares"
RETRY_WAIT_S = 10.0                  # the retry's wait for an answer to start
MAX_REPLAY_BYTES = 16 << 20          # larger bodies are passed on as they come, without a retry
NOT_RETRIED = ("/admin/reload",)     # not idempotent: it may have started before the replica died


def middlewares() -> list:
    """The callback Ray's proxy calls (``CALLBACK``)."""
    return [Middleware(RetryLostReplica)]


class RetryLostReplica:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, size, complete = [], 0, False
        while not complete and size <= MAX_REPLAY_BYTES:
            message = await receive()
            body.append(message)
            size += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
        gone = asyncio.Event()                        # the client disconnected: nobody to answer

        async def client():
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        if await self._attempt(scope, body, client, send, None, retried=False) or gone.is_set():
            return
        retry = complete and scope["path"] not in NOT_RETRIED
        log.warning("request %s lost with its replica: %s", scope["path"], "sending it again" if retry else "503")
        if retry and (await self._attempt(scope, body, client, send, RETRY_WAIT_S, retried=True) or gone.is_set()):
            return
        why = "its replica was lost and no other answered in time" if retry else "its replica was lost"
        answer = json.dumps({"error": f"the request could not be served: {why} (a node failed?); retry",
                             "kind": "unavailable"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

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
