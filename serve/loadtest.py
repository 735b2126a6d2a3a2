"""``nezha loadtest``: a closed-loop load generator on real Beauty test histories.

C clients each hold one keep-alive connection, send a request (``/v1/recommend``, or KServe v2 JSON,
binary or gRPC with ``protocols``: serve.loadclients), wait for the answer and send the next, for ``duration`` seconds; per concurrency it reports throughput and p50/p90/p99 latency.
Several URLs are measured side by side (alternating in ``rounds`` slices so that machine drift cancels),
and the first URL's throughput is compared with each other's. The client is a few lines of asyncio
HTTP/1.1 over raw streams with the bodies prepared in advance, so that it takes little of the CPU the
servers need. Writes loadtest.json, loadtest.md and loadtest.png (throughput vs p99)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from nezha.runtime.errors import InputError

from .loadclients import address, check_grpc, check_protocols, encode, grpc_client, grpc_closed_loop


def request_bodies(data: Path | None, history_limit: int, k: int, beam: int, per_request: int,
                   protocol: str = "recommend", model: str = "nezha") -> list[tuple[bytes, bytes]]:
    """Real test histories (leave-one-out, all but each user's last item) as (header lines, body) requests
    of ``protocol`` (serve.loadclients)."""
    from nezha.runtime.data import DEFAULT_DATA, find_pair, leave_one_out, read_interactions

    split = leave_one_out(read_interactions(find_pair(data or DEFAULT_DATA)[1]), "test")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(split.histories))[:history_limit]
    histories = [split.histories[i] for i in order]
    return [encode(protocol, histories[i:i + per_request], k, beam, model)
            for i in range(0, len(histories) - per_request + 1, per_request)]


class Connection:
    """One HTTP/1.1 keep-alive connection: POST a body, read status and body (Content-Length only)."""

    def __init__(self, host: str, port: int, path: str):
        self.host, self.port, self.path = host, port, path
        self.reader = self.writer = None

    async def post(self, body: bytes, headers: bytes = b"") -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
                          % (self.path.encode(), self.host.encode(), len(body), headers) + body)
        status_line = await self.reader.readline()
        if not status_line:
            await self.close()
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        await self.reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def closed_loop(url: str, bodies: list[tuple[bytes, bytes]], concurrency: int, duration: float, offset: int = 0,
                      protocol: str = "recommend", model: str = "nezha", grpc_port: int | None = None) -> dict:
    """Run ``concurrency`` clients for ``duration`` s. Returns latencies (s) of 200 answers, counts by status."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path.rstrip("/") or "") + ("/v1/recommend" if protocol == "recommend" else f"/v2/models/{model}/infer")
    if protocol == "grpc":                                # its own clients, off the event loop (serve.loadclients)
        return await asyncio.to_thread(grpc_closed_loop, host, grpc_port, bodies, concurrency, duration, offset)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def client(c: int):
        conn = Connection(host, port, path)
        i = offset + c * 7919
        try:
            while time.perf_counter() < stop:
                headers, body = bodies[i % len(bodies)]
                i += 1
                t0 = time.perf_counter()
                try:
                    status = await conn.post(body, headers)
                except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    status = "connection error"
                    await conn.close()
                    await asyncio.sleep(0.01)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses, "seconds": time.perf_counter() - t0}


def summarize(latencies: list[float], seconds: float, statuses: dict, histories_per_request: int) -> dict:
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    ok = statuses.get("200", 0)              # the latencies may be a sample (serve.grpc_native.load)
    return {"requests": ok, "seconds": seconds, "throughput_rps": ok / seconds,
            "throughput_histories": ok * histories_per_request / seconds,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p90_ms": float(np.percentile(lat, 90) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "mean_ms": float(np.mean(lat) * 1e3),
            "statuses": statuses, "errors": sum(n for s, n in statuses.items() if s != "200")}


async def _check_ready(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InputError(f"URL {url!r}: expected http://HOST:PORT")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 80), 5)
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status = (await asyncio.wait_for(reader.readline(), 5)).split()
        writer.close()
    except (OSError, asyncio.TimeoutError) as e:
        raise InputError(f"server {url} is not reachable: {e}") from None
    if len(status) < 2 or status[1] != b"200":
        raise InputError(f"server {url} is not ready: /v2/health/ready answered {b' '.join(status[1:]).decode()}")


def run_loadtest(urls: list[str], concurrency=(1, 4, 16, 64), duration: float = 30.0, rounds: int = 1,
                 warmup: float = 1.0, k: int = 10, beam: int = 20, histories_per_request: int = 1,
                 data: Path | None = None, history_limit: int = 5000, labels: list[str] | None = None,
                 title: str = "", out: Path | None = Path("runs/loadtest"), progress: bool = False,
                 protocol: list[str] | tuple[str, ...] = ("recommend",), grpc_port: int | None = None,
                 model: str = "nezha") -> dict:
    """Measure every URL with every protocol at every concurrency; returns the result dict (and writes the
    reports to ``out``). gRPC goes to each URL's host at ``grpc_port``; ``model`` names the v2 model."""
    labels = labels or list(urls)
    if len(labels) != len(urls):
        raise InputError(f"{len(labels)} labels for {len(urls)} URLs")
    if rounds < 1 or duration <= 0 or any(c < 1 for c in concurrency):
        raise InputError("rounds and concurrency must be >= 1 and duration > 0")
    check_protocols(protocol, grpc_port, InputError)
    # one target per URL and protocol, labelled by the protocol when there is one URL
    targets = [(label if len(protocol) == 1 else p if len(urls) == 1 else f"{label} {p}", url, p)
               for url, label in zip(urls, labels) for p in protocol]
    bodies = {p: request_bodies(data, history_limit, k, beam, histories_per_request, p, model) for p in protocol}
    if not bodies[protocol[0]]:
        raise InputError("no test histories in the data")

    def loop(url, p, c, seconds, offset=0):
        return closed_loop(url, bodies[p], c, seconds, offset, protocol=p, model=model, grpc_port=grpc_port)

    async def main():
        for url in urls:
            await _check_ready(url)
            if grpc_port is not None and "grpc" in protocol:
                await check_grpc(urlsplit(url).hostname, grpc_port, InputError)
        points = []
        for c in concurrency:
            acc = {label: {"latencies": [], "statuses": {}, "seconds": 0.0} for label, _, _ in targets}
            for _, url, p in targets:                     # untimed: connections, buffers, caches
                await loop(url, p, c, warmup)
            for r in range(rounds):
                for label, url, p in targets:
                    got = await loop(url, p, c, duration / rounds, offset=r * 104729)
                    a = acc[label]
                    a["latencies"] += got["latencies"]
                    a["seconds"] += got["seconds"]
                    for s, n in got["statuses"].items():
                        a["statuses"][s] = a["statuses"].get(s, 0) + n
            point = {"concurrency": c, "servers": {label: summarize(a["latencies"], a["seconds"], a["statuses"],
                                                                    histories_per_request)
                                                   for label, a in acc.items()}}
            points.append(point)
            if progress:
                print(f"concurrency {c}: " + "; ".join(
                    f"{label} {s['throughput_rps']:.1f} req/s p99 {s['p99_ms']:.1f} ms"
                    for label, s in point["servers"].items()), flush=True)
        return points

    try:
        import uvloop                                    # a lighter client leaves more CPU to the servers
        points = uvloop.run(main())
    except ImportError:
        points = asyncio.run(main())
    result = {"title": title, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                          "python": platform.python_version()},
              "setup": {"urls": {label: address(url, p, grpc_port) for label, url, p in targets}, "duration_s": duration,
                        "rounds": rounds, "k": k, "beam": beam, "histories_per_request": histories_per_request,
                        "protocols": list(protocol), "bodies": len(bodies[protocol[0]]),
                        **({"grpc_client": grpc_client()} if "grpc" in protocol else {})},
              "points": points, "ratios": ratios(points, [t[0] for t in targets]),
              "knee": {t[0]: knee(points, t[0]) for t in targets}}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "loadtest.json").write_text(json.dumps(result, indent=2))
        (out / "loadtest.md").write_text(markdown(result))
        try:
            plot(result, out / "loadtest.png")
        except ImportError:
            pass                                         # matplotlib (the 'bench' extra) missing: no PNG
    return result


def ratios(points: list[dict], labels: list[str]) -> list[dict]:
    """Per concurrency, the first label's throughput and p99 over each other label's."""
    out = []
    for p in points:
        first = p["servers"][labels[0]]
        for other in labels[1:]:
            o = p["servers"][other]
            out.append({"concurrency": p["concurrency"], "of": labels[0], "over": other,
                        "throughput": first["throughput_rps"] / o["throughput_rps"] if o["throughput_rps"] else None,
                        "p99": first["p99_ms"] / o["p99_ms"] if o["p99_ms"] else None})
    return out


def knee(points: list[dict], label: str) -> int | None:
    """The lowest concurrency that reaches 90% of the best throughput: past it, more clients mostly queue."""
    best = max(p["servers"][label]["throughput_rps"] for p in points)
    for p in points:
        if p["servers"][label]["throughput_rps"] >= 0.9 * best:
            return p["concurrency"]
    return None


def markdown(result: dict) -> str:
    s = result["setup"]
    labels = list(s["urls"])
    lines = [f"# nezha loadtest {result['title']}".rstrip(), "",
             f"- closed loop, {s['duration_s']:g} s per server and concurrency ({s['rounds']} alternating slice(s)), "
             f"k {s['k']}, beam {s['beam']}, {s['histories_per_request']} Beauty test history per request, "
             f"{result['machine']['cpu_count']} cores",
             "- servers: " + ", ".join(f"{l} = {u}" for l, u in s["urls"].items())
             + (f"; gRPC client: {s['grpc_client']}" if "grpc_client" in s else ""), "",
             "| concurrency | server | req/s | p50 ms | p90 ms | p99 ms | errors |", "|---:|---|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        for label in labels:
            r = p["servers"][label]
            lines.append(f"| {p['concurrency']} | {label} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                         f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    if result["ratios"]:
        lines += ["", "| concurrency | ratio | throughput | p99 |", "|---:|---|---:|---:|"]
        for r in result["ratios"]:
            fmt = lambda v: "-" if v is None else f"{v:.2f}"
            lines.append(f"| {r['concurrency']} | {r['of']} / {r['over']} | {fmt(r['throughput'])}x | {fmt(r['p99'])}x |")
    lines += ["", "Knee (lowest concurrency with 90% of the best throughput): " +
              ", ".join(f"{l}: {k}" for l, k in result["knee"].items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, dpi: int = 90) -> Path:
    """Throughput vs p99 per server, one point per concurrency (annotated)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in result["setup"]["urls"]:
        pts = [(p["servers"][label]["throughput_rps"], p["servers"][label]["p99_ms"], p["concurrency"])
               for p in result["points"]]
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=label)
        for x, y, c in pts:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"nezha loadtest {result['title']}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
