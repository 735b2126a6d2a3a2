"""Deploying the Ray Serve application on one machine or a cluster: ``deploy`` (the library), ``serve_blocking``
(``nezha serve --engine ray``), ``build_app`` (Ray Serve config files: ``serve deploy``, KubeRay RayService).

Placement: Ray Serve's default SPREAD strategy; a new replica goes to a node with the fewest replicas of
the deployment among those with ``cpus_per_replica`` free, so replicas spread across nodes. Scale:
``replicas`` fixes the count, ``autoscaling`` (Ray Serve's ``autoscaling_config``) lets Ray scale between
bounds on the ongoing requests per replica.

The artifact folder is read on the node that deploys. The application's ``Deployer`` actor, pinned to that
node, stages the artifact on every node that could host a replica before any replica starts
(``transfer.stage``), serves its bytes to replicas that start later on other nodes, and runs reloads
(``POST /admin/reload``, an absolute path on that node): it verifies the artifact there (a bad one: 400,
nothing changes), stages it on every node (a node that cannot get it or verify it: 503, nothing changes),
answers 202 and lets Ray roll the replicas over; if the roll-out fails (a new replica cannot load the
artifact), it redeploys the previous one."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict, fields
from pathlib import Path

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .options import LoadOptions, ServeOptions, check_engine
from .ray_engine import NezhaDeployment
from .ray_proxy import BODY_TIMEOUT_ENV, CALLBACK, CALLBACK_ENV, MAX_BODY_ENV
from .transfer import ArtifactRef, HostedFiles, describe, stage

from nezha.runtime.artifact import Artifact
from nezha.runtime.errors import InputError, NezhaError

log = logging.getLogger("nezha.serve")

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

    def publish(self, path: str, name: str, min_cpus: float | None) -> tuple[ArtifactRef, list]:
        """Serve ``path``'s files from now on and stage it on the nodes with ``min_cpus`` (None: on none)."""
        ref = describe(path, deployer_name(name), NAMESPACE)
        self.files.add(ref)
        return ref, [] if min_cpus is None else stage(ref, min_cpus)

    def deploy(self, path: str, options: ServeOptions, load: LoadOptions, app: dict) -> list:
        """Stage ``path`` on every node and deploy it -> per node (node id, how it got it, bytes copied)."""
        with self._busy:
            self.settings = (options, load, app)
            ref, staged = self.publish(path, app["name"], app["cpus_per_replica"])
            run(ref, *self.settings)
            self.current = ref
        return staged

    def reload(self, path: str | None) -> tuple[str, object]:
        """-> ("busy", None) | ("refused", why) | ("unstaged", why) | ("rolling", the new version's info)."""
        if not self._busy.acquire(blocking=False):
            return "busy", None
        rolling = False                                              # else the lock is released here
        try:
            if self.settings is None:
                return "refused", "this application was deployed from a Ray Serve config: change its artifact there"
            path = path or self.current.path
            try:
                Artifact.open(path, verify=True)                     # every sha256, on this node
            except NezhaError as e:
                return "refused", str(e)
            try:
                ref, _ = self.publish(path, self.settings[2]["name"], self.settings[2]["cpus_per_replica"])
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


def application(ref: ArtifactRef, options: ServeOptions, load: LoadOptions, app: dict):
    """The bound deployment; ``app``: replicas, autoscaling, cpus_per_replica (see ``deploy``)."""
    scale = {"autoscaling_config": app["autoscaling"]} if app["autoscaling"] else {"num_replicas": app["replicas"]}
    return NezhaDeployment.options(**scale, ray_actor_options={"num_cpus": app["cpus_per_replica"]},
                                   max_queued_requests=options.max_queue).bind(ref, asdict(options), asdict(load))


def run(ref: ArtifactRef, options: ServeOptions, load: LoadOptions, app: dict):
    """Deploy (or redeploy: Ray rolls the replicas over) ``ref`` on the running Ray Serve and wait until every
    replica runs."""
    return serve.run(application(ref, options, load, app), name=app["name"], route_prefix=app["route_prefix"])


def _deployer(name: str, node: str):
    return Deployer.options(name=deployer_name(name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


def deploy(artifact: str | Path, options: ServeOptions, load: LoadOptions, replicas: int = 1,
           autoscaling: dict | None = None, cpus_per_replica: float = 1.0, name: str = "nezha",
           route_prefix: str = "/") -> list:
    """Deploy ``artifact`` (a folder on this node) on the running Ray Serve: start the application's Deployer
    on this node, stage the artifact on every node that could host a replica, start ``replicas`` replicas
    (or, with ``autoscaling``, Ray Serve's autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 4,
    "target_ongoing_requests": 4}) and wait until they run -> per node (node id, "in place" | "cached" |
    "fetched", bytes copied)."""
    check_engine("ray", options, load)
    app = {"replicas": replicas, "autoscaling": autoscaling, "cpus_per_replica": cpus_per_replica, "name": name,
           "route_prefix": route_prefix}
    deployer = _deployer(name, ray.get_runtime_context().get_node_id())
    return ray.get(deployer.deploy.remote(str(Path(artifact).resolve()), options, load, app))


BUILD_ARGS = ("artifact", "name", "replicas", "autoscaling", "cpus_per_replica", "options", "load")


def build_app(args: dict):
    """Ray Serve application builder for config files (``import_path: nezha.serve.ray_deploy:build_app``;
    ``serve deploy``, KubeRay RayService). ``args``: artifact (an absolute folder on the head node), name (the
    application's, default "nezha"), replicas, autoscaling and cpus_per_replica as for ``deploy``, options
    (ServeOptions fields), load (LoadOptions fields). The Deployer runs on the head node; replicas get the
    artifact as they start (no staging first), and a reload is a change of ``artifact`` in the config."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown or not Path(str(args.get("artifact", ""))).is_absolute():
        raise InputError(f"build_app args: {'unknown ' + ', '.join(unknown) if unknown else 'artifact must be an absolute path'}"
                         f"; allowed: {', '.join(BUILD_ARGS)}")
    options, load = _typed(ServeOptions, args.get("options", {})), _typed(LoadOptions, args.get("load", {}))
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    ref, _ = ray.get(_deployer(args.get("name", "nezha"), head).publish.remote(args["artifact"], args.get("name", "nezha"), None))
    return application(ref, options, load, {"replicas": args.get("replicas", 1), "autoscaling": args.get("autoscaling"),
                                            "cpus_per_replica": args.get("cpus_per_replica", 1.0)})


def _typed(cls, values: dict):
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise InputError(f"build_app args: unknown {cls.__name__} field(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(f.name for f in fields(cls))}")
    return cls(**values)


def shutdown(name: str = "nezha") -> None:
    """Stop Ray Serve and the application's Deployer (detached: it would outlive the driver)."""
    serve.shutdown()
    try:
        ray.kill(ray.get_actor(deployer_name(name), namespace=NAMESPACE))
    except ValueError:                                               # never deployed
        pass


def grpc_options(port: int | None) -> dict:
    """serve.start's keyword for Ray Serve's gRPC proxy serving the KServe v2 service on ``port`` (none: {})."""
    if port is None:
        return {}
    from ray.serve.config import gRPCOptions

    from .ray_grpc import SERVICER_FUNCTION
    return {"grpc_options": gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION])}


def serve_blocking(artifact: str | Path, options: ServeOptions, load: LoadOptions, replicas: int = 1,
                   host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                   autoscaling: dict | None = None, proxy_location: str | None = None,
                   grpc_port: int | None = None) -> None:
    """Start Ray (or join the cluster at ``address``), deploy, and serve until SIGINT/SIGTERM; then shut down.
    ``grpc_port``: also KServe v2 over gRPC, through Ray Serve's gRPC proxy (serve.ray_grpc)."""
    most = autoscaling["max_replicas"] if autoscaling else replicas
    if not address:                                   # a Ray of our own: its proxy retries lost requests
        os.environ.setdefault(CALLBACK_ENV, CALLBACK)
        os.environ[MAX_BODY_ENV], os.environ[BODY_TIMEOUT_ENV] = str(options.max_body_bytes), str(options.body_timeout_s)
    ray.init(address=address or "local", include_dashboard=False, ignore_reinit_error=True,   # local: never a stray cluster
             **({} if address else {"num_cpus": max(os.cpu_count() or 1, most)}))
    try:
        serve.start(http_options={"host": host, "port": port}, **grpc_options(grpc_port),
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
