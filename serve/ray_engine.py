"""The same model and routes on Ray Serve (``nezha serve ARTIFACT --engine ray``), on one machine or a cluster.

Each replica is one ``NezhaDeployment`` actor holding a ``Service`` whose decoding goes through Ray's own
request batching (``@serve.batch``) instead of the local Batcher: Ray collects the histories of concurrent
requests, and the batch handler splits them with the same ``plan_batch`` (one model, one beam, any
lengths) and decodes each group in a worker thread (``asyncio.to_thread``), never on the replica's event
loop. Ray's HTTP proxy routes every path to the deployment (``route_prefix="/"``), so ``/v1/recommend``,
the v2 routes and ``/metrics`` (per replica) answer as with uvicorn.

On a cluster (``--ray-address``) Ray Serve places replicas with its default SPREAD strategy (a new replica
goes to a node with the fewest of them among those with ``cpus_per_replica`` free). The artifact folder is
read on the node that deploys: the application's ``Deployer`` actor, pinned there, stages the artifact on
every node that could host a replica before any replica starts (``transfer``: in place, cached or fetched
and verified) and serves its bytes to replicas that start later on other nodes. ``replicas`` fixes the
count; ``autoscaling`` (Ray Serve's ``autoscaling_config``) lets Ray scale between bounds.

Reload (``POST /admin/reload``, an absolute path on the deploying node): the Deployer verifies the
artifact there (a bad one: 400, nothing changes), stages it on every node (a node that cannot get it or
verify it: 503, nothing changes), answers 202 and lets Ray roll the replicas over: new ones load the
staged copy, old ones stop once their in-flight requests are answered; until the roll-out ends, a request
may meet either version (``/v2/models/{name}`` names the one that answered). If the roll-out fails (a new
replica cannot load the artifact), the Deployer redeploys the previous one."""

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
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy   # noqa: E402
from starlette.requests import Request                      # noqa: E402

from . import protocol as P                                 # noqa: E402
from .app import read_body, to_response                     # noqa: E402
from .batching import Item, Pending, plan_batch, tokens_of  # noqa: E402
from .model import LoadOptions, load_model                  # noqa: E402
from .service import Reply, ServeOptions, Service           # noqa: E402
from .ray_proxy import CALLBACK, CALLBACK_ENV               # noqa: E402
from .transfer import ArtifactRef, HostedFiles, describe, local_artifact, stage   # noqa: E402

from nezha.runtime.artifact import Artifact                 # noqa: E402
from nezha.runtime.decode import items_from_sids            # noqa: E402
from nezha.runtime.errors import NezhaError, OptionError    # noqa: E402


log = logging.getLogger("nezha.serve")


class RayService(Service):
    """Service whose ``decode`` hands each history to the deployment's ``@serve.batch`` method and whose
    reload goes through the application's Deployer (verify, stage on every node, roll the replicas over)."""

    def __init__(self, artifact, options: ServeOptions, load: LoadOptions, submit, deployer: str):
        super().__init__(artifact, options, load)
        self.submit, self.deployer = submit, deployer
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
        deployer = ray.get_actor(self.deployer, namespace=NAMESPACE)
        outcome, detail = await deployer.reload.remote(artifact)
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
class NezhaDeployment:
    """One replica: gets the artifact onto its node (transfer.local_artifact), loads and verifies it, answers
    every route."""

    def __init__(self, ref: ArtifactRef, options: dict, load: dict):
        self.options, self.load_options = ServeOptions(**options), LoadOptions(**load)
        path, how, copied = local_artifact(ref)
        log.info("artifact %s on node %s: %s (%d bytes copied)", ref.key[:12],
                 ray.get_runtime_context().get_node_id()[:12], how, copied)
        self.service = RayService(ref.path, self.options, self.load_options, self.decode_one, ref.host)
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


NAMESPACE = "nezha"


def deployer_name(app: str) -> str:
    return f"nezha-deployer-{app}"


@ray.remote(num_cpus=0, max_concurrency=16)
class Deployer:
    """On the node that deploys: deploys and reloads the application, one at a time, and serves the
    artifacts' bytes to the nodes that fetch them (``transfer.HostedFiles``; threads: fetches go on during a
    roll-out). If Ray reports a roll-out failed (a new replica could not load the artifact), it redeploys
    the previous artifact, so that the service comes back instead of staying down. Detached: it outlives
    the replica that asked for a reload; ``serve_blocking`` removes it at shutdown."""

    def __init__(self):
        self.files = HostedFiles()
        self.current: ArtifactRef | None = None
        self.settings: tuple | None = None                           # (options, load, app) of the last deploy
        self._busy = threading.Lock()

    def read(self, key: str, name: str, offset: int, size: int) -> bytes:
        return self.files.read(key, name, offset, size)

    def _publish(self, path: str) -> tuple[ArtifactRef, list]:
        ref = describe(path, deployer_name(self.settings[2]["name"]), NAMESPACE)
        self.files.add(ref)
        return ref, stage(ref, self.settings[2]["cpus_per_replica"])

    def deploy(self, path: str, options: ServeOptions, load: LoadOptions, app: dict) -> list:
        """Stage ``path`` on every node and deploy it -> per node (node id, how it got it, bytes copied)."""
        with self._busy:
            self.settings = (options, load, app)
            ref, staged = self._publish(path)
            run(ref, *self.settings)
            self.current = ref
        return staged

    def reload(self, path: str | None) -> tuple[str, object]:
        """-> ("busy", None) | ("refused", why) | ("unstaged", why) | ("rolling", the new version's info)."""
        if not self._busy.acquire(blocking=False):
            return "busy", None
        rolling = False                                              # else the lock is released here
        try:
            path = path or self.current.path
            try:
                Artifact.open(path, verify=True)                     # every sha256, on this node
            except NezhaError as e:
                return "refused", str(e)
            try:
                ref, _ = self._publish(path)
            except NezhaError as e:
                return "unstaged", str(e)
            threading.Thread(target=self._roll, args=(ref,), daemon=True).start()
            rolling = True
            return "rolling", {"artifact": ref.path, "version": ref.key[:12]}
        finally:
            if not rolling:
                self._busy.release()

    def _roll(self, ref: ArtifactRef) -> None:
        previous = self.current
        try:
            try:
                run(ref, *self.settings)
                self.current = ref
                log.info("reload: every replica now serves %s", ref.path)
            except Exception as e:
                log.error("reload of %s failed (%s); redeploying %s", ref.path, e, previous.path)
                run(previous, *self.settings)
        except Exception as e:                                       # logged: nobody is waiting for it
            log.error("redeploying %s failed too: %s", previous.path, e)
        finally:
            self._busy.release()


def run(ref: ArtifactRef, options: ServeOptions, load: LoadOptions, app: dict):
    """Deploy (or redeploy: Ray rolls the replicas over) ``ref`` on the running Ray Serve and wait until every
    replica runs; ``app``: replicas, autoscaling, cpus_per_replica, name, route_prefix (see ``deploy``)."""
    scale = {"autoscaling_config": app["autoscaling"]} if app["autoscaling"] else {"num_replicas": app["replicas"]}
    bound = NezhaDeployment.options(**scale, ray_actor_options={"num_cpus": app["cpus_per_replica"]},
                                    max_queued_requests=options.max_queue).bind(ref, asdict(options), asdict(load))
    return serve.run(bound, name=app["name"], route_prefix=app["route_prefix"])


def deploy(artifact: str | Path, options: ServeOptions, load: LoadOptions, replicas: int = 1,
           autoscaling: dict | None = None, cpus_per_replica: float = 1.0, name: str = "nezha",
           route_prefix: str = "/") -> list:
    """Deploy ``artifact`` (a folder on this node) on the running Ray Serve: start the application's Deployer
    on this node, stage the artifact on every node that could host a replica, start ``replicas`` replicas
    (or, with ``autoscaling``, Ray Serve's autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 4,
    "target_ongoing_requests": 4}) and wait until they run -> per node (node id, "in place" | "cached" |
    "fetched", bytes copied)."""
    if load.processes:
        raise OptionError("decode processes (--processes) are for the uvicorn engine; under Ray Serve each replica "
                          "is a process already: scale with --replicas")
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    deployer = Deployer.options(name=deployer_name(name), namespace=NAMESPACE, lifetime="detached",
                                get_if_exists=True, scheduling_strategy=here).remote()
    app = {"replicas": replicas, "autoscaling": autoscaling, "cpus_per_replica": cpus_per_replica, "name": name,
           "route_prefix": route_prefix}
    return ray.get(deployer.deploy.remote(str(Path(artifact).resolve()), options, load, app))


def shutdown(name: str = "nezha") -> None:
    """Stop Ray Serve and the application's Deployer (detached: it would outlive the driver)."""
    serve.shutdown()
    try:
        ray.kill(ray.get_actor(deployer_name(name), namespace=NAMESPACE))
    except ValueError:                                               # never deployed
        pass


def serve_blocking(artifact: str | Path, options: ServeOptions, load: LoadOptions, replicas: int = 1,
                   host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                   autoscaling: dict | None = None, proxy_location: str | None = None) -> None:
    """Start Ray (or join the cluster at ``address``), deploy, and serve until SIGINT/SIGTERM; then shut down."""
    most = autoscaling["max_replicas"] if autoscaling else replicas
    if not address:                                   # a Ray of our own: its proxy retries lost requests
        os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    ray.init(address=address or "local", include_dashboard=False, ignore_reinit_error=True,   # local: never a stray cluster
             **({} if address else {"num_cpus": max(os.cpu_count() or 1, most)}))
    try:
        serve.start(http_options={"host": host, "port": port},
                    **({"proxy_location": proxy_location} if proxy_location else {}))
        staged = deploy(artifact, options, load, replicas, autoscaling)
        scale = f"{autoscaling['min_replicas']}..{most} replicas" if autoscaling else f"{replicas} replica(s)"
        print(f"nezha serve (Ray Serve, {scale}, artifact on {len(staged)} node(s): "
              f"{', '.join(how for _, how, _ in staged)}) on http://{host}:{port}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        shutdown()
        ray.shutdown()
