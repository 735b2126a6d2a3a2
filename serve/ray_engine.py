"""The same model and routes on Ray Serve (``nezha serve ARTIFACT --engine ray``): the replica.

Each replica is one ``NezhaDeployment`` actor holding a ``Service`` that admits requests as the uvicorn
engine does (``Service.decode``) but queues their histories in Ray's own request batching
(``@serve.batch``) instead of the local Batcher: Ray collects the histories of concurrent requests, and the
batch handler decodes them with the uvicorn engine's own ``batching.decode_items`` (batches of one model
and one beam, any lengths) in a worker thread, never on the replica's event loop. Ray's HTTP proxy routes every path to the deployment (``route_prefix="/"``), so ``/v1/recommend``,
the v2 routes and ``/metrics`` (per replica) answer as with uvicorn. A replica first gets the artifact onto
its node (``transfer.local_artifact``: in place, cached, or fetched from the deploying node and verified),
then loads and verifies it. Deploying, reloading and the cluster side are ``ray_deploy``'s.

Reload (``POST /admin/reload``) is handed to the application's Deployer, which verifies the artifact, stages
it on every node and lets Ray roll the replicas over: new ones load the staged copy, old ones stop once
their in-flight requests are answered; until the roll-out ends, a request may meet either version
(``/v2/models/{name}`` names the one that answered)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray                                                  # noqa: E402
from ray import serve                                       # noqa: E402  (after the environment)
from ray.exceptions import RayActorError                    # noqa: E402
from starlette.requests import Request                      # noqa: E402

from nezha.runtime.errors import InputError, RequestRefused, Unavailable

from .app import read_body, to_response                     # noqa: E402
from .batching import Item, check_room, decode_items        # noqa: E402
from .model import batch_limit, load_model                  # noqa: E402
from .options import LoadOptions, ServeOptions              # noqa: E402
from .service import Reply, Service                         # noqa: E402
from .transfer import ArtifactRef, local_artifact          # noqa: E402
from .ray_grpc import GrpcMethods                          # noqa: E402


log = logging.getLogger("nezha.serve")


class RayBatcher:
    """The Ray engine's queue: each admitted history goes to the deployment's ``@serve.batch`` method
    (``handler``); at most ``max_queue`` histories wait or decode at once (429 beyond, as the Batcher)."""

    def __init__(self, handler, max_queue: int):
        self.handler, self.max_queue = handler, max_queue
        self.waiting = 0                                         # histories handed to Ray, not yet decoded
        self._tasks: set[asyncio.Task] = set()                   # held: the loop keeps only weak references

    def submit(self, items: list[Item]) -> None:
        check_room(self.waiting, len(items), self.max_queue)
        self.waiting += len(items)
        task = asyncio.ensure_future(self._run(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[Item]) -> None:
        try:
            outcomes = await asyncio.gather(*(self.handler(it) for it in items), return_exceptions=True)
            for it, outcome in zip(items, outcomes):            # Ray's batching failed: the request fails (500)
                if isinstance(outcome, BaseException):
                    it.pending.fail(outcome)
                    it.release()                                # unless the decode did: the model may close
        finally:
            self.waiting -= len(items)


class RayService(Service):
    """Service whose histories go to the deployment's ``@serve.batch`` method (RayBatcher) and whose reload
    goes through the application's Deployer (verify, stage on every node, roll the replicas over)."""

    def __init__(self, ref: ArtifactRef, options: ServeOptions, load: LoadOptions, handler):
        super().__init__(ref.path, options, load)
        self.handler, self.deployer = handler, (ref.host, ref.namespace)

    def start_engine(self) -> None:
        self.batcher = RayBatcher(self.handler, self.options.max_queue)

    async def stop(self) -> None:
        self.draining = True
        if self.model is not None:
            self.model.retire()

    async def admin_reload(self, artifact: str | None) -> Reply:
        """202 once the artifact verified on the deploying node and reached every node; 400 if it is bad,
        503 if a node could not get it, 409 while another reload is under way."""
        if artifact is not None and not Path(artifact).is_absolute():
            raise InputError(f"reload under Ray Serve needs an absolute artifact path (it is read on the node "
                               f"that deployed the service), got {artifact!r}")
        try:
            deployer = ray.get_actor(self.deployer[0], namespace=self.deployer[1])
            outcome, detail = await deployer.reload.remote(artifact)
        except (ValueError, RayActorError):                      # its node died, or it was stopped
            raise Unavailable("reload needs the application's Deployer, which is gone (did the node that "
                                "deployed die?); deploy again") from None
        if outcome == "busy":
            raise RequestRefused(409, "a reload is already rolling out; retry once /v2/models/{name} names its version")
        if outcome != "rolling":
            self.metrics.reloads.labels("refused").inc()
            refused = InputError if outcome == "refused" else Unavailable
            raise refused(f"reload refused, still serving version {self.model.version}: {detail}")
        self.metrics.reloads.labels("rolling").inc()
        return Reply(202, {"reloading": True, "model": detail, "serving": self.model.info(),
                           "note": "Ray replaces the replicas one by one; /v2/models/{name} names the version that answers"})


@serve.deployment(name="nezha", max_ongoing_requests=256)
class NezhaDeployment(GrpcMethods):
    """One replica: gets the artifact onto its node (transfer.local_artifact), loads and verifies it, answers
    every HTTP route and, through Ray Serve's gRPC proxy, the KServe v2 RPCs (serve.ray_grpc)."""

    def __init__(self, ref: ArtifactRef, options: dict, load: dict):
        self.options, self.load_options = ServeOptions(**options), LoadOptions(**load)
        path, how, copied = local_artifact(ref)
        log.info("artifact %s on node %s: %s (%d bytes copied)", ref.key[:12],
                 ray.get_runtime_context().get_node_id()[:12], how, copied)
        self.service = RayService(ref, self.options, self.load_options, self.decode_one)
        self.service.model = load_model(path, self.load_options)
        self.service.start_engine()
        self.max_batch = batch_limit(self.service.model, self.options.max_batch)
        self.decode_one.set_max_batch_size(max(4 * self.max_batch, 1))   # Ray's batch is split into model batches
        self.decode_one.set_batch_wait_timeout_s(max(self.options.max_wait_ms, 0.5) / 1e3)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=2)
    async def decode_one(self, items: list[Item]) -> list:
        """Ray's batch of histories -> decoded and answered through each item's request (batching.decode_items)."""
        await asyncio.to_thread(decode_items, items, self.max_batch, self.service.metrics)
        return [None] * len(items)

    async def __call__(self, request: Request):
        reply = await self.service.handle(request.method, request.url.path, lambda limit: read_body(request, limit),
                                          dict(request.headers))
        return to_response(reply)
