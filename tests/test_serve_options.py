"""The server's options are declared once (serve/options.py): the `nezha serve` parser is made from the
dataclasses, so flags and defaults agree with the library's, and every check runs wherever the options are
made (CLI, library, Ray's config builder), with the same one-line message. No artifact needed: fast."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

pytest.importorskip("uvicorn")

from nezha.runtime.errors import InputError  # noqa: E402
from nezha.serve.options import (ConnectionLimits, LoadOptions, RunOptions, ServeOptions,  # noqa: E402
                                 check_engine)

CORES = os.cpu_count() or 1


def _serve_parser() -> argparse.ArgumentParser:
    from nezha.serve.cli import add_parsers
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub)
    return sub.choices["serve"]


def test_the_parser_is_the_dataclasses(monkeypatch):
    """Every option field is a flag whose default is the field's default, and parsing nothing gives the
    library's defaults; fields without a flag are the library's alone."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = _serve_parser().parse_args(["art"])
    for cls in (ServeOptions, LoadOptions, ConnectionLimits, RunOptions):
        made = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        assert cls(**made) == cls(), cls.__name__
    cli_only = {"admin_token_sha256", "max_header_bytes"}
    groups = (ServeOptions, LoadOptions, ConnectionLimits, RunOptions)
    fields = {f.name for cls in groups for f in dataclasses.fields(cls)}
    assert fields - set(vars(args)) == cli_only
    assert set(vars(args)) - fields == {"artifact", "run"}
    flags = {a.dest: a.option_strings[0] for a in _serve_parser()._actions if a.option_strings}
    assert (flags["body_timeout_s"], flags["header_timeout_s"]) == ("--body-timeout", "--header-timeout")


BAD = [
    (ServeOptions, dict(workers=0), "--workers must be >= 1, got 0"),
    (ServeOptions, dict(max_batch=0), "--max-batch must be >= 1, got 0"),
    (ServeOptions, dict(max_queue=0), "--max-queue must be >= 1, got 0"),
    (ServeOptions, dict(max_body_bytes=10), "--max-body-bytes must be >= 1024, got 10"),
    (ServeOptions, dict(timeout_ms=0), r"--timeout-ms must lie in \(0, 600000\], got 0"),
    (ServeOptions, dict(max_wait_ms=float("nan")), r"--max-wait-ms must lie in \[0, 60000\], got nan"),
    (ServeOptions, dict(max_delay_ms=-1.0), r"--max-delay-ms must lie in \[0, 60000\], got -1.0"),
    (ServeOptions, dict(body_timeout_s=0.0), r"--body-timeout must lie in \(0, 3600\], got 0.0"),
    (LoadOptions, dict(threads=0), "--threads must be >= 1, got 0"),
    (LoadOptions, dict(processes=-1), rf"--processes must be an integer in 0..{CORES} \(0: decode in the server's"),
    (LoadOptions, dict(processes=CORES + 1), rf"--processes must be an integer in 0..{CORES} .*got {CORES + 1}"),
    (LoadOptions, dict(processes=True), r"--processes must be an integer in 0\.\.\d+ .*got True"),
    (ConnectionLimits, dict(max_connections=0), "--max-connections must be >= 1, got 0"),
    (ConnectionLimits, dict(header_timeout_s=0.0), r"--header-timeout must lie in \(0, 3600\], got 0.0"),
    (ConnectionLimits, dict(keep_alive_timeout_s=float("inf")), r"--keep-alive-timeout must lie in \(0, 3600\]"),
    (RunOptions, dict(port=0), "--port must lie in 1..65535, got 0"),
    (RunOptions, dict(port=70000), "--port must lie in 1..65535, got 70000"),
    (RunOptions, dict(grpc_port=8000), "--grpc-port must be a port in 1..65535 other than --port, got 8000"),
    (RunOptions, dict(grpc_port=65536), "--grpc-port must be a port in 1..65535 other than --port, got 65536"),
    (RunOptions, dict(replicas=0), "--replicas must be >= 1, got 0"),
    (RunOptions, dict(max_replicas=0), "--max-replicas must be >= 1, got 0"),
    (RunOptions, dict(drain_timeout=4000.0), r"--drain-timeout must lie in \[0, 3600\], got 4000.0"),
    (RunOptions, dict(min_replicas=2), "need --max-replicas"),
    (RunOptions, dict(engine="ray", replicas=2, max_replicas=4), "without --replicas"),
    (RunOptions, dict(engine="ray", min_replicas=5, max_replicas=4), "--min-replicas 5 is above --max-replicas 4"),
    (RunOptions, dict(engine="ray", max_replicas=4, target_ongoing_requests=0.0), "--target-ongoing-requests must lie"),
]


@pytest.mark.parametrize("cls,values,message", BAD, ids=[f"{c.__name__}-{next(iter(v))}" for c, v, _ in BAD])
def test_each_bad_value_is_refused_where_the_options_are_made(cls, values, message):
    with pytest.raises(InputError, match=message):
        cls(**values)


def test_good_values_pass_and_autoscaling_is_derived():
    assert LoadOptions(threads=None, processes=CORES).processes == CORES
    assert ServeOptions(workers=None, max_batch=None, timeout_ms=600_000, max_wait_ms=0).timeout_ms == 600_000
    assert RunOptions().autoscaling() is None
    assert RunOptions(engine="ray", max_replicas=8).autoscaling() == {"min_replicas": 1, "max_replicas": 8,
                                                                      "target_ongoing_requests": 4.0}


def test_the_processes_rules_between_groups_are_one_function():
    check_engine("uvicorn", ServeOptions(workers=1), LoadOptions(processes=1))     # as many workers: allowed
    check_engine("ray", ServeOptions(workers=3), LoadOptions())
    with pytest.raises(InputError, match="scale with --replicas"):
        check_engine("ray", ServeOptions(), LoadOptions(processes=1))
    with pytest.raises(InputError, match="--workers 3 with --processes 1: .*give --processes alone"):
        check_engine("uvicorn", ServeOptions(workers=3), LoadOptions(processes=1))


def test_ray_deploy_refuses_decode_processes_with_the_same_message():
    pytest.importorskip("ray")
    from nezha.serve.ray_deploy import deploy
    with pytest.raises(InputError, match="--processes is for the uvicorn engine"):
        deploy("/nowhere", ServeOptions(), LoadOptions(processes=1))
