"""What the nezha serve tests share: tiny artifacts built like theirs, uvicorn in a thread (Server and the
``serve`` fixture), the admin token, a slow decode, the load generator's data and the CLI. The session's
two served artifacts and the library over the first are conftest's ``artifacts`` and ``library``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import tiny_catalog, tiny_model, write_index
from nezha.export.build import build
from nezha.model.checkpoint import save_checkpoint
from nezha.serve import LoadOptions, ServeOptions, Service
from nezha.serve.admin import token_digest
from nezha.serve.app import uvicorn_config


MAX_BATCH, MAX_BEAM = 8, 16
HTTP_TIMEOUT = 20.0


def _build(root, seed):
    ckpt = save_checkpoint(tiny_model(seed=seed), root / f"ckpt{seed}", tiny_catalog())
    build(ckpt, write_index(tiny_catalog(), root / "tiny.index.json"), root / f"art{seed}", precision=("fp32",),
          max_batch=MAX_BATCH, max_beam=MAX_BEAM, log=None)
    return root / f"art{seed}"


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


def _tiny_data(root, histories):
    root.mkdir()
    write_index(tiny_catalog(), root / "tiny.index.json")
    (root / "tiny.inter.json").write_text(json.dumps({str(u): h + [h[0], h[0]] for u, h in enumerate(histories)}))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "nezha.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


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
