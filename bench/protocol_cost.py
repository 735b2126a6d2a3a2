"""Where a request's server CPU goes, per protocol: ``python -m nezha.bench.protocol_cost URL --pid PID --grpc-port G``.

Against a running ``nezha serve`` (``--pid``: its process id), the protocols run in alternating short slices,
as ``nezha loadtest`` runs them, and each slice's CPU time is read from /proc (Linux): the server's, split by
thread (the event loop; gRPC's own C threads, its EventEngine and timer threads; the other threads: the
decode threads and grpc.aio's completion-queue poller), and this client's own. CPU time per request drifts
far less with other jobs on the machine than requests/s do, so that it shows a per-call cost that a shared
machine's throughput hides (docs/protocols.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

GRPC_THREADS = ("event_engine", "grpc_global_tim", "nexting_thread", "default-executo", "nezha-grpc")  # gRPC, libnezha_grpc


def thread_cpu(pid: int) -> Counter:
    """CPU seconds so far of each kind of thread of process ``pid``: loop (the main thread), grpc, other."""
    tick = os.sysconf("SC_CLK_TCK")
    out = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:                                    # the thread ended meanwhile
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        kind = "loop" if task.name == str(pid) else "grpc" if name.startswith(GRPC_THREADS) else "other"
        out[kind] += (int(fields[11]) + int(fields[12])) / tick          # utime + stime
    return out


def mean_batch(url: str) -> tuple[float, float]:
    """(sum, count) of the server's nezha_batch_size histogram; (0, 0) from a server without it (null_server)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    found = [re.search(rf"nezha_batch_size_{k} (\S+)", text) for k in ("sum", "count")]
    return tuple(float(m.group(1)) if m else 0.0 for m in found)


def measure(url: str, pid: int, grpc_port: int | None, protocols: list[str], concurrency: int, per_request: int,
            slice_s: float, rounds: int, data: Path | None = None, k: int = 10, beam: int = 20) -> dict:
    """protocol -> {requests, seconds, cpu: Counter of server CPU s by thread kind, client_cpu s, batch sum/count}
    (``data``: a LETTER dataset folder, default Beauty's test histories, as nezha loadtest sends)."""
    from nezha.serve.loadtest import closed_loop, request_bodies

    bodies = {p: request_bodies(data, 2000, k, beam, per_request, p) for p in protocols}
    acc = {p: {"requests": 0, "seconds": 0.0, "cpu": Counter(), "client_cpu": 0.0, "batch": [0.0, 0.0]} for p in protocols}

    async def run():
        for p in protocols:                                # untimed: connections, caches
            await closed_loop(url, bodies[p], concurrency, 0.5, protocol=p, grpc_port=grpc_port)
        for r in range(rounds):
            for p in protocols:
                a, b0, c0, m0 = acc[p], mean_batch(url), thread_cpu(pid), time.process_time()
                got = await closed_loop(url, bodies[p], concurrency, slice_s, offset=r * 104729, protocol=p,
                                        grpc_port=grpc_port)
                a["client_cpu"] += time.process_time() - m0
                a["cpu"].update(thread_cpu(pid) - c0)
                a["batch"] = [x + y - z for x, y, z in zip(a["batch"], mean_batch(url), b0)]
                a["requests"] += got["statuses"].get("200", 0)
                a["seconds"] += got["seconds"]
    try:
        import uvloop                                      # the loop nezha loadtest's clients run on
        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    return acc


def report(acc: dict, concurrency: int, per_request: int) -> str:
    lines = [f"concurrency {concurrency}, {per_request} histories/request; CPU per request in microseconds",
             "| protocol | req/s | server total | loop thread | gRPC C threads | decode + other threads | client | histories/batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p, a in acc.items():
        n = max(a["requests"], 1)
        cells = [f"{a['requests'] / a['seconds']:.1f}"] + [
            f"{1e6 * s / n:.0f}" for s in (sum(a["cpu"].values()), a["cpu"]["loop"], a["cpu"]["grpc"], a["cpu"]["other"],
                                          a["client_cpu"])]
        cells.append(f"{a['batch'][0] / a['batch'][1]:.1f}" if a["batch"][1] else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--pid", type=int, required=True, help="the server's process id (its CPU is read from /proc)")
    ap.add_argument("--grpc-port", type=int, help="the server's --grpc-port (for grpc)")
    ap.add_argument("--protocol", nargs="+", default=["json", "binary", "grpc"], choices=["recommend", "json", "binary", "grpc"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--histories-per-request", type=int, default=1)
    ap.add_argument("--slice", type=float, default=1.0, help="seconds per protocol and round")
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args(argv)
    if not Path(f"/proc/{a.pid}/task").is_dir():
        print(f"protocol_cost: no process {a.pid} to read (Linux /proc)", file=sys.stderr)
        return 2
    for c in a.concurrency:
        acc = measure(a.url.rstrip("/"), a.pid, a.grpc_port, a.protocol, c, a.histories_per_request, a.slice, a.rounds)
        print(report(acc, c, a.histories_per_request) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
