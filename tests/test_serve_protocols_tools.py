"""The tooling around the KServe v2 protocols: the compiled gRPC descriptor matches the proto, --grpc-port's
errors are one line, the load generator and the protocol-cost bench measure JSON, binary and gRPC side by
side. Every call is local and bounded by a timeout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

tritonclient = pytest.importorskip("tritonclient")
grpc = pytest.importorskip("grpc")

from conftest import tiny_catalog, tiny_histories  # noqa: E402
from protocol_clients import artifact, serve  # noqa: E402,F401


def test_the_compiled_descriptor_matches_the_proto():
    pytest.importorskip("grpc_tools")
    from nezha.serve.kserve import DESCRIPTOR_TEXT
    from nezha.serve.kserve.__main__ import compiled_text

    assert compiled_text() == DESCRIPTOR_TEXT.read_text(), "run: python -m nezha.serve.kserve"


def test_grpc_port_option_errors_are_one_line(tmp_path, artifact):
    from serve_fixtures import _cli

    for args, message in ((["--grpc-port", "0"], "--grpc-port must be a port in 1..65535"),
                          (["--grpc-port", "8000"], "other than --port"),
                          (["--grpc-port", "65536", "--engine", "ray"], "got 65536"),
                          (["--grpc-transport", "native"], "--grpc-transport is for --grpc-port on the uvicorn engine"),
                          (["--grpc-port", "9001", "--grpc-transport", "grpcio", "--engine", "ray"], "Ray Serve's own gRPC"),
                          (["--grpc-port", "9001", "--grpc-transport", "fast"], "invalid choice: 'fast'")):
        r = _cli("serve", str(tmp_path / "missing"), *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    # a libnezha_grpc missing or broken: one line, exit 3 (Unavailable), before the model loads
    from nezha.runtime.backends.cpp import library_path
    (tmp_path / "broken.so").write_text("not a library")
    cases = [("native", tmp_path / "missing.so", "names {!r}, which is not a file"),
             ("auto", tmp_path / "broken.so", "{!r} is not a usable libnezha_grpc (not a 64-bit")]
    if library_path().is_file():                     # another library: the C++ runtime's
        cases.append(("native", library_path(), "{!r} is not a usable libnezha_grpc (" + str(library_path()) +
                      ": undefined symbol: nezha_grpc_start)"))
    built = library_path("libnezha_grpc.so", "NEZHA_GRPC_LIBRARY")
    if built.is_file():                              # half-copied: the loader would die of SIGBUS
        (tmp_path / "half.so").write_bytes(built.read_bytes()[:100_000])
        cases.append(("auto", tmp_path / "half.so", "{!r} is not a usable libnezha_grpc (truncated"))
    for transport, library, message in cases:
        r = _cli("serve", str(artifact), "--port", "18999", "--grpc-port", "18998", "--grpc-transport", transport,
                 env={"NEZHA_GRPC_LIBRARY": str(library)})
        assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert message.format(str(library)) in r.stderr, r.stderr


def test_loadtest_measures_the_protocols_side_by_side(serve, tmp_path):
    from nezha.serve.loadtest import run_loadtest
    from nezha.runtime.errors import InputError
    from serve_fixtures import _tiny_data

    s = serve()
    data = _tiny_data(tmp_path / "data", tiny_histories(tiny_catalog(), n=40))
    # one client and two: gRPC's clients send their next request from the last one's completion callback
    result = run_loadtest([f"http://{s.url}"], concurrency=[1, 2], duration=0.6, warmup=0.1, k=5, beam=8, data=data,
                          histories_per_request=3, protocol=["json", "binary", "grpc"], grpc_port=s.grpc_port,
                          out=tmp_path / "lt")
    from nezha.serve.grpc_native import library
    assert result["setup"]["grpc_client"] == ("gRPC C++ (libnezha_grpc)" if library() else "grpcio")
    threads = {Path(t, "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()}
    assert ("nezha-grpc" in threads) == (library() is not None)        # auto: the native transport when built
    for point in result["points"]:
        assert list(point["servers"]) == ["json", "binary", "grpc"]
        for r in point["servers"].values():
            assert r["errors"] == 0 and r["requests"] > 0 and r["p50_ms"] <= r["p99_ms"]
    metrics = s.raw.get("/metrics").text
    assert 'route="grpc:ModelInfer",status="200"' in metrics and 'route="/v2/models/{name}/infer",status="200"' in metrics
    with pytest.raises(InputError, match="needs --grpc-port"):
        run_loadtest([f"http://{s.url}"], protocol=["grpc"], data=data, out=None)


def test_protocol_cost_reads_the_server_cpu_per_protocol(serve, tmp_path):
    from nezha.bench.protocol_cost import measure, report
    from serve_fixtures import _tiny_data

    s = serve()
    data = _tiny_data(tmp_path / "data", tiny_histories(tiny_catalog(), n=40))
    acc = measure(f"http://{s.url}", os.getpid(), s.grpc_port, ["json", "grpc"], 2, 3, 0.4, 1, data=data, k=5, beam=8)
    for a in acc.values():                                # the server runs in this process: its CPU is ours too
        assert a["requests"] > 0 and sum(a["cpu"].values()) > 0 and a["batch"][1] > 0
    assert [line.split("|")[1].strip() for line in report(acc, 2, 3).splitlines()[3:]] == ["json", "grpc"]
