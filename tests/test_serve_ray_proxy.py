"""Pieces of the Ray engine that need no running Ray: the proxy middleware that retries a request lost with
its replica (driven here by fake proxies), and the CLI's cluster and autoscaling options. Seconds."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("starlette")

from nezha.cli import main                                       # noqa: E402
from nezha.serve.ray_proxy import RetryLostReplica               # noqa: E402


class FakeProxy:
    """Ray's proxy as the middleware sees it: per call, either answers (status), returns without a response
    (None: its replica died), never answers (``"hang"``) or sees the client disconnect (``"gone"``)."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls, self.bodies = list(outcomes), 0, []

    async def __call__(self, scope, receive, send):
        self.calls += 1
        message = await receive()
        self.bodies.append(message.get("body"))
        outcome = self.outcomes.pop(0)
        if outcome == "gone":                                    # the client went away: Ray answers nobody
            assert (await receive())["type"] == "http.disconnect"
            return
        if outcome == "hang":
            await asyncio.sleep(3600)
        if outcome is not None:
            await send({"type": "http.response.start", "status": outcome, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})


def call(app, path="/v1/recommend", body=b'{"histories": [[1]]}', disconnect=False):
    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(RetryLostReplica(app)({"type": "http", "path": path}, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    return start and (start["status"], dict(start["headers"])), sent


def test_a_request_lost_with_its_replica_is_sent_again_with_its_body():
    proxy = FakeProxy(None, 200)
    (status, headers), _ = call(proxy)
    assert status == 200 and proxy.calls == 2 and proxy.bodies == [b'{"histories": [[1]]}'] * 2
    assert headers[b"x-nezha-retried"] == b"1"
    assert b"x-nezha-retried" not in call(FakeProxy(200))[0][1]


def test_the_services_own_answers_are_never_retried():
    for code in (200, 400, 500, 503):
        proxy = FakeProxy(code)
        assert call(proxy)[0][0] == code and proxy.calls == 1


def test_a_second_loss_or_a_retry_without_answer_is_a_clean_503(monkeypatch):
    import nezha.serve.ray_proxy as rp
    monkeypatch.setattr(rp, "RETRY_WAIT_S", 0.2)
    for second in (None, "hang"):
        proxy = FakeProxy(None, second)
        (status, headers), sent = call(proxy)
        assert (status, headers[b"retry-after"], proxy.calls) == (503, b"1", 2)
        assert json.loads(sent[-1]["body"])["kind"] == "unavailable"


def test_a_reload_is_not_retried_and_a_client_gone_gets_nothing():
    proxy = FakeProxy(None, 200)
    assert call(proxy, path="/admin/reload")[0][0] == 503 and proxy.calls == 1
    proxy = FakeProxy("gone", 200)
    assert call(proxy, disconnect=True) == (None, []) and proxy.calls == 1


def test_the_buffered_body_is_held_to_the_services_bounds():
    """Before the service sees it: a declared size over --max-body-bytes 413 unread, a body growing past it
    413 with at most the limit read (was: up to 16 MiB), one that stalls 408 after --body-timeout (was: never)."""
    def run(headers, chunks, stall):
        proxy, received = FakeProxy(200), []

        async def receive():
            if chunks:
                received.append(chunks.pop(0))
                return {"type": "http.request", "body": received[-1], "more_body": bool(chunks) or stall}
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)
        sent = []
        middleware = RetryLostReplica(proxy, max_body_bytes=1000, body_timeout_s=0.2)
        asyncio.run(middleware({"type": "http", "path": "/v1/recommend", "headers": headers}, receive, send))
        return sent[0]["status"], json.loads(sent[-1]["body"]), proxy.calls, sum(map(len, received))
    status, answer, calls, read = run([(b"content-length", b"100000000")], [b"x" * 600] * 5, stall=False)
    assert (status, answer["kind"], calls, read) == (413, "too_large", 0, 0) and "at most 1000" in answer["error"]
    status, answer, calls, read = run([], [b"x" * 600] * 5, stall=False)
    assert (status, answer["kind"], calls, read) == (413, "too_large", 0, 1200)
    status, answer, calls, read = run([(b"content-length", b"900")], [b"x" * 600], stall=True)
    assert (status, answer["kind"], calls) == (408, "request_timeout", 0) and "--body-timeout" in answer["error"]
    assert run([(b"content-length", b"900")], [b"x" * 600, b"x" * 300], stall=False)[::2] == (200, 1)


def _serve(tmp_path, monkeypatch, *options):
    """Run `nezha serve ART --engine ray OPTIONS` with serve_blocking replaced -> its arguments or the exit code."""
    pytest.importorskip("ray")
    import nezha.serve.ray_deploy as engine
    (tmp_path / "manifest.json").write_text("{}")
    seen = {}
    monkeypatch.setattr(engine, "serve_blocking", lambda *a, **kw: seen.update(kw))
    code = main(["serve", str(tmp_path), "--engine", "ray", *options])
    return seen if code == 0 else code


def test_cluster_and_autoscaling_options(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _serve(tmp_path, monkeypatch)["address"] is None
    kw = _serve(tmp_path, monkeypatch, "--ray-address", "10.0.0.1:6379", "--replicas", "3")
    assert (kw["address"], kw["replicas"], kw["autoscaling"]) == ("10.0.0.1:6379", 3, None)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    kw = _serve(tmp_path, monkeypatch, "--max-replicas", "8")
    assert kw["address"] == "head:6379"
    assert kw["autoscaling"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 4.0}
    kw = _serve(tmp_path, monkeypatch, "--min-replicas", "2", "--max-replicas", "5", "--target-ongoing-requests", "16")
    assert kw["autoscaling"] == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 16.0}
    capsys.readouterr()
    for bad, message in ((["--min-replicas", "2"], "need --max-replicas"),
                         (["--replicas", "2", "--max-replicas", "4"], "without --replicas"),
                         (["--min-replicas", "5", "--max-replicas", "4"], "above --max-replicas"),
                         (["--max-replicas", "4", "--target-ongoing-requests", "nan"], "target-ongoing-requests"),
                         (["--max-replicas", "4", "--target-ongoing-requests", "0"], "target-ongoing-requests"),
                         (["--max-replicas", "0"], "--max-replicas must be >= 1")):
        assert _serve(tmp_path, monkeypatch, *bad) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_the_config_builder_checks_its_args():
    pytest.importorskip("ray")
    from nezha.runtime.errors import InputError
    from nezha.serve.ray_deploy import build_app
    for args, message in (({"artifact": "relative/art"}, "absolute path"), ({}, "absolute path"),
                          ({"artifact": "/a", "replica": 2}, "unknown replica"),
                          ({"artifact": "/a", "options": {"max_queues": 1}}, r"unknown ServeOptions field\(s\) max_queues")):
        with pytest.raises(InputError, match=message):
            build_app(args)
