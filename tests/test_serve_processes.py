"""nezha serve --processes N: decode processes answer like the library, outlive a killed or hung one, are
replaced on reload, leave their batches to the server when they cannot start, import nothing from the
working directory and refuse a load with the child's error. Every network call is local and bounded."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories
from nezha.runtime import Recommender
from nezha.serve import LoadOptions
from serve_fixtures import (ADMIN, MAX_BEAM, _concurrent_answers_equal_solo_ones, _pairs, serve,  # noqa: F401
                            with_admin)


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
