"""nezha serve on 127.0.0.1 against artifacts built from tiny checkpoints: served answers equal the
library's, batches form under concurrency and each answer equals its solo answer, overload and
deadlines answer at once, bad requests get the library's messages, reload swaps or refuses, shutdown
drains, the load generator reports. Every network call is local and bounded by a timeout."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories, tiny_model, write_index
from nezha.export.build import build
from nezha.model.checkpoint import save_checkpoint
from nezha.runtime import Recommender
from nezha.runtime.errors import GraphRunError
from nezha.serve import LoadOptions, ServeOptions, Service
from nezha.serve.admin import token_digest
from nezha.serve.app import uvicorn_config
from nezha.serve.batching import Item, pick_seed, plan_batch

MAX_BATCH, MAX_BEAM = 8, 16
HTTP_TIMEOUT = 20.0


def _build(root, seed):
    ckpt = save_checkpoint(tiny_model(seed=seed), root / f"ckpt{seed}", tiny_catalog())
    build(ckpt, write_index(tiny_catalog(), root / "tiny.index.json"), root / f"art{seed}", precision=("fp32",),
          max_batch=MAX_BATCH, max_beam=MAX_BEAM, log=None)
    return root / f"art{seed}"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return _build(root, 0), _build(root, 1)


@pytest.fixture(scope="module")
def library(artifacts):
    with Recommender.load(artifacts[0], threads=1) as rec:
        yield rec


class Server:
    """uvicorn in a thread on a free 127.0.0.1 port; ``stop()`` is its graceful shutdown."""

    def __init__(self, service: Service, limits=None):
        import uvicorn

        self.service = service
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(service, log_level="warning", drain_timeout=10, limits=limits))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT)

    def post(self, path, body, **kw):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.client.post(path, content=data, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.client.close()
        assert not self.thread.is_alive()


@pytest.fixture
def serve(artifacts):
    servers = []

    def start(artifact=None, processes=0, limits=None, **options) -> Server:
        load = LoadOptions(threads=1, processes=processes)
        if processes:
            options.setdefault("workers", None)                  # one worker thread per decode process
        s = Server(Service(artifact or artifacts[0], ServeOptions(**{"workers": 2, **options}), load), limits)
        servers.append(s)
        return s
    yield start
    for s in servers:
        if s.thread.is_alive():
            s.stop()


ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


def with_admin(tmp_path_factory) -> dict:
    """Serve options that turn the admin API on, with every test's tmp folder under the artifact root."""
    return {"admin_token_sha256": token_digest(ADMIN_TOKEN), "artifact_root": str(tmp_path_factory.getbasetemp())}


def _slow(service: Service, seconds: float, fail: Exception | None = None):
    """Make the served model's decode take ``seconds`` (or raise ``fail``): overload, deadline and drain tests."""
    rec = service.model.rec
    real = rec.decode_batch
    service.decode_threads = []

    def decode_batch(codes, beam, ks, stages=None):
        service.decode_threads.append(threading.current_thread().name)
        time.sleep(seconds)
        if fail is not None:
            raise fail
        return real(codes, beam, ks, stages)
    rec.decode_batch = decode_batch


def _pairs(results):
    return [[(r["item"], r["score"]) for r in per_history] for per_history in results]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_served_results_equal_the_library(serve, library):
    s = serve()
    histories = tiny_histories(tiny_catalog(), n=6)
    for k, beam in ((5, None), (3, 7), (10, 16)):
        # The server never pads (default), so its answers are the library's for each history alone, bit
        # for bit; the library's own padded batch agrees to float rounding.
        expected = [library.recommend([h], k=k, beam=beam)[0] for h in histories]
        r = s.post("/v1/recommend", {"histories": histories, "k": k, **({"beam": beam} if beam else {})})
        assert r.status_code == 200, r.text
        assert _pairs(r.json()["results"]) == expected
        padded = library.recommend(histories, k=k, beam=beam)
        assert [[i for i, _ in r] for r in padded] == [[i for i, _ in r] for r in expected]
        np.testing.assert_allclose([s for r in padded for _, s in r], [s for r in expected for _, s in r], atol=1e-5)

    T = max(len(h) for h in histories)
    flat = [x for h in histories for x in h + [0] * (T - len(h))]
    body = {"id": "q1", "parameters": {"k": 5},
            "inputs": [{"name": "histories", "datatype": "INT64", "shape": [len(histories), T], "data": flat},
                       {"name": "lengths", "datatype": "INT64", "shape": [len(histories)],
                        "data": [len(h) for h in histories]}]}
    r = s.post("/v2/models/nezha/infer", body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "q1" and out["items"]["shape"] == [len(histories), 5]
    expected = [library.recommend([h], k=5)[0] for h in histories]
    for b, recs in enumerate(expected):
        n = out["counts"]["data"][b]
        assert n == len(recs)
        assert list(zip(out["items"]["data"][b * 5:b * 5 + n], out["scores"]["data"][b * 5:b * 5 + n])) == recs

    assert s.client.get("/v2/health/live").json() == {"live": True}
    assert s.client.get("/v2/health/ready").status_code == 200
    assert s.client.get("/v2/models/nezha/ready").status_code == 200
    meta = s.client.get("/v2/models/nezha").json()
    assert meta["name"] == "nezha" and [i["name"] for i in meta["inputs"]] == ["histories", "lengths"]
    assert s.client.get("/v2/models/other").status_code == 404
    assert s.client.get("/v1/recommend").status_code == 405


def test_batches_form_under_concurrency_and_each_answer_equals_its_solo_answer(serve, library):
    s = serve(workers=1, max_wait_ms=50)
    _slow(s.service, 0.02)            # one slow worker: requests queue behind it and must be batched
    _concurrent_answers_equal_solo_ones(s, library, seed=3, n=48, clients=16)
    assert {name.rsplit("-", 1)[0] for name in s.service.decode_threads} == {"nezha-worker"}   # never the loop
    metrics = s.client.get("/metrics").text
    batches, histories = _metric(metrics, "nezha_batch_size_count"), _metric(metrics, "nezha_batch_size_sum")
    assert histories >= 48 and batches < histories * 0.75, metrics     # batches larger than 1 formed
    assert "nezha_request_seconds_bucket" in metrics and "nezha_queue_depth" in metrics


def _concurrent_answers_equal_solo_ones(s: Server, library, seed: int, n: int, clients: int) -> None:
    """``n`` one-history requests of mixed lengths and two beams from ``clients`` threads: every answer is
    the library's for that history alone."""
    rng = np.random.default_rng(seed)
    ids = tiny_catalog().item_ids
    requests = [{"histories": [rng.choice(ids, size=int(rng.integers(1, 12))).tolist()], "k": 4,
                 "beam": int(rng.choice([8, 16]))} for _ in range(n)]
    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(lambda body: s.post("/v1/recommend", body), requests))
    assert [r.status_code for r in replies] == [200] * n, [r.text for r in replies if r.status_code != 200]
    for body, r in zip(requests, replies):
        assert _pairs(r.json()["results"]) == library.recommend(body["histories"], k=body["k"], beam=body["beam"])


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


def _library_message(library, call) -> str:
    with pytest.raises(ValueError) as e:
        call(library)
    return str(e.value)


LIBRARY_CASES = [   # (body, the same call on the library): the server must answer with the library's message
    ({"histories": [[100, 99999]], "k": 3}, lambda r: r.recommend([[100, 99999]], k=3)),
    ({"histories": [[100]], "k": 0}, lambda r: r.recommend([[100]], k=0)),
    ({"histories": [[100]], "k": 9, "beam": 5}, lambda r: r.recommend([[100]], k=9, beam=5)),
    ({"histories": [[100]], "beam": 10 ** 6}, lambda r: r.recommend([[100]], beam=10 ** 6)),
    ({"histories": [[100]], "k": 3, "beam": 0}, lambda r: r.recommend([[100]], k=3, beam=0)),
    ({"histories": []}, lambda r: r.recommend([])),
    ({"histories": [[100], []]}, lambda r: r.recommend([[100], []])),
    ({"histories": [[100], 5]}, lambda r: r.recommend([[100], 5])),
    ({"histories": [[99999]], "unknown": "skip"}, lambda r: r.recommend([[99999]], unknown="skip")),
    ({"histories": [[100]], "unknown": "drop"}, lambda r: r.recommend([[100]], unknown="drop")),
    ({"histories": [[100, True]]}, lambda r: r.recommend([[100, True]])),                  # bools are not ids
    ({"histories": [[100, 101.0]]}, lambda r: r.recommend([[100, 101.0]])),                # nor floats
    ({"histories": [[100, "101"]]}, lambda r: r.recommend([[100, "101"]])),
    ({"histories": [[100, 2 ** 70]]}, lambda r: r.recommend([[100, 2 ** 70]])),            # beyond int64
    ({"histories": [[[100]]]}, lambda r: r.recommend([[[100]]])),
    ({"histories": [[100]], "k": True}, lambda r: r.recommend([[100]], k=True)),
    ({"histories": [[100]], "k": 2.0}, lambda r: r.recommend([[100]], k=2.0)),
    ({"histories": [[100]], "beam": "8"}, lambda r: r.recommend([[100]], beam="8")),
    ({"histories": [[100]], "k": 17}, lambda r: r.recommend([[100]], k=17)),                # k > max_beam
]


@pytest.mark.parametrize("body,call", LIBRARY_CASES)
def test_bad_requests_get_400_with_the_library_message(serve, library, body, call):
    s = serve()
    r = s.post("/v1/recommend", body)
    assert r.status_code == 400 and r.json() == {"error": _library_message(library, call), "kind": "bad_request"}


HOSTILE = [   # (raw body, a phrase the 400 must contain)
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"histories": [[100, NaN]]}', "NaN is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"histories": [[100, true]]}', "history 0 holds True (bool)"),
    (b'{"histories": [[100, 99999999999999999999999]]}', "must fit int64"),
    (b'{"histories": [[100]], "user": 7}', "unknown field 'user'"),
    (b'{"k": 3}', "missing field 'histories'"),
    (b'[[100]]', "must be a JSON object"),
    (b'{"histories": "100,101"}', "histories must be a list"),
    (json.dumps({"histories": [[100]] * 300}).encode(), "at most 256 allowed"),
]


@pytest.mark.parametrize("body,message", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_bodies_get_400_with_a_clear_message(serve, body, message):
    s = serve()
    r = s.post("/v1/recommend", body)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert s.client.get("/v2/health/ready").status_code == 200


def test_huge_bodies_get_413_without_being_read(serve):
    s = serve(max_body_bytes=4096)
    r = s.post("/v1/recommend", b'{"histories": [[' + b"100," * 5000 + b"100]]}")
    assert r.status_code == 413 and "at most 4096" in r.json()["error"]


def test_v2_infer_checks_its_tensors(serve):
    s = serve()
    base = {"inputs": [{"name": "histories", "datatype": "INT64", "shape": [1, 2], "data": [100, 101]},
                       {"name": "lengths", "datatype": "INT64", "shape": [1], "data": [2]}]}

    def with_(i, **change):
        body = json.loads(json.dumps(base))
        body["inputs"][i].update(change)
        return body
    assert s.post("/v2/models/nezha/infer", base).status_code == 200
    nested = with_(0, data=[[100, 101]])
    assert s.post("/v2/models/nezha/infer", nested).status_code == 200
    for body, message in ((with_(0, datatype="FP32"), "datatype must be INT64"),
                          (with_(0, shape=[1, 3]), "3 expected"),
                          (with_(0, data=[100, True]), "got true (a boolean)"),
                          (with_(1, data=[3]), "lengths[0] = 3"),
                          (with_(1, name="histories"), "once each"),
                          ({**base, "parameters": {"k": 99}}, "k must be an integer in 1..beam")):
        r = s.post("/v2/models/nezha/infer", body)
        assert r.status_code == 400 and message in r.json()["error"], (message, r.text)


@pytest.mark.parametrize("fail", [RuntimeError("secret internal detail"),
                                  GraphRunError("graph backbone failed in ONNX Runtime: secret internal detail")])
def test_an_internal_error_is_500_without_a_traceback(serve, fail):
    """A graph failing mid-run (e.g. the device out of memory) is a NezhaError for the CLI, but the server's fault."""
    s = serve()
    _slow(s.service, 0.0, fail=fail)
    r = s.post("/v1/recommend", {"histories": [[100, 101]], "k": 3})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error; the server log has the details", "kind": "internal"}
    assert "Traceback" not in r.text and "secret" not in r.text
    assert s.client.get("/v2/health/live").status_code == 200


def test_reload_swaps_atomically_and_refuses_a_corrupt_artifact(serve, artifacts, tmp_path, tmp_path_factory):
    first, second = artifacts
    s = serve(artifact=first, **with_admin(tmp_path_factory))
    histories = tiny_histories(tiny_catalog(), n=3)
    with Recommender.load(first) as a, Recommender.load(second) as b:
        solo = lambda rec: json.dumps([rec.recommend([h], k=5)[0] for h in histories])
        answers = {solo(a): "first", solo(b): "second"}
    assert len(answers) == 2                                            # the two models answer differently
    stop, seen, codes = threading.Event(), [[], [], []], []

    def traffic(mine):
        while not stop.is_set():
            r = s.post("/v1/recommend", {"histories": histories, "k": 5})
            codes.append(r.status_code)
            if r.status_code == 200:
                mine.append(answers.get(json.dumps(_pairs(r.json()["results"])), "mixed"))
    threads = [threading.Thread(target=traffic, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    time.sleep(0.3)
    old_version = s.client.get("/v2/models/nezha").json()["versions"][0]
    r = s.post("/admin/reload", {"artifact": str(second)}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["model"]["version"] != old_version, r.text
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(HTTP_TIMEOUT)
    assert set(codes) == {200}                                           # nothing dropped
    for mine in seen:                                                    # per client, in order:
        assert "mixed" not in mine and mine[0] == "first" and mine[-1] == "second"
        assert mine.index("second") == len(mine) - mine[::-1].index("first")   # one switch, never back

    corrupt = tmp_path / "corrupt"
    shutil.copytree(first, corrupt)
    graph = next(corrupt.glob("graphs/fp32/backbone*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-16] + b"\0" * 16)
    r = s.post("/admin/reload", {"artifact": str(corrupt)}, headers=ADMIN)
    assert r.status_code == 400 and "reload refused" in r.json()["error"] and "sha256" in r.json()["error"], r.text
    r = s.post("/admin/reload", {"artifact": str(tmp_path / "missing")}, headers=ADMIN)
    assert r.status_code == 400 and "reload refused" in r.json()["error"]
    r = s.post("/admin/reload", {"artifact": str(second) + "\u0000x"}, headers=ADMIN)
    assert r.status_code == 400 and "NUL character" in r.json()["error"], r.text
    r = s.post("/v1/recommend", {"histories": histories, "k": 5})
    assert answers[json.dumps(_pairs(r.json()["results"]))] == "second"  # the old model stays
    # the corrupt one was loaded and refused; the missing and NUL paths were refused before any load
    assert 'nezha_reloads_total{result="refused"} 1.0' in s.client.get("/metrics").text


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


def _tiny_data(root, histories):
    root.mkdir()
    write_index(tiny_catalog(), root / "tiny.index.json")
    (root / "tiny.inter.json").write_text(json.dumps({str(u): h + [h[0], h[0]] for u, h in enumerate(histories)}))
    return root


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


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "nezha.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("serve", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip().startswith("nezha serve: error:") and "Traceback" not in r.stderr
    data = _tiny_data(tmp_path / "data", tiny_histories(tiny_catalog(), n=4))   # no dependence on the demo data
    for args, message in ((["--processes", "1", "--engine", "ray"], "scale with --replicas"),
                          (["--processes", "2", "--workers", "3"], "give --processes alone"),
                          (["--processes", "-1"], "--processes must be an integer in 0..")):
        r = _cli("serve", str(tmp_path / "missing"), *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("loadtest", "http://127.0.0.1:9", "--duration", "1", "--data", str(data))
    assert r.returncode == 2 and "not reachable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def server_process(artifact, *args, **popen) -> tuple[subprocess.Popen, str]:
    """``nezha serve ARTIFACT *args`` in a process of its own on a free port -> (process, URL), once ready."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nezha.cli", "serve", str(artifact), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
    while True:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.communicate()[1]}")
        time.sleep(0.2)


def test_the_server_process_reloads_on_sighup_and_drains_on_sigterm(artifacts):
    import signal

    proc, url = server_process(artifacts[0])
    try:
        before = httpx.get(url + "/v2/models/nezha", timeout=5).json()["parameters"]["loaded_at"]
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 30
        while httpx.get(url + "/v2/models/nezha", timeout=5).json()["parameters"]["loaded_at"] == before:
            assert time.time() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)
        assert httpx.post(url + "/v1/recommend", json={"histories": [[100]]}, timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn drains, runs the app's shutdown (the batcher drains), then re-raises SIGTERM: exit status -15
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err and "Traceback" not in err, err


def test_serving_loads_no_torch(artifacts):
    code = f"""
import asyncio, sys
from nezha.serve import Service

async def main():
    service = Service({str(artifacts[0])!r})
    await service.start()
    body = b'{{"histories": [[100, 101]], "k": 3}}'

    async def read(limit):
        return body
    reply = await service.handle("POST", "/v1/recommend", read)
    await service.stop()
    print(reply.status, "torch" in sys.modules)
asyncio.run(main())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["200", "False"], r.stderr


def _gone(pids, seconds=10.0) -> bool:
    deadline = time.time() + seconds
    while any(_running(p) for p in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_dead(pool, seconds=10.0) -> None:
    """Until the pool sees every killed child dead (the kernel shows a killed process as a zombie before
    all its threads have exited, and only then can it be waited for)."""
    deadline = time.time() + seconds
    while any(child.alive for child in pool._children):
        assert time.time() < deadline, "a killed decode process is still alive"
        time.sleep(0.05)


def _running(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_decode_processes_answer_like_the_library_and_outlive_a_killed_one(serve, library):
    import os
    import signal

    s = serve(processes=2, max_wait_ms=20)
    pool = s.service.model.pool
    pids = pool.pids()
    assert len(set(pids)) == 2 and os.getpid() not in pids and all(_running(p) for p in pids)
    assert s.client.get("/v2/models/nezha").json()["parameters"]["decode_processes"] == 2
    _concurrent_answers_equal_solo_ones(s, library, seed=5, n=40, clients=12)
    r = s.post("/v1/recommend", {"histories": [[100]], "k": 3, "beam": MAX_BEAM + 1})
    assert r.status_code == 400 and "max_beam" in r.json()["error"]

    # A lone history on an idle server decodes in the server's process (the hop costs more than it frees);
    # a batch goes to a decode process.
    used, real = [], pool.decode_batch
    pool.decode_batch = lambda codes, beam, ks, timeout: (used.append(len(codes)), real(codes, beam, ks, timeout))[1]
    assert s.post("/v1/recommend", {"histories": [[100, 101]], "k": 3}).status_code == 200 and used == []
    assert s.post("/v1/recommend", {"histories": [[100, 101], [102]], "k": 3}).status_code == 200 and used == [2]

    # A decode process dies in the middle of a batch: that request gets 500, the next ones are answered
    # by a fresh process.
    pair = {"histories": [[100, 101], [102]], "k": 3}
    expected = [library.recommend([h], k=3)[0] for h in pair["histories"]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)                      # both hold the next batch until killed
    with ThreadPoolExecutor(1) as threads:
        stuck = threads.submit(s.post, "/v1/recommend", pair)
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        r = stuck.result()
    assert r.status_code == 500 and r.json()["kind"] == "internal" and "Traceback" not in r.text
    _wait_dead(pool)                                      # the idle one too (else its next batch fails)
    in_server, decode_here = [], s.service.model.rec.decode_batch
    s.service.model.rec.decode_batch = lambda codes, beam, ks: (in_server.append(len(codes)), decode_here(codes, beam, ks))[1]
    deadline = time.time() + 60
    while not all(child.ready and child.alive for child in pool._children):
        r = s.post("/v1/recommend", pair)                 # decoded in the server's process meanwhile
        assert r.status_code == 200 and _pairs(r.json()["results"]) == expected
        assert time.time() < deadline, "the killed decode processes did not come back"
        time.sleep(0.05)
    assert in_server and not set(pool.pids()) & set(pids)
    in_server.clear()
    r = s.post("/v1/recommend", pair)
    assert r.status_code == 200 and _pairs(r.json()["results"]) == expected and in_server == []   # back in a child
    live = pool.pids()
    for pid in live:
        os.kill(pid, signal.SIGSTOP)                      # shutdown must not leave them behind, stopped
    s.stop()
    assert _gone(live, 1.0)


def test_reload_with_decode_processes_replaces_them(serve, artifacts, tmp_path_factory):
    first, second = artifacts
    s = serve(processes=1, **with_admin(tmp_path_factory))
    old = s.service.model.pool.pids()
    histories = tiny_histories(tiny_catalog(), n=2)
    r = s.post("/admin/reload", {"artifact": str(second)}, headers=ADMIN)
    assert r.status_code == 200, r.text
    new = s.service.model.pool.pids()
    assert _gone(old) and all(_running(p) for p in new)
    with Recommender.load(second) as rec:
        expected = [rec.recommend([h], k=5)[0] for h in histories]
    r = s.post("/v1/recommend", {"histories": histories, "k": 5})
    assert _pairs(r.json()["results"]) == expected


def test_a_hung_decode_process_is_killed_past_the_deadline_and_replaced(serve, library):
    import os
    import signal

    s = serve(processes=1)
    pool = s.service.model.pool
    [pid] = pool.pids()
    pair = {"histories": [[100, 101], [102]], "k": 3}
    os.kill(pid, signal.SIGSTOP)
    r = s.post("/v1/recommend", pair, headers={"x-nezha-timeout-ms": "300"})
    assert r.status_code == 504
    assert _gone([pid], 10)                               # killed once the batch's deadline + grace passed
    r = s.post("/v1/recommend", pair)
    assert r.status_code == 200 and _pairs(r.json()["results"]) == [library.recommend([h], k=3)[0] for h in pair["histories"]]
    assert pool.pids()[0] not in (None, pid)


def test_a_decode_process_that_cannot_start_again_leaves_its_batches_to_the_server(serve, library, artifacts, tmp_path):
    import os
    import signal

    artifact = tmp_path / "art"
    shutil.copytree(artifacts[0], artifact)
    s = serve(artifact=artifact, processes=1)
    [pid] = s.service.model.pool.pids()
    table = next((artifact / "tables").iterdir())
    table.write_bytes(table.read_bytes() + b"\0")          # a child started now fails its sha256 check
    os.kill(pid, signal.SIGKILL)
    _wait_dead(s.service.model.pool)                      # before the next batch, which then starts a new one
    child = s.service.model.pool._children[0]
    pair = {"histories": [[100, 101], [102]], "k": 3}
    expected = [library.recommend([h], k=3)[0] for h in pair["histories"]]
    deadline = time.time() + 60
    while True:                                           # it starts again in the background and fails its check
        r = s.post("/v1/recommend", pair)                 # meanwhile the server's process answers
        assert r.status_code == 200 and _pairs(r.json()["results"]) == expected
        if child.process is None and child.retry_at > 0:
            break
        assert time.time() < deadline, "the restart neither failed nor succeeded"
        time.sleep(0.05)
    for _ in range(3):                                    # within RETRY_S: not tried again, still answered
        r = s.post("/v1/recommend", pair)
        assert r.status_code == 200 and _pairs(r.json()["results"]) == expected
    assert s.service.model.pool.pids() == [None]


def test_decode_processes_import_nothing_from_the_working_directory(artifacts, tmp_path, monkeypatch):
    import hashlib

    from nezha.serve.pool import DecodePool

    (tmp_path / "numpy.py").write_text("raise ImportError('imported from the working directory')\n")
    monkeypatch.chdir(tmp_path)
    version = hashlib.sha256((artifacts[0] / "manifest.json").read_bytes()).hexdigest()[:12]
    pool = DecodePool(artifacts[0], {"threads": 1}, 1, version)
    try:
        results = pool.decode_batch([np.zeros((2, 3), np.int64)], 4, [4], timeout=1e12)   # capped, not an overflow
        assert len(results) == 1 and 1 <= len(results[0]) <= 4
    finally:
        pids = pool.pids()
        pool.close()
    assert _gone(pids)


def test_a_decode_process_that_cannot_load_refuses_the_load_with_its_error(artifacts, tmp_path):
    from nezha.runtime.errors import NezhaError, InputError
    from nezha.serve.model import load_model
    from nezha.serve.pool import DecodePool

    with pytest.raises(NezhaError, match="not an artifact folder"):             # the child's own error, pickled back
        DecodePool(tmp_path / "missing", {"threads": 1}, 1, "version")
    for bad in (-1, True, 2.0, 10_000):
        with pytest.raises(InputError, match="processes must be an integer in 0.."):
            load_model(artifacts[0], LoadOptions(processes=bad))


def test_decode_threads_default_to_the_cores_a_decode_can_use():
    from nezha.serve.model import auto_workers
    assert auto_workers(0.65, 0.0005, cores=8) == 1          # the Python loop on a small model: the GIL binds
    assert auto_workers(0.95, 0.0003, cores=2) == 1          # short GIL-free decodes: a core left for HTTP
    assert auto_workers(0.95, 0.0003, cores=8) == 7
    assert auto_workers(0.99, 0.05, cores=2) == 2            # long GIL-free decodes (104.6M): every core
    assert auto_workers(0.99, 0.05, cores=1) == auto_workers(0.95, 0.0003, cores=1) == 1
