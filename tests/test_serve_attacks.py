"""nezha serve under the second hostile review (issue 21): bodies that stall at the connection cap, strings
JSON allows but UTF-8 cannot encode, values whose error message would cost more to build than the request,
admin edge cases (long or non-Unicode names, GET with the token, token files that are FIFOs or binary).
Every network call is local and bounded by a timeout; no test asserts a duration."""

from __future__ import annotations

import json
import os
import threading

import httpx
import pytest

from serve_fixtures import ADMIN, ADMIN_TOKEN, _cli, _metric, _slow, serve   # noqa: F401
from test_serve_hardening import _answer, _raw
from nezha.runtime.errors import NezhaError, clipped
from nezha.serve import protocol as P
from nezha.serve.admin import read_token, token_digest
from nezha.serve.connections import ConnectionLimits

STALLS = (   # headers complete, the body never does
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n",
)


def test_stalled_bodies_are_evicted_at_the_connection_cap(serve):
    """Twice the cap in connections whose body never completes, and a body timeout long past the test: a
    healthy client is still answered, and the oldest stalled ones were closed with a 408 to make room."""
    cap = 6
    s = serve(body_timeout_s=600, limits=ConnectionLimits(max_connections=cap))
    stalled = []
    try:
        for i in range(2 * cap):
            sock = _raw(s.url)
            sock.sendall(STALLS[i % len(STALLS)])
            stalled.append(sock)
        with httpx.Client(base_url=s.url, timeout=10) as client:     # a fresh connection
            assert client.post("/v1/recommend", json={"histories": [[100, 101]], "k": 3}).status_code == 200
            first = _answer(stalled[0])
            assert first.startswith(b"HTTP/1.1 408") and b"evicted" in first, first
            metrics = client.get("/metrics").text
        assert _metric(metrics, 'nezha_connections_closed_total{reason="evicted"}') >= cap + 1, metrics   # 2 cap - cap + the healthy one
        assert 'status="500"' not in metrics, metrics                  # the evicted requests' handlers saw a 499
    finally:
        for sock in stalled:
            sock.close()


def test_a_request_being_processed_is_never_evicted(serve):
    """At a cap of one, a connection whose whole request arrived (now decoding) keeps its slot: the newcomer
    gets 503 and the first its answer."""
    s = serve(limits=ConnectionLimits(max_connections=1))
    _slow(s.service, 1.5)
    results = []
    with _raw(s.url) as first:
        body = json.dumps({"histories": [[100, 101]], "k": 3}).encode()
        first.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reader = threading.Thread(target=lambda: results.append(_answer(first)))
        reader.start()
        while not s.service.decode_threads:                             # the decode has begun
            threading.Event().wait(0.02)
        with _raw(s.url) as newcomer:                               # refused on connect, before it sends
            assert _answer(newcomer).startswith(b"HTTP/1.1 503")
        reader.join(30)
    assert results[0].startswith(b"HTTP/1.1 200"), results


def test_a_lone_surrogate_in_the_id_is_echoed_escaped_and_counted_as_sent(serve):
    s = serve()
    body = ('{"id": "\\ud800", "inputs": [{"name": "histories", "datatype": "INT64", "shape": [1, 2], "data": [100, 101]},'
            ' {"name": "lengths", "datatype": "INT64", "shape": [1], "data": [2]}]}')
    r = s.post("/v2/models/nezha/infer", body.encode())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert b'"id":"\\ud800"' in r.content and r.content.isascii(), r.content[:200]
    metrics = s.client.get("/metrics").text
    assert _metric(metrics, 'nezha_requests_total{route="/v2/models/{name}/infer",status="200"}') == 1, metrics


def test_error_messages_show_a_clipped_value_however_large(library):
    """A 524k-element list sent as k or beam, or as a v2 input's name: the message is built from its first
    elements (building repr() of the whole held the GIL ~60 ms, stalling every other request)."""
    huge = [1] * 524_000
    for call in (lambda: library.beam_for(huge, None), lambda: library.beam_for(3, huge),
                 lambda: P.parse_v2_infer({"inputs": [{"name": huge}]}, library, 8),
                 lambda: P.parse_v2_infer({"inputs": [{"name": "histories", "datatype": huge}]}, library, 8)):
        with pytest.raises(NezhaError) as e:
            call()
        assert "[1, 1, 1" in str(e.value) and len(str(e.value)) < 300, str(e.value)[:400]
    assert clipped(10 ** 5000) == "<an integer of 16610 bits>"                   # repr() would raise past 4300 digits


def test_reload_names_too_long_or_not_unicode_are_a_400(serve, tmp_path):
    s = serve(admin_token_sha256=token_digest(ADMIN_TOKEN), artifact_root=str(tmp_path))
    for body, phrase in (({"artifact": "a" * 300}, "File name too long"), ({"artifact": "a/" * 3000}, "File name too long"),
                         ('{"artifact": "\\ud800"}', "must be valid Unicode")):
        r = s.post("/admin/reload", body, headers=ADMIN)
        assert r.status_code == 400 and phrase in r.json()["error"], r.text


def test_model_metadata_names_the_artifact_folder_not_its_path(serve, artifacts):
    r = serve().client.get("/v2/models/nezha")
    assert r.status_code == 200 and r.json()["parameters"]["artifact"] == artifacts[0].name, r.text


def test_every_other_method_gets_a_json_405_counted_in_the_metrics(serve, tmp_path):
    s = serve(admin_token_sha256=token_digest(ADMIN_TOKEN), artifact_root=str(tmp_path))
    r = s.client.get("/admin/reload", headers={"Authorization": ADMIN["Authorization"]})   # no content type
    assert r.status_code == 405 and "use POST" in r.json()["error"], r.text
    for method, path in (("OPTIONS", "/v2/health/live"), ("TRACE", "/v1/recommend"), ("OPTIONS", "/nowhere")):
        r = s.client.request(method, path)
        assert r.status_code in (404, 405) and r.json()["kind"] in ("method", "not_found"), (method, path, r.text)
    metrics = s.client.get("/metrics").text
    assert _metric(metrics, 'nezha_requests_total{route="/v2/health/live",status="405"}') == 1, metrics
    assert _metric(metrics, 'nezha_requests_total{route="/v1/recommend",status="405"}') == 1, metrics


def test_token_files_that_are_not_regular_text_or_hold_non_ascii_are_refused(artifacts, tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "fifo")                                    # open() would wait for a writer forever
    r = _cli("serve", str(artifacts[0]), "--admin-token-file", str(tmp_path / "fifo"), timeout=60)
    assert r.returncode == 2 and "is not a regular file" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + b"\x00" * 30)
    (tmp_path / "accented").write_text("token-with-accent-\u00e9-0123456789\n")
    for name, phrase in (("binary", "is not a text file"), ("accented", "printable ASCII")):
        with pytest.raises(ValueError, match=phrase) as e:
            read_token(tmp_path / name)
        assert name in str(e.value)
    monkeypatch.setenv("NEZHA_ADMIN_TOKEN", "token\u00e9-0123456789abcdef")
    with pytest.raises(ValueError, match="printable ASCII"):
        read_token(None)
