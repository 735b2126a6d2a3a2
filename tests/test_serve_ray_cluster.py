"""Ray Serve on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, every node on
127.0.0.1): a head with no CPU (Serve's controller and proxy, the Deployer, this driver) and two workers of 2
CPUs, each with its own artifact cache. Worker "near" reads the artifact folder at its path (a shared file
system); worker "far" has ``NEZHA_ARTIFACT_FETCH=always``, so that it acts as a node where the folder does
not exist: it must fetch the artifact through the object store. The driver joins the running cluster as
``--ray-address`` does. Opt-in (``-m ray``); about 1.2 GB of memory per node; its wall time is in README."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"        # keeps every node on 127.0.0.1
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import corrupted, tampered, tiny_catalog, tiny_histories   # noqa: E402
from test_serve_ray import _build, _pairs                      # noqa: E402
from nezha.runtime import Recommender                          # noqa: E402
from nezha.serve import LoadOptions, ServeOptions              # noqa: E402

pytestmark = pytest.mark.ray
ADMIN_TOKEN = "cluster-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
ARTIFACT_ROOT = os.path.realpath(tempfile.gettempdir())    # reloads name artifacts built under pytest's tmp folder


def _options() -> ServeOptions:
    from nezha.serve.admin import token_digest
    return ServeOptions(max_wait_ms=5, workers=1, timeout_ms=20_000, admin_token_sha256=token_digest(ADMIN_TOKEN),
                        artifact_root=ARTIFACT_ROOT)                   # 2 busy cores: no 504


OPTIONS, LOAD = _options(), LoadOptions(threads=1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve
    from ray.cluster_utils import Cluster

    from nezha.serve.ray_deploy import shutdown
    from nezha.serve.ray_proxy import CALLBACK, CALLBACK_ENV
    from nezha.serve.transfer import CACHE_ENV, FETCH_ENV

    root = tmp_path_factory.mktemp("cluster")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "env_vars": {CALLBACK_ENV: CALLBACK}})   # the proxy's retry
    try:
        near = c.add_node(num_cpus=2, env_vars={CACHE_ENV: str(root / "cache-near")})
        far = c.add_node(num_cpus=2, env_vars={CACHE_ENV: str(root / "cache-far"), FETCH_ENV: "always"})
        ray.init(address=c.address, log_to_driver=False)              # what --ray-address ADDRESS does
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"} and len(ray.nodes()) == 3
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield {"cluster": c, "near": near.node_id, "far": far.node_id, "far_node": far, "root": root,
               "url": f"http://127.0.0.1:{port}", "artifact": _build(root, seed=0)}
    finally:
        if ray.is_initialized():
            shutdown()
            ray.shutdown()
        c.shutdown()


def replica_nodes() -> list[str]:
    """The node of every live replica, from Ray's actor table."""
    return sorted(a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                  if a["State"] == "ALIVE" and a["ActorClassName"].startswith("ServeReplica"))


def running() -> int:
    from ray import serve
    app = serve.status().applications.get("nezha")
    return app.deployments["nezha"].replica_states.get("RUNNING", 0) if app else 0


def seen_artifacts(client, n=24) -> dict[str, str]:
    """Artifact folder name -> version, of the replicas that answered n requests (the router spreads them)."""
    models = [client.get("/v2/models/nezha").json()["parameters"] for _ in range(n)]
    return {m["artifact"]: m["version"] for m in models}


def test_replicas_spread_and_a_node_without_the_folder_fetches_it(cluster):
    from nezha.serve.ray_deploy import deploy

    artifact, cache_far = cluster["artifact"], cluster["root"] / "cache-far"
    staged = {node: (how, copied) for node, how, copied in deploy(artifact, OPTIONS, LOAD, replicas=2,
                                                                    cpus_per_replica=0.5)}
    size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert staged == {cluster["near"]: ("in place", 0), cluster["far"]: ("fetched", size)}
    assert replica_nodes() == sorted([cluster["near"], cluster["far"]])          # SPREAD: one per node
    assert not (cluster["root"] / "cache-near").exists()                         # near copied nothing
    [cached] = [p for p in cache_far.iterdir() if p.is_dir()]                   # and its lock file
    histories = tiny_histories(tiny_catalog(), n=6)
    with httpx.Client(base_url=cluster["url"], timeout=30) as client, Recommender.load(artifact, threads=1) as rec:
        assert set(seen_artifacts(client)) == {artifact.name, cached.name}       # both replicas answer
        expected = [rec.recommend([h], k=5)[0] for h in histories]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: client.post("/v1/recommend", json={"histories": histories, "k": 5}),
                                    range(24)))
    assert all(r.status_code == 200 and _pairs(r.json()["results"]) == expected for r in replies)


def test_a_corrupted_transfer_is_refused_and_a_fetched_artifact_reused(cluster, tmp_path):
    from nezha.serve.transfer import HostedFiles, describe, stage
    from nezha.runtime.errors import ArtifactError

    # the deployed artifact with another manifest (so another cache key): nothing of it on any node yet
    source = tampered(cluster["artifact"], tmp_path, edit=lambda raw: raw["source"].update(checkpoint="elsewhere"))
    host = ray.remote(num_cpus=0)(HostedFiles).options(name="test-host", namespace="nezha").remote()
    ref = describe(source, "test-host", "nezha", chunk=1 << 12)                 # many small chunks, a window
    ray.get(host.add.remote(ref))
    graph = max((p for p in source.rglob("*.onnx")), key=lambda p: p.stat().st_size)
    good = graph.read_bytes()
    corrupted(source, tmp_path, str(graph.relative_to(source)))                  # the bad copy's bytes ...
    shutil.copy(tmp_path / "bad" / graph.relative_to(source), graph)            # ... in the source, after describe
    with pytest.raises(ArtifactError) as e:
        stage(ref, min_cpus=1)
    assert str(e.value).count("sha256 mismatch after the transfer") == 2, e.value            # one error, every node
    assert f"node {cluster['near'][:12]}" in str(e.value) and f"node {cluster['far'][:12]}" in str(e.value)
    assert not [p for c in ("cache-near", "cache-far") for p in (cluster["root"] / c).glob(f"*{ref.key}*")
                if p.is_dir()]                                                   # nothing half-written kept
    graph.write_bytes(good)
    size = sum(ref.sizes.values())
    first = {node: (how, copied) for node, how, copied in stage(ref, min_cpus=1)}
    assert first == {cluster["near"]: ("in place", 0), cluster["far"]: ("fetched", size)}
    again = {node: (how, copied) for node, how, copied in stage(ref, min_cpus=1)}
    assert again == {cluster["near"]: ("in place", 0), cluster["far"]: ("cached", 0)}     # a restart copies nothing
    ray.kill(host)


def test_a_reload_reaches_every_node_or_none(cluster, tmp_path):
    from nezha.serve.transfer import describe

    second = _build(tmp_path, seed=1)
    key = describe(second, "-", "-").key
    cache_far = cluster["root"] / "cache-far"
    with httpx.Client(base_url=cluster["url"], timeout=60, headers=ADMIN) as client:
        before = set(seen_artifacts(client).values())
        [old_version] = before
        # a node that cannot take the artifact (here: its cache folder is a file): 503, nothing rolls
        shutil.move(cache_far, cluster["root"] / "cache-far.away")
        cache_far.write_text("not a folder")
        try:
            r = client.post("/admin/reload", json={"artifact": str(second)})
        finally:
            cache_far.unlink()
            shutil.move(cluster["root"] / "cache-far.away", cache_far)
        assert r.status_code == 503 and "reload refused" in r.json()["error"], r.text
        assert cluster["far"][:12] in r.json()["error"] and r.headers["retry-after"] == "1"
        assert set(seen_artifacts(client).values()) == {old_version}

        r = client.post("/admin/reload", json={"artifact": str(corrupted(second, tmp_path, "manifest.json"))})
        assert r.status_code == 400 and "reload refused" in r.json()["error"], r.text

        r = client.post("/admin/reload", json={"artifact": str(second)})
        assert r.status_code == 202, r.text
        new = r.json()["model"]["version"]
        deadline = time.time() + 120
        while ((seen := seen_artifacts(client)) != {second.name: new, key: new}
               or replica_nodes() != sorted([cluster["near"], cluster["far"]])):   # the old replicas gone
            assert time.time() < deadline, f"the reload did not reach every node: {seen}, {replica_nodes()}"
            time.sleep(1)


def load(url, stop: threading.Event, clients: int, record: list, histories: int = 4) -> list:
    """Closed-loop clients until ``stop``: record (start, end, status, retry-after, retried) per request."""
    histories = tiny_histories(tiny_catalog(), n=histories)

    def one():
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                t0 = time.time()
                try:
                    r = client.post("/v1/recommend", json={"histories": histories, "k": 5})
                    record.append((t0, time.time(), r.status_code, r.headers.get("retry-after"),
                                   "x-nezha-retried" in r.headers))
                except httpx.HTTPError as e:
                    record.append((t0, time.time(), type(e).__name__, None, False))
    pool = ThreadPoolExecutor(clients)
    return [pool.submit(one) for _ in range(clients)]


def test_autoscaling_from_one_replica_up_under_load_and_back_when_idle(cluster):
    from nezha.serve.ray_deploy import deploy

    scaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
               "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 3}
    deploy(cluster["artifact"], OPTIONS, LOAD, autoscaling=scaling, cpus_per_replica=0.5)
    assert running() == 1
    stop, record, most = threading.Event(), [], 1
    clients = load(cluster["url"], stop, 6, record)
    try:
        deadline = time.time() + 90
        while (most := max(most, running())) < 2:
            assert time.time() < deadline, "no replica was added under load"
            time.sleep(0.5)
        t_up = time.time()
    finally:
        stop.set()
        [c.result() for c in clients]
    deadline = time.time() + 90
    while running() > 1:
        assert time.time() < deadline, "the replicas were not removed when idle"
        time.sleep(0.5)
    print(f"\nautoscaling: 1 -> {most} replicas under 6 clients, back to 1 {time.time() - t_up:.1f} s after the "
          f"load stopped; {len(record)} requests, statuses {sorted({r[2] for r in record})}")
    assert {r[2] for r in record} == {200}


def test_a_killed_worker_node_costs_only_the_requests_in_flight_on_it(cluster):
    from ray import serve

    from nezha.serve.ray_deploy import build_app

    # deployed as a Ray Serve config deploys it (KubeRay RayService): the application builder
    serve.run(build_app({"artifact": str(cluster["artifact"]), "replicas": 2, "cpus_per_replica": 0.5,
                         "options": asdict(OPTIONS), "load": asdict(LOAD)}), name="nezha", route_prefix="/")
    assert replica_nodes() == sorted([cluster["near"], cluster["far"]])
    stop, record, clients_n = threading.Event(), [], 4
    clients = load(cluster["url"], stop, clients_n, record, histories=32)     # long requests: some run at the kill
    try:
        time.sleep(3)
        killed = time.time()
        cluster["cluster"].remove_node(cluster["far_node"], allow_graceful=False)
        deadline = time.time() + 120
        while replica_nodes() != [cluster["near"]] * 2 or running() != 2:       # Ray replaces the lost replica
            assert time.time() < deadline, f"the lost replica was not replaced: {replica_nodes()}"
            time.sleep(0.5)
        replaced = time.time()
        time.sleep(2)
    finally:
        stop.set()
        [c.result() for c in clients]
    failed = [r for r in record if r[2] != 200]
    across = [r[1] - r[0] for r in record if r[0] < killed < r[1]]              # in flight at the kill (either node)
    retried = [r[1] - r[0] for r in record if r[4]]                             # lost on the killed node, sent again
    print(f"\nnode kill: {len(record)} requests, {len(failed)} failed {sorted({(r[2], r[3]) for r in failed}, key=str)}; "
          f"{len(across)} in flight at the kill, {len(retried)} of them lost with the killed node's replica and sent "
          f"again by the proxy (slowest {max(retried, default=0):.2f} s); slowest of all {max(r[1] - r[0] for r in record):.2f} s; "
          f"lost replica replaced after {replaced - killed:.1f} s")
    assert len(failed) <= clients_n                                              # at most those in flight
    assert all(r[2] == 503 and r[3] for r in failed)                             # clean: 503 + Retry-After
    assert all(r[1] - r[0] < 30 for r in record)                                 # nothing hangs


def test_nezha_serve_joins_the_cluster_with_ray_address(cluster):
    """The command itself, on the cluster that lost "far": a new node with far's settings (and cache) joins."""
    from nezha.serve.ray_deploy import shutdown
    from nezha.serve.transfer import CACHE_ENV, FETCH_ENV

    shutdown()                                                                   # the command starts its own Serve
    cluster["cluster"].add_node(num_cpus=2, env_vars={CACHE_ENV: str(cluster["root"] / "cache-far"), FETCH_ENV: "always"})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = subprocess.Popen([sys.executable, "-m", "nezha.cli", "serve", str(cluster["artifact"]), "--engine", "ray",
                                "--ray-address", cluster["cluster"].address, "--replicas", "2", "--port", str(port),
                                "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or "on http" not in lines[-1]:
            lines.append(command.stdout.readline())
            assert lines[-1] or command.poll() is None, "".join(lines[-20:])
        assert "2 replica(s), artifact on 2 node(s)" in lines[-1], lines[-1]
        assert sorted(lines[-1].split("node(s): ")[1].split(")")[0].split(", ")) == ["cached", "in place"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", json={"histories": [[100, 101]], "k": 3}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=120) == 0
