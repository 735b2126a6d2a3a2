"""The same model and routes on Ray Serve (``nezha serve ARTIFACT --engine ray --replicas N``).

Each replica is one ``NezhaDeployment`` actor holding a ``Service`` whose decoding goes through Ray's own
request batching (``@serve.batch``) instead of the local Batcher: Ray collects the histories of concurrent
requests, and the batch handler splits them with the same ``plan_batch`` (one model, one beam, any
lengths) and decodes each group in a worker thread (``asyncio.to_thread``), never on
the replica's event loop. Ray's HTTP proxy routes every path to the deployment (``route_prefix="/"``),
so ``/v1/recommend``, the v2 routes and ``/metrics`` (per replica) answer as with uvicorn. On a Ray
cluster the same deployment spreads its replicas across machines with no code change (install this
package on every node).

Reload (``POST /admin/reload``): the replica that gets it loads and verifies the artifact (a bad one: 400,
nothing changes), then hands the redeploy to the application's ``Reloader`` actor and answers 202. Ray
then rolls the replicas over: new ones load the artifact, old ones stop once their in-flight requests are
answered; until the roll-out ends, a request may meet either version (``/v2/models/{name}`` names the one
that answered). If the roll-out fails (a new replica cannot load the artifact), the Reloader redeploys the
previous one."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray                                                  # noqa: E402
from ray import serve                                       # noqa: E402  (after the environment)
from starlette.requests import Request                      # noqa: E402

from . import protocol as P                                 # noqa: E402
from .app import read_body, to_response                     # noqa: E402
from .batching import Item, Pending, plan_batch, tokens_of  # noqa: E402
from .model import LoadOptions, load_model                  # noqa: E402
from .service import Reply, ServeOptions, Service           # noqa: E402

from nezha.runtime.decode import items_from_sids            # noqa: E402
from nezha.runtime.errors import OptionError                # noqa: E402


log = logging.getLogger("nezha.serve")


class RayService(Service):
    """Service whose ``decode`` hands each history to the deployment's ``@serve.batch`` method and whose
    reload redeploys (``redeploy(path)`` starts Ray's roll-over of every replica)."""

    def __init__(self, artifact, options: ServeOptions, load: LoadOptions, submit, redeploy):
        super().__init__(artifact, options, load)
        self.submit, self.redeploy = submit, redeploy
        self.outstanding = 0                                     # histories admitted, not yet answered

    def start_engine(self) -> None:
        self.batcher = True                                      # Ray batches; marks the service ready

    async def stop(self) -> None:
        self.draining = True
        if self.model is not None:
            self.model.retire()

    async def admin_reload(self, artifact: str | None) -> Reply:
        """Verify the artifact here, then let Ray roll every replica over to it: 202, or 400 if it is bad."""
        if self._reload_lock.locked():
            raise P.Conflict("a reload is already in progress")
        async with self._reload_lock:
            if artifact is not None and not Path(artifact).is_absolute():
                raise P.BadRequest(f"reload under Ray Serve needs an absolute artifact path (each replica resolves it "
                                   f"on its own node), got {artifact!r}")
            path = Path(artifact) if artifact is not None else self.artifact
            checked = await self.checked_load(path)
            info = checked.info()
            checked.retire()                                     # only checked: new replicas load their own
            if not await self.redeploy(path):
                raise P.Conflict("a reload is already rolling out; retry once /v2/models/{name} names its version")
            self.metrics.reloads.labels("rolling").inc()
        return Reply(202, {"reloading": True, "model": info, "serving": self.model.info(),
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
class NezhaDeployment:
    """One replica: loads the artifact (verified), answers every route."""

    def __init__(self, artifact: str, options: dict, load: dict, app: dict):
        self.options, self.load_options, self.app = ServeOptions(**options), LoadOptions(**load), app
        self.service = RayService(artifact, self.options, self.load_options, self.decode_one, self.redeploy)
        self.service.model = load_model(artifact, self.load_options)
        self.service.start_engine()
        max_batch = self.service.model.rec.max_batch if self.options.max_batch is None else \
            min(self.options.max_batch, self.service.model.rec.max_batch)
        self.max_batch = max_batch
        self.decode_one.set_max_batch_size(max(4 * max_batch, 1))   # Ray's batch is split into model batches
        self.decode_one.set_batch_wait_timeout_s(max(self.options.max_wait_ms, 0.5) / 1e3)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=2)
    async def decode_one(self, items: list[Item]) -> list:
        return await asyncio.to_thread(decode_items, items, self.max_batch, self.service.metrics.observe)

    async def redeploy(self, artifact: Path) -> bool:
        """Hand the roll-out to this application's Reloader (False: one is already under way)."""
        reloader = Reloader.options(name=reloader_name(self.app["name"]), namespace=RELOADER_NAMESPACE,
                                    lifetime="detached", get_if_exists=True).remote()
        return await reloader.start.remote(str(artifact), str(self.service.artifact), self.options, self.load_options,
                                           self.app)

    async def __call__(self, request: Request):
        reply = await self.service.handle(request.method, request.url.path, lambda limit: read_body(request, limit),
                                          dict(request.headers))
        return to_response(reply)


RELOADER_NAMESPACE = "nezha"


def reloader_name(app: str) -> str:
    return f"nezha-reloader-{app}"


@ray.remote(num_cpus=0, max_concurrency=4)
class Reloader:
    """Rolls an application over to a new artifact from outside its replicas (the roll-over stops the one
    that asked), one roll-out at a time. If Ray reports the roll-out failed (a new replica could not load the
    artifact: say the path is missing on its node, or it was deleted after the check), it redeploys the
    previous artifact, so that the service comes back instead of staying down. Detached: it outlives the
    replica that created it; ``serve_blocking`` removes it at shutdown."""

    def __init__(self):
        self._busy = threading.Lock()

    def start(self, artifact: str, previous: str, options: ServeOptions, load: LoadOptions, app: dict) -> bool:
        if not self._busy.acquire(blocking=False):
            return False
        threading.Thread(target=self._roll, args=(artifact, previous, options, load, app), daemon=True).start()
        return True

    def _roll(self, artifact, previous, options, load, app) -> None:
        try:
            try:
                run(artifact, options, load, **app)
                log.info("reload: every replica now serves %s", artifact)
            except Exception as e:
                log.error("reload of %s failed (%s); redeploying %s", artifact, e, previous)
                run(previous, options, load, **app)
        except Exception as e:                                       # logged: nobody is waiting for it
            log.error("redeploying %s failed too: %s", previous, e)
        finally:
            self._busy.release()


def run(artifact: str | Path, options: ServeOptions, load: LoadOptions, replicas: int = 1,
        cpus_per_replica: float = 1.0, name: str = "nezha", route_prefix: str = "/"):
    """Deploy (or redeploy: Ray rolls the replicas over) the application on the running Ray Serve and wait
    until every replica runs. ``/admin/reload`` calls it again with the same arguments but the artifact."""
    if load.processes:
        raise OptionError("decode processes (--processes) are for the uvicorn engine; under Ray Serve each replica "
                          "is a process already: scale with --replicas")
    app = {"replicas": replicas, "cpus_per_replica": cpus_per_replica, "name": name, "route_prefix": route_prefix}
    bound = NezhaDeployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                                    max_queued_requests=options.max_queue).bind(
        str(Path(artifact).resolve()), asdict(options), asdict(load), app)
    return serve.run(bound, name=name, route_prefix=route_prefix)


def serve_blocking(artifact: str | Path, options: ServeOptions, load: LoadOptions, replicas: int = 1,
                   host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """Start (or join, with ``address``) Ray, deploy, and serve until SIGINT/SIGTERM; then shut down."""

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True,
             **({} if address else {"num_cpus": max(os.cpu_count() or 1, replicas)}))
    try:
        serve.start(http_options={"host": host, "port": port})
        run(artifact, options, load, replicas)
        print(f"nezha serve (Ray Serve, {replicas} replica(s)) on http://{host}:{port}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        try:
            ray.kill(ray.get_actor(reloader_name("nezha"), namespace=RELOADER_NAMESPACE))
        except ValueError:                                           # no reload happened: no reloader
            pass
        ray.shutdown()
