"""``nezha serve ARTIFACT`` and ``nezha loadtest URL``: thin layers over nezha.serve (option names are the
library's argument names).

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
import os
import sys
from pathlib import Path

from nezha.runtime.cli import ascii_int

if any(importlib.util.find_spec(m) is None for m in ("uvicorn", "starlette", "prometheus_client")):
    raise ImportError("nezha serve needs the 'serve' extra: pip install 'nezha-deploy[serve]'")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve an artifact over HTTP (dynamic batching; Ray Serve with --engine ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact folder written by python export/build.py")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; put TLS and auth in a gateway)")
    p.add_argument("--port", type=ascii_int, default=8000, help="1..65535")
    p.add_argument("--grpc-port", type=ascii_int, default=None,
                   help="also serve KServe v2 over gRPC (inference.GRPCInferenceService) on this port, same host")
    p.add_argument("--name", default="nezha", help="model name in the /v2/models/{name} routes")
    p.add_argument("--engine", default="uvicorn", choices=["uvicorn", "ray"])
    p.add_argument("--replicas", type=ascii_int, default=None, help="Ray Serve replicas, a fixed count (--engine ray; default 1)")
    p.add_argument("--min-replicas", type=ascii_int, default=None,
                   help="with --max-replicas: Ray Serve autoscales between the two (default 1)")
    p.add_argument("--max-replicas", type=ascii_int, default=None, help="autoscaling's upper bound (--engine ray)")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help=f"autoscaling: ongoing requests per replica Ray Serve aims at (default {TARGET_ONGOING})")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster (default $RAY_ADDRESS; none: start a local Ray); run on one of its "
                        "nodes: the artifact folder is read there and sent to the nodes that lack it")
    p.add_argument("--workers", type=ascii_int, default=None,
                   help="decode threads (default: one per core if at least 75%% of a decode runs in the backend, "
                        "outside Python's GIL, as measured at load; else one); with --engine ray: per replica")
    p.add_argument("--processes", type=ascii_int, default=0,
                   help="decode in this many separate processes, each with its own Python GIL, instead of in "
                        "threads of the server's process (default 0: threads). Pays where the Python loop holds the "
                        "GIL (small models) under load; costs ~0.2 ms per batch (see README 'Serving')")
    p.add_argument("--threads", type=ascii_int, default=1, help="ONNX Runtime intra-op threads per decode thread")
    p.add_argument("--max-batch", type=ascii_int, default=None,
                   help="histories per backbone batch (default: the artifact's max_batch; 1 switches batching off)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a partial batch may wait for more arrivals, only while they are frequent "
                        "(default 0: batches form from what queues while the workers are busy)")
    p.add_argument("--max-delay-ms", type=float, default=10.0,
                   help="batches grow around the largest group of histories of one beam waiting, except "
                        "that a history waiting this long is served first (bounded unfairness)")
    p.add_argument("--max-queue", type=ascii_int, default=256, help="histories waiting at most; beyond it 429 at once")
    p.add_argument("--timeout-ms", type=float, default=2000.0, help="per-request deadline; beyond it 504")
    p.add_argument("--max-body-bytes", type=ascii_int, default=1 << 20, help="larger bodies get 413")
    p.add_argument("--admin-token-file", type=Path, default=None,
                   help="turns the admin API (POST /admin/reload) on: requests must carry 'Authorization: Bearer' "
                        "with the token on this file's first line (or set $NEZHA_ADMIN_TOKEN); without either, "
                        "/admin/* answers 404. SIGHUP reloads the served artifact regardless")
    p.add_argument("--artifact-root", type=Path, default=None,
                   help="the folder whose artifacts an admin reload may name (by a path under it); without it a "
                        "reload only loads the served artifact again")
    p.add_argument("--max-connections", type=ascii_int, default=1000,
                   help="open connections at most (lowered to fit the descriptor limit); at the limit, the oldest "
                        "connection without a complete request is closed for a new one")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive; else 408")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request's body to arrive; else 408")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle kept-alive connection stays open")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let in-flight requests finish on shutdown")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "cpp", "tensorrt"],
                   help="onnxruntime: the Python decode loop (default); cpp: the C++ runtime's loop over the same "
                        "graphs (runtime/cpp, built with `make cpp`); tensorrt: engines on a GPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default=None, help="fp32, fp16, int8, int8-cpu (default: the artifact's first)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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
    print(f"nezha {command}: error: {e}", file=sys.stderr)
    return 2


def run_serve(a) -> int:
    from nezha.runtime.errors import NezhaError

    from . import admin
    from .connections import ConnectionLimits
    from .model import LoadOptions
    from .service import ServeOptions

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value, low in (("--workers", a.workers, 1), ("--threads", a.threads, 1), ("--replicas", a.replicas, 1),
                             ("--min-replicas", a.min_replicas, 1), ("--max-replicas", a.max_replicas, 1),
                             ("--max-queue", a.max_queue, 1), ("--max-body-bytes", a.max_body_bytes, 1024),
                             ("--max-connections", a.max_connections, 1)):
        if value is not None and value < low:
            return _fail("serve", ValueError(f"{name} must be >= {low}, got {value}"))
    if a.processes < 0:
        return _fail("serve", ValueError(f"--processes must be >= 0, got {a.processes}"))
    if a.grpc_port is not None and (not 0 < a.grpc_port < 65536 or a.grpc_port == a.port):
        return _fail("serve", ValueError(f"--grpc-port must be a port in 1..65535 other than --port, got {a.grpc_port}"))
    if a.processes and a.engine == "ray":
        return _fail("serve", ValueError("--processes is for the uvicorn engine; under Ray Serve each replica is a "
                                         "process already: scale with --replicas"))
    if a.processes and a.workers is not None and a.workers != a.processes:
        return _fail("serve", ValueError(f"--workers {a.workers} with --processes {a.processes}: each decode process "
                                         f"has one worker thread; give --processes alone"))
    if a.max_batch is not None and a.max_batch < 1:
        return _fail("serve", ValueError(f"--max-batch must be >= 1, got {a.max_batch}"))
    for name, value, low, high in (("--timeout-ms", a.timeout_ms, 0.0, 600_000.0), ("--max-wait-ms", a.max_wait_ms, 0.0, 60_000.0),
                                   ("--max-delay-ms", a.max_delay_ms, 0.0, 60_000.0), ("--drain-timeout", a.drain_timeout, 0.0, 3600.0),
                                   ("--header-timeout", a.header_timeout, 0.0, 3600.0), ("--body-timeout", a.body_timeout, 0.0, 3600.0),
                                   ("--keep-alive-timeout", a.keep_alive_timeout, 0.0, 3600.0)):
        open_low = name in ("--timeout-ms", "--header-timeout", "--body-timeout", "--keep-alive-timeout")
        if not low <= value <= high or (open_low and value == 0):                     # also refuses nan
            return _fail("serve", ValueError(f"{name} must lie in {'(' if open_low else '['}{low:g}, {high:g}], got {value}"))
    if not 1 <= a.port <= 65535:
        return _fail("serve", ValueError(f"--port must lie in 1..65535, got {a.port}"))
    try:
        autoscaling = ray_autoscaling(a)
    except ValueError as e:
        return _fail("serve", e)
    if not (a.artifact / "manifest.json").is_file():
        return _fail("serve", ValueError(f"{a.artifact} is not an artifact folder (no manifest.json)"))
    try:
        token = admin.read_token(a.admin_token_file)
        root = str(admin.artifact_root(a.artifact_root)) if a.artifact_root is not None else None
    except (OSError, ValueError) as e:
        return _fail("serve", e)
    options = ServeOptions(name=a.name, workers=a.workers, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                           max_queue=a.max_queue, timeout_ms=a.timeout_ms, max_body_bytes=a.max_body_bytes,
                           max_delay_ms=a.max_delay_ms, body_timeout_s=a.body_timeout, artifact_root=root,
                           admin_token_sha256=admin.token_digest(token) if token else None)
    limits = ConnectionLimits(max_connections=a.max_connections, header_timeout_s=a.header_timeout,
                              keep_alive_timeout_s=a.keep_alive_timeout)
    load = LoadOptions(backend=a.backend, device=a.device, precision=a.precision, threads=a.threads, processes=a.processes)
    try:
        if a.engine == "ray":
            from .ray_deploy import serve_blocking
            serve_blocking(a.artifact, options, load, replicas=a.replicas or 1, host=a.host, port=a.port,
                           address=a.ray_address, autoscaling=autoscaling, grpc_port=a.grpc_port)
            return 0
        from .app import run
        from .model import load_model
        from .service import Service
        model = load_model(a.artifact, load)            # before uvicorn starts: a bad artifact is one line, exit 2
        if a.grpc_port is not None:
            from .grpc_server import check_port
            check_port(a.host, a.grpc_port)                # taken: one line here, not a failed app startup
        run(Service(a.artifact, options, load, model=model), host=a.host, port=a.port, limits=limits,
            drain_timeout=a.drain_timeout, log_level=a.log_level, grpc_port=a.grpc_port)
    except (NezhaError, ImportError, OSError) as e:
        return _fail("serve", e)
    return 0


TARGET_ONGOING = 4.0      # ongoing requests per replica: a replica batches them, one or two batches at little cost


def ray_autoscaling(a) -> dict | None:
    """--min/--max-replicas and --target-ongoing-requests -> Ray Serve's autoscaling_config (None: the fixed
    --replicas). ValueError for a mix or a range that is empty."""
    if a.max_replicas is None:
        if a.min_replicas is not None or a.target_ongoing_requests is not None:
            raise ValueError("--min-replicas and --target-ongoing-requests need --max-replicas (autoscaling)")
        return None
    if a.engine != "ray" or a.replicas is not None:
        raise ValueError("autoscaling (--max-replicas) is for --engine ray, without --replicas (a fixed count)")
    low = a.min_replicas or 1
    target = TARGET_ONGOING if a.target_ongoing_requests is None else a.target_ongoing_requests
    if not low <= a.max_replicas:
        raise ValueError(f"--min-replicas {low} is above --max-replicas {a.max_replicas}")
    if not 0 < target <= 10_000:                                     # also refuses nan
        raise ValueError(f"--target-ongoing-requests must lie in (0, 10000], got {target}")
    return {"min_replicas": low, "max_replicas": a.max_replicas, "target_ongoing_requests": target}


def run_loadtest(a) -> int:
    from .loadtest import LoadTestError
    from .loadtest import run_loadtest as run

    kwargs = {k: v for k, v in vars(a).items() if k not in ("run", "command")}
    try:
        result = run(**kwargs, progress=True)
    except (LoadTestError, OSError) as e:
        return _fail("loadtest", e)
    from .loadtest import markdown
    print(markdown(result))
    print(f"wrote {a.out}/loadtest.json, loadtest.md, loadtest.png")
    return 0
