"""nezha serve's HTTP routes on 127.0.0.1 against artifacts built from tiny checkpoints: served answers equal
the library's (v1 and v2 JSON, health, metadata), bad and hostile requests get the library's messages, huge
bodies 413, internal errors 500 without a traceback. Every network call is local and bounded by a timeout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_catalog, tiny_histories
from nezha.runtime.errors import GraphRunError
from serve_fixtures import _pairs, _slow, serve  # noqa: F401


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
