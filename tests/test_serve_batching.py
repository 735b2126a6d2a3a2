"""nezha serve's batcher: batches form under concurrency and each answer equals its solo answer, how a
batch is planned, overload and deadlines answer at once, shutdown drains, decode threads per core, and
the load generator's side-by-side report. Every network call is local and bounded by a timeout."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from conftest import tiny_catalog, tiny_histories
from nezha.serve.batching import Item, pick_seed, plan_batch
from serve_fixtures import (_concurrent_answers_equal_solo_ones, _metric, _pairs, _slow,  # noqa: F401
                            _tiny_data, serve)


def test_batches_form_under_concurrency_and_each_answer_equals_its_solo_answer(serve, library):
    s = serve(workers=1, max_wait_ms=50)
    _slow(s.service, 0.02)            # one slow worker: requests queue behind it and must be batched
    _concurrent_answers_equal_solo_ones(s, library, seed=3, n=48, clients=16)
    assert {name.rsplit("-", 1)[0] for name in s.service.decode_threads} == {"nezha-worker"}   # never the loop
    metrics = s.client.get("/metrics").text
    batches, histories = _metric(metrics, "nezha_batch_size_count"), _metric(metrics, "nezha_batch_size_sum")
    assert histories >= 48 and batches < histories * 0.75, metrics     # batches larger than 1 formed
    assert "nezha_request_seconds_bucket" in metrics and "nezha_queue_depth" in metrics


def _item(tokens, beam=20, model="m"):
    return Item(np.zeros((1, 1)), tokens, beam, 10, model, None, 0)


def test_a_batch_is_one_model_and_beam_of_any_lengths_oldest_first():
    mixed = [_item(90), _item(10), _item(70, beam=8), _item(95), _item(30, model="n"), _item(12)]
    assert plan_batch(mixed, 16) == [0, 1, 3, 5]                       # lengths mix: no padding is ever paid
    assert plan_batch(mixed, 2) == [0, 1]
    assert plan_batch(mixed, 1) == [0]                                 # batching off
    assert len(plan_batch([_item(30) for _ in range(20)], 16)) == 16
    assert pick_seed(mixed, now=mixed[0].arrived, max_delay=10.0) == 0            # the largest group is the oldest's
    beams = [_item(30, beam=8), _item(30), _item(40), _item(50)]
    assert pick_seed(beams, now=beams[0].arrived, max_delay=10.0) == 1            # else the largest group first
    assert pick_seed(beams, now=beams[0].arrived + 11.0, max_delay=10.0) == 0     # unless the oldest waited too long


def test_overload_answers_429_at_once_and_the_server_stays_healthy(serve, library):
    s = serve(workers=1, max_queue=4)
    _slow(s.service, 0.3)
    histories = tiny_histories(tiny_catalog(), n=2)

    def call(_):
        t0 = time.perf_counter()
        r = s.post("/v1/recommend", {"histories": histories, "k": 3})
        return r.status_code, time.perf_counter() - t0, r
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, range(12)))
    refused = [(t, r) for code, t, r in got if code == 429]
    assert refused and all(code in (200, 429) for code, _, _ in got)
    assert min(t for t, _ in refused) < 0.25                              # refused at once, not after waiting
    assert refused[0][1].headers["retry-after"] == "1" and "queue full" in refused[0][1].json()["error"]
    assert s.client.get("/v2/health/ready").status_code == 200
    r = s.post("/v1/recommend", {"histories": histories, "k": 3})
    assert r.status_code == 200 and _pairs(r.json()["results"]) == [library.recommend([h], k=3)[0] for h in histories]
    assert 'nezha_errors_total{kind="overloaded"}' in s.client.get("/metrics").text


def test_a_request_past_its_deadline_gets_504_and_is_dropped(serve):
    s = serve(workers=1, timeout_ms=150)
    _slow(s.service, 0.4)
    t0 = time.perf_counter()
    r = s.post("/v1/recommend", {"histories": [[100, 101]], "k": 3})
    assert r.status_code == 504 and time.perf_counter() - t0 < 0.35, r.text
    r = s.post("/v1/recommend", {"histories": [[100, 101]], "k": 3}, headers={"x-nezha-timeout-ms": "50"})
    assert r.status_code == 504
    r = s.post("/v1/recommend", {"histories": [[100]]}, headers={"x-nezha-timeout-ms": "soon"})
    assert r.status_code == 400 and "x-nezha-timeout-ms" in r.json()["error"]


def test_shutdown_drains_in_flight_requests(serve):
    s = serve(workers=1)
    _slow(s.service, 0.2)
    admitted, submit = [], s.service.batcher.submit
    s.service.batcher.submit = lambda items: (admitted.extend(items), submit(items))[1]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(s.post, "/v1/recommend", {"histories": [[100, 101]], "k": 3}) for _ in range(4)]
        deadline = time.perf_counter() + 30
        while len(admitted) < 4 and time.perf_counter() < deadline:     # all four admitted (however slow the
            time.sleep(0.01)                                              # machine), one decoding
        assert len(admitted) == 4
        s.stop()
        assert [f.result().status_code for f in futures] == [200] * 4   # admitted before stop: all answered
    assert s.service.draining and not any(t.is_alive() for t in s.service.batcher._threads)


def test_loadtest_reports_side_by_side(serve, tmp_path):
    from nezha.serve.loadtest import run_loadtest
    batched, unbatched = serve(), serve(max_batch=1, workers=1)
    data = _tiny_data(tmp_path / "data", tiny_histories(tiny_catalog(), n=40))
    result = run_loadtest([batched.url, unbatched.url], concurrency=[1, 4], duration=0.6, rounds=2, warmup=0.1,
                          k=5, beam=8, data=data, labels=["on", "off"], out=tmp_path / "lt")
    for point in result["points"]:
        for r in point["servers"].values():
            assert r["errors"] == 0 and r["requests"] > 0 and r["p50_ms"] <= r["p99_ms"]
    assert [r["concurrency"] for r in result["ratios"]] == [1, 4]
    assert {p.name for p in (tmp_path / "lt").iterdir()} == {"loadtest.json", "loadtest.md", "loadtest.png"}
    assert "| 4 | on / off |" in (tmp_path / "lt" / "loadtest.md").read_text()


def test_decode_threads_default_to_the_cores_a_decode_can_use():
    from nezha.serve.model import auto_workers
    assert auto_workers(0.65, 0.0005, cores=8) == 1          # the Python loop on a small model: the GIL binds
    assert auto_workers(0.95, 0.0003, cores=2) == 1          # short GIL-free decodes: a core left for HTTP
    assert auto_workers(0.95, 0.0003, cores=8) == 7
    assert auto_workers(0.99, 0.05, cores=2) == 2            # long GIL-free decodes (104.6M): every core
    assert auto_workers(0.99, 0.05, cores=1) == auto_workers(0.95, 0.0003, cores=1) == 1


def _held_model(holds: int):
    """A LoadedModel with ``holds`` requests on it, retired (a reload happened): it closes at the last release."""
    from pathlib import Path
    from nezha.serve.batching import LoadedModel
    model, closed = LoadedModel(rec=None, artifact=Path("."), version="v"), []
    model._close = lambda: closed.append(True)
    for _ in range(holds):
        model.acquire()
    model.retire()
    return model, closed


def test_a_ray_batch_that_failed_before_its_decode_releases_the_model_once():
    import asyncio
    import pytest
    pytest.importorskip("ray")
    from nezha.serve.batching import Pending
    from nezha.serve.ray_engine import RayBatcher

    model, closed = _held_model(3)
    failures = []
    pending = Pending(3, float("inf"), lambda results, error: failures.append(error))
    items = [Item(np.zeros((1, 1)), 1, 4, 10, model, pending, i) for i in range(3)]

    async def handler(item):
        if item.index == 0:                     # this one decoded (and released) before the others failed
            item.release()
            return None
        raise RuntimeError("Ray's batch failed")

    async def run():
        batcher = RayBatcher(handler, max_queue=8)
        batcher.submit(items)
        await asyncio.gather(*batcher._tasks)
        return batcher
    batcher = asyncio.run(run())
    assert model._users == 0 and closed == [True] and batcher.waiting == 0      # each hold released once
    assert [str(e) for e in failures] == ["Ray's batch failed"]
