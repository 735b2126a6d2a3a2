"""nezha serve as someone else reaching its port finds it: the admin API closed unless turned on, metric
series that requests cannot grow, connections and waits bounded (a healthy client is answered even past the
descriptor limit), large bodies parsed off the event loop, every malformed request a 4xx with a clear
message. Every network call is local and bounded by a timeout; no test asserts a duration."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import shutil
import socket
import threading

import httpx
import pytest

from serve_fixtures import ADMIN, ADMIN_TOKEN, _cli, serve, server_process, with_admin   # noqa: F401
from nezha.serve import ServeOptions, Service
from nezha.serve import protocol as P
from nezha.serve.admin import token_digest
from nezha.serve.app import create_app
from nezha.serve.connections import FD_RESERVE, ConnectionLimits
from nezha.serve.service import FIXED_ROUTES

V2 = {"inputs": [{"name": "histories", "datatype": "INT64", "shape": [1, 2], "data": [100, 101]},
                 {"name": "lengths", "datatype": "INT64", "shape": [1], "data": [2]}]}


def _v2(**change) -> dict:
    return {**json.loads(json.dumps(V2)), **change}


def _v2_input(i: int, **change) -> dict:
    body = _v2()
    return body["inputs"][i].update(change) or body


# --- the admin API -----------------------------------------------------------------------------------------
def test_admin_answers_404_unless_a_token_is_configured(serve):
    s = serve()
    for method in ("POST", "GET"):
        r = s.client.request(method, "/admin/reload", content=b"{}", headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"].startswith("no route"), r.text
    assert s.client.post("/admin/elsewhere", content=b"{}", headers=ADMIN).status_code == 404


def test_admin_checks_the_bearer_token_then_the_content_type(serve, tmp_path_factory):
    s = serve(**with_admin(tmp_path_factory))
    json_only = {"Content-Type": "application/json"}
    r = s.post("/admin/reload", {}, headers=json_only)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
    for wrong in ("Bearer " + ADMIN_TOKEN[:-1], "Bearer " + ADMIN_TOKEN + "x", "Basic " + ADMIN_TOKEN, "Bearer"):
        r = s.post("/admin/reload", {}, headers={**json_only, "Authorization": wrong})
        assert r.status_code in (401, 403) and "token" in r.json()["error"], (wrong, r.text)
    r = s.post("/admin/reload", {}, headers={**ADMIN, "Authorization": "Bearer " + ADMIN_TOKEN[:-1] + "?"})
    assert r.status_code == 403 and r.json()["error"] == "wrong admin token"
    for media_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Authorization": ADMIN["Authorization"], **({"Content-Type": media_type} if media_type else {})}
        r = s.post("/admin/reload", {}, headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"], (media_type, r.text)
    r = s.post("/admin/reload", {}, headers={**ADMIN, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "browser" in r.json()["error"]
    before = s.service.model
    r = s.post("/admin/reload", b"", headers={**ADMIN, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and s.service.model is not before, r.text    # the served artifact, loaded again


def test_reloads_name_only_artifacts_under_the_root_and_say_nothing_about_outside(serve, artifacts, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(artifacts[0], root / "v2")
    shutil.copytree(artifacts[0], outside / "real")
    (root / "escape").symlink_to(outside / "real")                # a link under the root that leaves it
    (root / "loop").symlink_to(root / "loop")
    s = serve(admin_token_sha256=token_digest(ADMIN_TOKEN), artifact_root=str(root))

    def reload(name):
        return s.post("/admin/reload", {"artifact": name}, headers=ADMIN)
    refusals = {}
    for name in (str(outside / "real"), str(outside / "missing"), "../outside/real", "../outside/missing",
                 "escape", "/proc/self/cwd", "/etc/passwd", str(root / ".." / "outside" / "real")):
        r = reload(name)
        assert r.status_code == 403, (name, r.text)
        refusals[name] = r.json()["error"].replace(repr(name[:80]), "NAME")
        assert str(os.getpid()) not in r.text and os.getcwd() not in r.text and str(outside) not in r.text.replace(name, "")
    assert len(set(refusals.values())) == 1, refusals           # existing or not, inside a link or not: one answer
    r = reload("loop")
    assert r.status_code == 400 and "no artifact folder 'loop'" in r.json()["error"], r.text
    r = reload("v2")                                             # a name relative to the root, as in Triton
    assert r.status_code == 200 and r.json()["model"]["artifact"] == str((root / "v2").resolve()), r.text
    r = reload(str(root / "v2"))
    assert r.status_code == 200, r.text


def test_naming_an_artifact_without_an_artifact_root_is_refused(serve):
    s = serve(admin_token_sha256=token_digest(ADMIN_TOKEN))
    r = s.post("/admin/reload", {"artifact": "/tmp"}, headers=ADMIN)
    assert r.status_code == 403 and "--artifact-root" in r.json()["error"]


# --- metrics ------------------------------------------------------------------------------------------------
def _series(service: Service) -> int:
    return sum(1 for line in service.metrics.exposition().decode().splitlines() if line and not line.startswith("#"))


def test_random_paths_do_not_add_metric_series(artifacts):
    """100,000 requests of random paths through the ASGI app in-process: the series count stays the same."""
    service = Service(artifacts[0], ServeOptions())
    app, rng = create_app(service), random.Random(0)
    prefixes = ("/v", "/v1/", "/v2/", "/v2/models/", "/admin/", "/metrics/", "/", "/v2/models/nezha/versions/")
    tails = ("", "/ready", "/infer", "/x")

    async def request(method, path):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [], "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "root_path": ""}
        await app(scope, receive, lambda message: asyncio.sleep(0, sent.append(message)))
        return sent[0]["status"]

    async def burst(n):
        statuses = set()
        for _ in range(n):
            word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789-_.%", k=rng.randint(1, 24)))
            statuses.add(await request(rng.choice(("GET", "POST")), rng.choice(prefixes) + word + rng.choice(tails)))
        return statuses

    async def main():
        for path in ("/v1/recommend", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2", "/admin/reload",
                     "/v2/models/x", "/v2/models/x/ready", "/v2/models/x/infer", "/elsewhere"):
            for method in ("GET", "POST"):                       # every route and answer once
                await request(method, path)
        before = _series(service)
        statuses = await burst(100_000)
        return before, statuses
    before, statuses = asyncio.run(main())
    assert statuses <= {200, 404, 405, 503} and _series(service) == before, (before, _series(service))
    labels = set(re.findall(r'route="([^"]*)"', service.metrics.exposition().decode()))
    assert labels <= set(FIXED_ROUTES) | {"unmatched", "/v2/models/{name}", "/v2/models/{name}/ready",
                                          "/v2/models/{name}/infer"}, labels


# --- connections and waits ----------------------------------------------------------------------------------
def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_headers_get_408_and_oversized_headers_431(serve):
    s = serve(limits=ConnectionLimits(header_timeout_s=0.3, max_header_bytes=4096))
    with _raw(s.url) as slow:
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")         # and nothing more
        answer = _answer(slow)                                                    # the server closes it
    assert answer.startswith(b"HTTP/1.1 408") and b"headers not complete" in answer, answer
    with _raw(s.url) as big:
        big.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 8000 + b"\r\n")
        answer = _answer(big)
    assert answer.startswith(b"HTTP/1.1 431"), answer
    assert s.client.get("/v2/health/live").status_code == 200                  # healthy clients are not affected
    metrics = s.client.get("/metrics").text
    assert 'nezha_connections_closed_total{reason="header_timeout"} 1.0' in metrics
    assert 'nezha_connections_closed_total{reason="header_too_large"} 1.0' in metrics


def test_a_slow_body_gets_408(serve):
    s = serve(body_timeout_s=0.3)
    with _raw(s.url) as slow:
        slow.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"histories\"")
        answer = _answer(slow)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer


def test_a_healthy_client_is_answered_past_the_descriptor_limit(artifacts):
    """The server's descriptor limit at 1024 and 1,300 connections that never finish their headers (and a
    header timeout long past the test): the healthy client still gets its answer, in a new connection."""
    slow_count, limit = 1300, 1024
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < slow_count + 200:
        pytest.skip("this test process may not open enough descriptors")
    proc, url = server_process(artifacts[0], "--header-timeout", "600", "--log-level", "warning",
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    port, slow = int(url.rsplit(":", 1)[1]), []
    try:
        for _ in range(slow_count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        with httpx.Client(base_url=url, timeout=10) as client:      # a fresh connection, 10 s at most
            assert client.post("/v1/recommend", json={"histories": [[100, 101]], "k": 3}).status_code == 200
            metrics = client.get("/metrics").text
        evicted = float(re.search(r'nezha_connections_closed_total\{reason="evicted"\} (\S+)', metrics).group(1))
        assert evicted >= slow_count - (limit - FD_RESERVE), metrics   # the oldest slow ones made room
    finally:
        for s in slow:
            s.close()
        proc.kill()
        proc.communicate()


def test_health_is_answered_while_a_maximum_size_body_is_parsed(serve, monkeypatch):
    """The parse of a maximum-size body is held until health has answered: if parsing ran on the event
    loop, health could not answer (its client would time out)."""
    limit = 1 << 20
    s = serve(max_body_bytes=limit)
    started, release, real = threading.Event(), threading.Event(), P.parse_recommend

    def held_parse(obj, rec, max_histories):
        started.set()
        release.wait(30)
        return real(obj, rec, max_histories)
    monkeypatch.setattr(P, "parse_recommend", held_parse)
    history = [100 + i % 50 for i in range(40)]
    body = json.dumps({"histories": [history] * 200, "unknown": "error"}).encode()
    body = body[:-1] + b" " * (limit - len(body)) + b"}"                           # exactly the limit
    results: list = []
    big = threading.Thread(target=lambda: results.append(s.post("/v1/recommend", body)))
    big.start()
    try:
        assert started.wait(30)
        assert s.client.get("/v2/health/live", timeout=5).status_code == 200
        assert not release.is_set()
    finally:
        release.set()
        big.join(60)
    assert results[0].status_code == 200, results[0].text


# --- malformed requests -------------------------------------------------------------------------------------
BIG = "9" * 5000                                   # past Python's 4300-digit limit for int()
MALFORMED = [   # (path, raw body, status, a phrase the error must contain)
    ("/v1/recommend", f'{{"histories": [[100, {BIG}]]}}', 400, "more than 4300 digits"),
    ("/v1/recommend", f'{{"histories": [[100]], "k": {BIG}}}', 400, "more than 4300 digits"),
    ("/v1/recommend", f'{{"histories": [[[[[[{BIG}]]]]]]}}', 400, "more than 4300 digits"),
    ("/v2/models/nezha/infer", json.dumps(_v2(parameters={"k": 1}))[:-1].replace('"k": 1', f'"k": {BIG}') + "}", 400,
     "more than 4300 digits"),
    ("/v1/recommend", '{"histories": [[100]], "k": 3, "k": 5}', 400, "key 'k' appears twice"),
    ("/v1/recommend", '{"histories": [[100]], "histories": [[101]]}', 400, "key 'histories' appears twice"),
    ("/v2/models/nezha/infer", json.dumps(V2).replace('"name": "lengths"', '"name": "lengths", "name": "lengths"'),
     400, "appears twice"),
    *[("/v2/models/nezha/infer", json.dumps(_v2(parameters=p)), 400, "'parameters' must be a JSON object")
      for p in (None, [], False, 0, "", "k=3")],
    ("/v2/models/nezha/infer", json.dumps(_v2(parameters={"k": 3, "temperature": 1})), 400, "unknown field 'temperature'"),
    ("/v2/models/nezha/infer", json.dumps(_v2(outputs=[{"name": "logits"}])), 400, "the outputs are items, scores, counts"),
    ("/v2/models/nezha/infer", json.dumps(_v2(outputs=[{"name": "items"}, {"name": "items"}])), 400, "at most once"),
    ("/v2/models/nezha/infer", json.dumps(_v2(outputs=["items"])), 400, "must be a JSON object"),
    ("/v2/models/nezha/infer", json.dumps(_v2(outputs={"name": "items"})), 400, "'outputs' must be a list"),
    ("/v2/models/nezha/infer", json.dumps(_v2(outputs=[{"name": "items", "parameters": {"classification": 2}}])), 400,
     "unknown field 'classification'"),  # binary_data is the binary extension's (serve.binary)
    ("/v2/models/nezha/infer", json.dumps(_v2_input(0, parameters={"shm": 1})), 400, "unknown field 'shm'"),
    ("/v2/models/nezha/infer", json.dumps(_v2_input(0, parameters=None)), 400, "'parameters' must be a JSON object"),
    ("/v2/models/nezha/infer", json.dumps(_v2_input(0, shape=[4, 4611686018427387905], data=[100] * 4)), 400,
     "(18446744073709551620 expected)"),                                         # np.prod wraps around to 4
    ("/v2/models/nezha/infer", json.dumps(_v2_input(0, shape=[1 << 63, 1])), 400, "shape must be 2 non-negative integers"),
    ("/v2/models/nezha/infer", json.dumps(_v2_input(0, shape=[1, -2])), 400, "shape must be 2 non-negative integers"),
    ("/v2/models/nezha/infer", json.dumps(_v2_input(0, datatype=5)), 400, "datatype must be INT64, got 5"),
    ("/v2/models/nezha/infer", json.dumps(_v2(id=5)), 400, "id must be a string"),
    ("/v2/models/nezha/infer", json.dumps(_v2(inputs=None)), 400, "'inputs' must be a list"),
    ("/v2/models/nezha/infer", json.dumps(_v2_input(1, data=[2 ** 64])), 400, "outside int64"),
]


@pytest.mark.parametrize("path,body,status,phrase", MALFORMED, ids=[f"malformed{i}" for i in range(len(MALFORMED))])
def test_malformed_requests_get_a_4xx_with_a_clear_message(serve, path, body, status, phrase):
    s = serve()
    r = s.post(path, body.encode())
    assert r.status_code == status and phrase in r.json()["error"], r.text
    assert len(r.json()["error"]) < 1100                                        # an echoed value is clipped


def test_v2_outputs_select_what_is_returned(serve):
    s = serve()
    r = s.post("/v2/models/nezha/infer", _v2(outputs=[{"name": "counts"}, {"name": "items", "parameters": {}}]))
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["items", "counts"], r.text


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_ports_outside_1_to_65535_are_refused(artifacts, port):
    r = _cli("serve", str(artifacts[0]), "--port", port)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--port must lie in 1..65535" in r.stderr, r.stderr


def test_a_short_or_unreadable_admin_token_is_refused_in_one_line(artifacts, tmp_path):
    (tmp_path / "short").write_text("abc\n")
    for path, message in ((tmp_path / "short", "at least 16"), (tmp_path / "missing", "No such file")):
        r = _cli("serve", str(artifacts[0]), "--admin-token-file", str(path))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
