"""``nezha serve ARTIFACT`` and ``nezha loadtest URL``: thin layers over nezha.serve (option names are the
library's argument names; ``serve``'s options, their defaults and checks are declared in serve/options.py).

    nezha serve artifacts/demo --port 8000                        # dynamic batching, one worker per core
    nezha serve artifacts/demo --max-batch 1 --workers 1          # batching off: the unbatched baseline
    nezha serve artifacts/demo --processes 1                      # decode in a process of its own (own GIL)
    nezha serve artifacts/demo --engine ray --replicas 2          # the same routes on Ray Serve
    nezha serve artifacts/demo --engine ray --ray-address HEAD:6379 --max-replicas 8   # a cluster, autoscaled
    nezha loadtest http://127.0.0.1:8000 --concurrency 1 4 16 64 --duration 30 --out runs/loadtest
    nezha serve artifacts/demo --grpc-port 8001                   # also KServe v2 over gRPC
    nezha loadtest http://127.0.0.1:8000 --grpc-port 8001 --protocol json binary grpc
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import socket
import sys
from dataclasses import replace
from pathlib import Path

from nezha.runtime.cli import ascii_int
from nezha.runtime.errors import InputError
from nezha.runtime.options import add_arguments, from_args

from .options import ConnectionLimits, LoadOptions, RunOptions, ServeOptions, check_engine

if any(importlib.util.find_spec(m) is None for m in ("uvicorn", "starlette", "prometheus_client")):
    raise ImportError("nezha serve needs the 'serve' extra: pip install 'nezha-deploy[serve]'")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve an artifact over HTTP (dynamic batching; Ray Serve with --engine ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact folder written by python export/build.py")
    for title, options in (("server", RunOptions), ("batching and bounds", ServeOptions), ("model", LoadOptions),
                           ("connections (uvicorn engine)", ConnectionLimits)):
        add_arguments(p.add_argument_group(title), options)
    p.set_defaults(run=run_serve)

    q = sub.add_parser("loadtest", help="closed-loop load test of a running server on real Beauty histories",
                       description="Closed loop: C clients each send a request, wait for the answer, send the next, "
                                   "for --duration seconds per concurrency; several URLs are measured side by side.")
    q.add_argument("urls", nargs="+", metavar="URL", help="server base URL(s), e.g. http://127.0.0.1:8000")
    q.add_argument("--labels", nargs="+", help="one label per URL (default: the URLs)")
    q.add_argument("--concurrency", type=ascii_int, nargs="+", default=[1, 4, 16, 64])
    q.add_argument("--duration", type=float, default=30.0, help="seconds per URL and concurrency")
    q.add_argument("--rounds", type=ascii_int, default=1,
                   help="split each duration into this many slices alternating the URLs (machine drift cancels)")
    q.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each measurement")
    q.add_argument("--k", type=ascii_int, default=10)
    q.add_argument("--beam", type=ascii_int, default=20)
    q.add_argument("--histories-per-request", type=ascii_int, default=1)
    q.add_argument("--protocol", nargs="+", default=["recommend"], choices=["recommend", "json", "binary", "grpc"],
                   help="recommend: POST /v1/recommend (default); json, binary: KServe v2 infer with JSON or binary "
                        "tensors; grpc: KServe v2 ModelInfer. Several are measured side by side on each URL")
    q.add_argument("--grpc-port", type=ascii_int, help="the server's --grpc-port (for --protocol grpc)")
    q.add_argument("--model", default="nezha", help="model name for the v2 protocols (the server's --name)")
    q.add_argument("--data", type=Path, help="LETTER dataset folder (default: Beauty, test split)")
    q.add_argument("--history-limit", type=ascii_int, default=5000, help="test histories drawn from the data")
    q.add_argument("--title", default="", help="label of the run in the reports")
    q.add_argument("--out", type=Path, default=Path("runs/loadtest"), help="writes loadtest.json, .md and .png")
    q.set_defaults(run=run_loadtest)


def _fail(command: str, e: BaseException) -> int:
    """One line and the error class's exit code (2 for an OSError or a missing extra)."""
    print(f"nezha {command}: error: {e}", file=sys.stderr)
    return getattr(e, "exit_code", 2)


def run_serve(a) -> int:
    from nezha.runtime.errors import NezhaError

    from . import admin

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run, load = from_args(RunOptions, a), from_args(LoadOptions, a)
        options, limits = from_args(ServeOptions, a), from_args(ConnectionLimits, a)
        check_engine(run.engine, options, load)
    except InputError as e:
        return _fail("serve", e)
    if not (a.artifact / "manifest.json").is_file():
        return _fail("serve", ValueError(f"{a.artifact} is not an artifact folder (no manifest.json)"))
    try:
        token, root = admin.read_token(run.admin_token_file), options.artifact_root
        options = replace(options, admin_token_sha256=admin.token_digest(token) if token else None,
                          artifact_root=str(admin.artifact_root(root)) if root is not None else None)
    except (OSError, ValueError) as e:
        return _fail("serve", e)
    try:
        if run.engine == "ray":
            from .ray_deploy import serve_blocking
            serve_blocking(a.artifact, options, load, replicas=run.replicas or 1, host=run.host, port=run.port,
                           address=run.ray_address, autoscaling=run.autoscaling(), grpc_port=run.grpc_port)
            return 0
        from .app import run as run_app
        from .model import load_model
        from .service import Service
        if run.grpc_port is not None and run.grpc_transport != "grpcio":
            from .grpc_native import built, library       # missing or broken: one line here, not a failed startup
            built() if run.grpc_transport == "native" else library()
        for flag, port in (("--port", run.port), ("--grpc-port", run.grpc_port)):
            if port is not None:
                check_port(run.host, port, flag)           # taken: one line here, not a failed app startup
        model = load_model(a.artifact, load)            # before uvicorn starts: a bad artifact is one line, exit 2
        run_app(Service(a.artifact, options, load, model=model), host=run.host, port=run.port, limits=limits,
                drain_timeout=run.drain_timeout, log_level=run.log_level, grpc_port=run.grpc_port,
                grpc_transport=run.grpc_transport)
    except (NezhaError, ImportError, OSError) as e:
        return _fail("serve", e)
    return 0


def run_loadtest(a) -> int:
    from .loadtest import run_loadtest as run

    kwargs = {k: v for k, v in vars(a).items() if k not in ("run", "command")}
    try:
        result = run(**kwargs, progress=True)
    except (InputError, OSError) as e:
        return _fail("loadtest", e)
    from .loadtest import markdown
    print(markdown(result))
    print(f"wrote {a.out}/loadtest.json, loadtest.md, loadtest.png")
    return 0


def check_port(host: str, port: int, flag: str) -> None:
    """Raise OSError (one line for the CLI) when ``host:port`` cannot be bound, before the server starts."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"{flag} {port}: cannot listen on {host}: {e.strerror}") from None
