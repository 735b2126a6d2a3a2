"""The server's options, declared once (runtime/options.py): each field is a keyword of the library and a
flag of ``nezha serve`` (its name with dashes unless declared), with its default, its --help text and its
check. A dataclass checks its fields when it is made, so that the CLI, the library, Ray's config builder and
each replica refuse the same value with the same one-line InputError; ``check_engine`` holds the rules
between groups (``--processes`` with the engine and ``--workers``).

ServeOptions: batching, bounds and the admin API (``Service``); LoadOptions: how the artifact is opened
(``load_model``); ConnectionLimits: the uvicorn engine's connections; RunOptions: the CLI's own (address,
engine, Ray's scale, shutdown, logging)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nezha.runtime.cli import ascii_int
from nezha.runtime.errors import InputError
from nezha.runtime.options import checked, flag_of, option, rule

TARGET_ONGOING = 4.0      # ongoing requests per replica: a replica batches them, one or two batches at little cost


def at_least(low: int, none: bool = False):
    """An integer >= ``low`` (``none``: or None)."""
    return rule(lambda v: (none and v is None) or (type(v) is int and v >= low),
                lambda v, f: f"{flag_of(f)} must be >= {low}, got {v}")


def within(low: float, high: float, open_low: bool = False):
    """A number in [low, high] (``open_low``: (low, high]); nan is refused."""
    return rule(lambda v: type(v) in (int, float) and low <= v <= high and not (open_low and v == low),
                lambda v, f: f"{flag_of(f)} must lie in {'(' if open_low else '['}{low:g}, {high:g}], got {v}")


_port = rule(lambda v: type(v) is int and 1 <= v <= 65535, lambda v, f: f"{flag_of(f)} must lie in 1..65535, got {v}")
_model_name = rule(lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v) is not None,
                   lambda v, f: f"{flag_of(f)} must be 1 to 64 letters, digits, _ . or - (a URL path segment), "
                                f"starting with a letter or digit, got {v!r}")
CORES = os.cpu_count() or 1
_processes = rule(lambda v: type(v) is int and 0 <= v <= CORES,
                  lambda v, f: f"{flag_of(f)} must be an integer in 0..{CORES} (0: decode in the server's process; at "
                               f"most one per core: more only contend for the cores), got {v!r}")


@dataclass
class ServeOptions:
    """Batching, bounds and the admin API of a ``Service``."""

    name: str = option("nezha", "model name in the /v2/models/{name} routes (letters, digits, _ . -; at most 64)",
                       _model_name)
    workers: int | None = option(
        None, "decode threads (default: one per core if at least 75%% of a decode runs in the backend, outside "
        "Python's GIL, as measured at load; else one); with --engine ray: per replica", at_least(1), type=ascii_int)
    max_batch: int | None = option(
        None, "histories per backbone batch (default: the artifact's max_batch; 1 switches batching off)",
        at_least(1), type=ascii_int)
    max_wait_ms: float = option(
        0.0, "how long a partial batch may wait for more arrivals, only while they are frequent (default 0: "
        "batches form from what queues while the workers are busy)", within(0, 60_000), type=float)
    max_queue: int = option(256, "histories waiting at most; beyond it 429 at once", at_least(1), type=ascii_int)
    timeout_ms: float = option(2000.0, "per-request deadline; beyond it 504", within(0, 600_000, True), type=float)
    max_body_bytes: int = option(1 << 20, "larger bodies get 413", at_least(1024), type=ascii_int)
    max_delay_ms: float = option(
        10.0, "batches grow around the largest group of histories of one beam waiting, except that a history "
        "waiting this long is served first (bounded unfairness)", within(0, 60_000), type=float)
    body_timeout_s: float = option(30.0, "seconds for a request's body to arrive; else 408", within(0, 3600, True),
                                   flag="--body-timeout", type=float)
    admin_token_sha256: str | None = None    # serve.admin.token_digest of the admin token; None: /admin/* is 404
    artifact_root: str | None = option(
        None, "the folder whose artifacts an admin reload may name (by a path under it); without it a reload "
        "only loads the served artifact again", type=Path)

    def __post_init__(self):
        checked(self)


@dataclass
class LoadOptions:
    """How to open an artifact (Recommender.load's arguments) and where to decode."""

    backend: str = option(
        "onnxruntime", "onnxruntime: the Python decode loop (default); cpp: the C++ runtime's loop over the same "
        "graphs (runtime/cpp, built with `make cpp`); tensorrt: engines on a GPU",
        choices=["onnxruntime", "cpp", "tensorrt"])
    device: str | None = option(None, "cpu, cuda or cuda:N")
    precision: str | None = option(None, "fp32, fp16, int8, int8-cpu (default: the artifact's first)")
    threads: int | None = option(1, "ONNX Runtime intra-op threads per decode thread", at_least(1, none=True),
                                 type=ascii_int)
    processes: int = option(
        0, "decode in this many separate processes, each with its own Python GIL, instead of in threads of the "
        "server's process (default 0: threads). Pays where the Python loop holds the GIL (small models) under "
        "load; costs ~0.2 ms per batch (see README 'Serving')", _processes, type=ascii_int)

    def __post_init__(self):
        checked(self)


@dataclass
class ConnectionLimits:
    """The uvicorn engine's connection bounds (serve.connections)."""

    max_connections: int = option(
        1000, "open connections at most (lowered to fit the descriptor limit); at the limit, the oldest connection "
        "without a complete request is closed for a new one", at_least(1), type=ascii_int)
    header_timeout_s: float = option(10.0, "seconds for a request's headers to arrive; else 408",
                                     within(0, 3600, True), flag="--header-timeout", type=float)
    keep_alive_timeout_s: float = option(5.0, "seconds an idle kept-alive connection stays open",
                                         within(0, 3600, True), flag="--keep-alive-timeout", type=float)
    max_header_bytes: int = 64 << 10    # request line and headers; more: 431

    def __post_init__(self):
        checked(self)


@dataclass
class RunOptions:
    """How ``nezha serve`` runs the service: address, engine, Ray Serve's scale, shutdown, logging."""

    host: str = option("127.0.0.1", "bind address (default 127.0.0.1; put TLS and auth in a gateway)")
    port: int = option(8000, "1..65535", _port, type=ascii_int)
    grpc_port: int | None = option(
        None, "also serve KServe v2 over gRPC (inference.GRPCInferenceService) on this port, same host",
        type=ascii_int)
    grpc_transport: str = option(
        "auto", "who speaks gRPC: native (gRPC's C++ library, libnezha_grpc: about a third of grpc.aio's CPU per "
        "call), grpcio (grpc.aio), or auto: native when it is built (make cpp), else grpcio", choices=["auto", "native", "grpcio"])
    engine: str = option("uvicorn", choices=["uvicorn", "ray"])
    replicas: int | None = option(None, "Ray Serve replicas, a fixed count (--engine ray; default 1)", at_least(1),
                                  type=ascii_int)
    min_replicas: int | None = option(None, "with --max-replicas: Ray Serve autoscales between the two (default 1)",
                                      at_least(1), type=ascii_int)
    max_replicas: int | None = option(None, "autoscaling's upper bound (--engine ray)", at_least(1), type=ascii_int)
    target_ongoing_requests: float | None = option(
        None, f"autoscaling: ongoing requests per replica Ray Serve aims at (default {TARGET_ONGOING})", type=float)
    ray_address: str | None = option(
        help="join this Ray cluster (default $RAY_ADDRESS; none: start a local Ray); run on one of its nodes: the "
        "artifact folder is read there and sent to the nodes that lack it",
        factory=lambda: os.environ.get("RAY_ADDRESS"))
    drain_timeout: float = option(30.0, "seconds to let in-flight requests finish on shutdown", within(0, 3600),
                                  type=float)
    admin_token_file: Path | None = option(
        None, "turns the admin API (POST /admin/reload) on: requests must carry 'Authorization: Bearer' with the "
        "token on this file's first line (or set $NEZHA_ADMIN_TOKEN); without either, /admin/* answers 404. "
        "SIGHUP reloads the served artifact regardless", type=Path)
    log_level: str = option("info", choices=["debug", "info", "warning", "error"])

    def __post_init__(self):
        checked(self)
        if self.grpc_port is not None and (not 0 < self.grpc_port < 65536 or self.grpc_port == self.port):
            raise InputError(f"--grpc-port must be a port in 1..65535 other than --port, got {self.grpc_port}")
        if self.grpc_transport != "auto" and (self.grpc_port is None or self.engine == "ray"):
            raise InputError("--grpc-transport is for --grpc-port on the uvicorn engine (Ray Serve's own gRPC proxy "
                             "speaks gRPC under --engine ray)")
        self.autoscaling()

    def autoscaling(self) -> dict | None:
        """--min/--max-replicas and --target-ongoing-requests -> Ray Serve's autoscaling_config (None: the fixed
        --replicas). InputError for a mix or a range that is empty."""
        if self.max_replicas is None:
            if self.min_replicas is not None or self.target_ongoing_requests is not None:
                raise InputError("--min-replicas and --target-ongoing-requests need --max-replicas (autoscaling)")
            return None
        if self.engine != "ray" or self.replicas is not None:
            raise InputError("autoscaling (--max-replicas) is for --engine ray, without --replicas (a fixed count)")
        low = self.min_replicas or 1
        target = TARGET_ONGOING if self.target_ongoing_requests is None else self.target_ongoing_requests
        if not low <= self.max_replicas:
            raise InputError(f"--min-replicas {low} is above --max-replicas {self.max_replicas}")
        if not 0 < target <= 10_000:                                     # also refuses nan
            raise InputError(f"--target-ongoing-requests must lie in (0, 10000], got {target}")
        return {"min_replicas": low, "max_replicas": self.max_replicas, "target_ongoing_requests": target}


def check_engine(engine: str, serve: ServeOptions, load: LoadOptions) -> None:
    """The rules between groups: decode processes only on the uvicorn engine, and one worker thread each."""
    if load.processes and engine == "ray":
        raise InputError("--processes is for the uvicorn engine; under Ray Serve each replica is a process already: "
                         "scale with --replicas")
    if load.processes and serve.workers is not None and serve.workers != load.processes:
        raise InputError(f"--workers {serve.workers} with --processes {load.processes}: each decode process has one "
                         "worker thread; give --processes alone")
