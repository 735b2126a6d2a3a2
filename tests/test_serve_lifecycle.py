"""nezha serve's life: an admin reload swaps atomically or refuses a corrupt artifact, the CLI's errors are
one line, the server process reloads on SIGHUP and drains on SIGTERM, serving loads no torch. Every
network call is local and bounded by a timeout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx

from conftest import tiny_catalog, tiny_histories
from nezha.runtime import Recommender
from serve_fixtures import (ADMIN, HTTP_TIMEOUT, _cli, _pairs, _tiny_data, serve, server_process,  # noqa: F401
                            with_admin)


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
