"""The same model and routes on Ray Serve: one small local Ray (2 CPUs, no dashboard, no usage stats),
one replica on 127.0.0.1, shut down at the end. About two minutes on 2 cores (a reload rolls the replica over)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import corrupted, tiny_catalog, tiny_histories, tiny_model, write_index   # noqa: E402
from nezha.export.build import build                                          # noqa: E402
from nezha.model.checkpoint import save_checkpoint                            # noqa: E402
from nezha.runtime import Recommender                                         # noqa: E402
from nezha.serve import LoadOptions, ServeOptions                             # noqa: E402

pytestmark = pytest.mark.ray


def _build(root, seed):
    ckpt = save_checkpoint(tiny_model(seed=seed), root / f"ckpt{seed}", tiny_catalog())
    build(ckpt, write_index(tiny_catalog(), root / "tiny.index.json"), root / f"art{seed}", precision=("fp32",),
          max_batch=8, max_beam=16, log=None)
    return root / f"art{seed}"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("serve-ray"), seed=0)


ADMIN_TOKEN = "ray-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def ray_url(artifact, tmp_path_factory):
    from ray import serve

    from nezha.serve.ray_deploy import deploy, shutdown

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from nezha.serve.admin import token_digest
        admin = {"admin_token_sha256": token_digest(ADMIN_TOKEN), "artifact_root": str(tmp_path_factory.getbasetemp())}
        staged = deploy(artifact, ServeOptions(max_wait_ms=20, workers=2, **admin), LoadOptions(threads=1), replicas=1)
        assert [how for _, how, _ in staged] == ["in place"]             # one node, the folder is there: no copy
        yield f"http://127.0.0.1:{port}"
    finally:
        shutdown()
        ray.shutdown()


def _pairs(results):
    return [[(r["item"], r["score"]) for r in per_history] for per_history in results]


def test_ray_serve_answers_the_same_routes_as_the_library(ray_url, artifact):
    histories = tiny_histories(tiny_catalog(), n=6)
    with httpx.Client(base_url=ray_url, timeout=30) as client, Recommender.load(artifact, threads=1) as rec:
        r = client.post("/v1/recommend", json={"histories": histories, "k": 5})
        assert r.status_code == 200, r.text
        assert _pairs(r.json()["results"]) == [rec.recommend([h], k=5)[0] for h in histories]

        assert client.get("/v2/health/ready").status_code == 200
        T = max(len(h) for h in histories)
        body = {"inputs": [{"name": "histories", "datatype": "INT64", "shape": [len(histories), T],
                            "data": [x for h in histories for x in h + [0] * (T - len(h))]},
                           {"name": "lengths", "datatype": "INT64", "shape": [len(histories)],
                            "data": [len(h) for h in histories]}], "parameters": {"k": 5}}
        out = {o["name"]: o["data"] for o in client.post("/v2/models/nezha/infer", json=body).json()["outputs"]}
        assert out["items"][:len(_pairs(r.json()["results"])[0])] == [i for i, _ in _pairs(r.json()["results"])[0]]

        bad = client.post("/v1/recommend", json={"histories": [[100, 99999]], "k": 3})
        with pytest.raises(ValueError) as e:
            rec.recommend([[100, 99999]], k=3)
        assert bad.status_code == 400 and bad.json()["error"] == str(e.value)

        # concurrent requests: Ray's @serve.batch merges them, each answer still equals its solo answer
        rng = np.random.default_rng(5)
        requests = [[rng.choice(tiny_catalog().item_ids, size=int(rng.choice([2, 3]))).tolist()] for _ in range(40)]
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda h: client.post("/v1/recommend", json={"histories": h, "k": 4}), requests))
        for h, reply in zip(requests, replies):
            assert reply.status_code == 200 and _pairs(reply.json()["results"]) == rec.recommend(h, k=4)
        metrics = client.get("/metrics").text
        count = float(re.search(r"^nezha_batch_size_count (\S+)$", metrics, re.M).group(1))
        total = float(re.search(r"^nezha_batch_size_sum (\S+)$", metrics, re.M).group(1))
        assert total >= 40 and count < total, metrics                      # batches larger than 1 formed


def test_ray_reload_refuses_a_corrupt_artifact_then_rolls_the_replicas_over(ray_url, artifact, tmp_path):
    second = _build(tmp_path, seed=1)                         # another model: other answers, another version
    histories = tiny_histories(tiny_catalog(), n=4)
    with httpx.Client(base_url=ray_url, timeout=30, headers=ADMIN) as client, Recommender.load(second, threads=1) as rec:
        version = lambda: client.get("/v2/models/nezha").json()["parameters"]["version"]
        before = version()
        r = client.post("/admin/reload", json={"artifact": str(corrupted(artifact, tmp_path, "manifest.json"))})
        assert r.status_code == 400 and "reload refused" in r.json()["error"], r.text
        assert version() == before

        with Recommender.load(artifact, threads=1) as old:
            answers = {tuple(map(tuple, old.recommend(histories, k=5))): "old", tuple(map(tuple, rec.recommend(histories, k=5))): "new"}
        rolled, seen = threading.Event(), []

        def traffic():                                           # requests all through the roll-over
            with httpx.Client(base_url=ray_url, timeout=60) as c:
                while not rolled.is_set():
                    r = c.post("/v1/recommend", json={"histories": histories, "k": 5})
                    seen.append(answers.get(tuple(map(tuple, _pairs(r.json()["results"])))) if r.status_code == 200
                                else r.status_code)

        with ThreadPoolExecutor(2) as pool:
            clients = [pool.submit(traffic) for _ in range(2)]
            try:
                r = client.post("/admin/reload", json={"artifact": str(second)})
                assert r.status_code == 202, r.text
                new = r.json()["model"]["version"]
                assert new != before and r.json()["serving"]["version"] == before
                deadline = time.time() + 120
                while version() != new:                          # Ray stops the old replica, starts one on the new artifact
                    assert time.time() < deadline, "the replicas did not roll over to the reloaded artifact"
                    time.sleep(0.5)
                time.sleep(1)
            finally:
                rolled.set()
                [c.result() for c in clients]
        assert set(seen) <= {"old", "new"} and seen[-1] == "new", seen    # none failed, each one model's answers
        assert "old" in seen

        # A roll-out that fails (the artifact vanishes after the check): the previous artifact comes back.
        vanishing = tmp_path / "vanishing"
        shutil.copytree(artifact, vanishing)
        deadline = time.time() + 60
        while (r := client.post("/admin/reload", json={"artifact": str(vanishing)})).status_code == 409:
            assert time.time() < deadline and "already rolling out" in r.json()["error"]   # the last roll-out's end
            time.sleep(0.5)
        assert r.status_code == 202, r.text
        shutil.rmtree(vanishing)
        time.sleep(3)
        def serving():                                           # during the failure: 503s or waits
            try:
                r = client.get("/v2/models/nezha", timeout=5)
                return r.json()["parameters"]["version"] if r.status_code == 200 else None
            except httpx.HTTPError:
                return None
        deadline = time.time() + 120
        while serving() != new:
            assert time.time() < deadline, "the service did not come back on the previous artifact"
            time.sleep(1)
        r = client.post("/admin/reload", json={"artifact": "relative/path"})          # relative to the artifact root
        assert r.status_code == 400 and "no artifact folder 'relative/path' under the artifact root" in r.json()["error"]
        r = client.post("/admin/reload", json={"artifact": str(second)}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403                                  # the same gate as the uvicorn engine
