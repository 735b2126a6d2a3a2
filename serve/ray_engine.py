"""The same model and routes on Ray Serve (``nezha serve ARTIFACT --engine ray``): the replica.

Each replica is one ``NezhaDeployment`` actor holding a ``Service`` whose decoding goes through Ray's own
request batching (``@serve.batch``) instead of the local Batcher: Ray collects the histories of concurrent
requests, and the batch handler splits them with the same ``plan_batch`` (one model, one beam, any
lengths) and decodes each group in a worker thread (``asyncio.to_thread``), never on the replica's event
loop. Ray's HTTP proxy routes every path to the deployment (``route_prefix="/"``), so ``/v1/recommend``,
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
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray                                                  # noqa: E402
from ray import serve                                       # noqa: E402  (after the environment)
from ray.exceptions import RayActorError                    # noqa: E402
from starlette.requests import Request                      # noqa: E402

from . import protocol as P                                 # noqa: E402
from .app import read_body, to_response                     # noqa: E402
from .batching import Item, Pending, plan_batch, tokens_of  # noqa: E402
from .model import load_model                               # noqa: E402
from .options import LoadOptions, ServeOptions              # noqa: E402
from .service import Reply, Service                         # noqa: E402
from .transfer import ArtifactRef, local_artifact          # noqa: E402
from .ray_grpc import GrpcMethods

from nezha.runtime.decode import items_from_sids            # noqa: E402


log = logging.getLogger("nezha.serve")


class RayService(Service):
    """Service whose ``decode`` hands each history to the deployment's ``@serve.batch`` method and whose
    reload goes through the application's Deployer (verify, stage on every node, roll the replicas over)."""

    def __init__(self, ref: ArtifactRef, options: ServeOptions, load: LoadOptions, submit):
        super().__init__(ref.path, options, load)
        self.submit, self.deployer = submit, (ref.host, ref.namespace)
        self.outstanding = 0                                     # histories admitted, not yet answered

    def start_engine(self) -> None:
        self.batcher = True                                      # Ray batches; marks the service ready

    async def stop(self) -> None:
        self.draining = True
        if self.model is not None:
            self.model.retire()

    async def admin_reload(self, artifact: str | None) -> Reply:
        """202 once the artifact verified on the deploying node and reached every node; 400 if it is bad,
        503 if a node could not get it, 409 while another reload is under way."""
        if artifact is not None and not Path(artifact).is_absolute():
            raise P.BadRequest(f"reload under Ray Serve needs an absolute artifact path (it is read on the node "
                               f"that deployed the service), got {artifact!r}")
        try:
            deployer = ray.get_actor(self.deployer[0], namespace=self.deployer[1])
            outcome, detail = await deployer.reload.remote(artifact)
        except (ValueError, RayActorError):                      # its node died, or it was stopped
            raise P.Unavailable("reload needs the application's Deployer, which is gone (did the node that "
                                "deployed die?); deploy again") from None
        if outcome == "busy":
            raise P.Conflict("a reload is already rolling out; retry once /v2/models/{name} names its version")
        if outcome != "rolling":
            self.metrics.reloads.labels("refused").inc()
            refused = P.BadRequest if outcome == "refused" else P.Unavailable
            raise refused(f"reload refused, still serving version {self.model.version}: {detail}")
        self.metrics.reloads.labels("rolling").inc()
        return Reply(202, {"reloading": True, "model": detail, "serving": self.model.info(),
                           "note": "Ray replaces the replicas one by one; /v2/models/{name} names the version that answers"})

    async def decode(self, model, query: P.Query, deadline: float) -> list:
        n = len(query.codes)
        if self.outstanding + n > self.options.max_queue:
            raise P.Overloaded(f"queue full: {self.outstanding} histories waiting, at most {self.options.max_queue} "
                               f"(--max-queue); retry later")
        rec = model.rec
        pending = Pending(n, deadline, lambda results, error: None)
        items = [Item(c, tokens_of(c, rec.max_history, rec.layout.levels), query.beam, query.k, model, pending, i)
                 for i, c in enumerate(query.codes)]
        self.outstanding += n
        for _ in items:
            model.acquire()
        try:
            return await asyncio.wait_for(asyncio.gather(*(self.submit(it) for it in items)),
                                          max(deadline - time.perf_counter(), 0.0))
        except asyncio.TimeoutError:
            pending.fail(P.DeadlineExceeded("deadline"))
            raise P.DeadlineExceeded("no answer within the request's deadline (--timeout-ms or x-nezha-timeout-ms)") from None
        finally:
            self.outstanding -= n


def decode_items(items: list[Item], max_batch: int, observe) -> list:
    """Ray's batch -> per item its (item id, score) list, decoding groups that plan_batch forms. Runs
    in a worker thread. Items whose request already failed (deadline) are skipped (None)."""
    results: list = [None] * len(items)
    live = [i for i, it in enumerate(items) if not it.pending.finished]
    try:
        while live:
            queue = [items[i] for i in live]
            chosen = plan_batch(queue, max_batch)
            group = [live[j] for j in chosen]
            batch = [items[i] for i in group]
            t0 = time.perf_counter()
            rec = batch[0].model.rec
            keys, scores = rec.decode_codes([it.codes for it in batch], batch[0].beam)
            observe(batch_size=len(batch), seconds=time.perf_counter() - t0, tokens=sum(it.tokens for it in batch))
            for j, i in enumerate(group):
                results[i] = items_from_sids(keys[j:j + 1], scores[j:j + 1], rec.sid_table, items[i].k)[0]
            chosen_set = set(group)
            live = [i for i in live if i not in chosen_set]
    finally:
        for it in items:
            it.model.release()
    return results


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
        self.max_batch = min(self.options.max_batch or self.service.model.rec.max_batch, self.service.model.rec.max_batch)
        self.decode_one.set_max_batch_size(max(4 * self.max_batch, 1))   # Ray's batch is split into model batches
        self.decode_one.set_batch_wait_timeout_s(max(self.options.max_wait_ms, 0.5) / 1e3)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=2)
    async def decode_one(self, items: list[Item]) -> list:
        return await asyncio.to_thread(decode_items, items, self.max_batch, self.service.metrics.observe)

    async def __call__(self, request: Request):
        reply = await self.service.handle(request.method, request.url.path, lambda limit: read_body(request, limit),
                                          dict(request.headers))
        return to_response(reply)
