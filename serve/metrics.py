"""Prometheus metrics of one server (its own registry, so that several servers can live in one process).
The batch series are recorded by the one decode path (``batching.decode_items``), the queue depth by the
Batcher. Every label takes values from a fixed set (route templates, statuses, error kinds, reasons), never from
request text: clients cannot add series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.latency = Histogram("nezha_request_seconds", "Request latency by route, seconds",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("nezha_requests", "Requests by route and HTTP status", ["route", "status"], registry=r)
        self.errors = Counter("nezha_errors", "Refused or failed requests by kind", ["kind"], registry=r)
        self.batch_size = Histogram("nezha_batch_size", "Histories per backbone batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("nezha_batch_seconds", "Decode time per batch, seconds",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("nezha_history_tokens", "Real backbone tokens decoded", registry=r)
        self.queue_depth = Gauge("nezha_queue_depth", "Histories waiting for a worker", registry=r)
        self.reloads = Counter("nezha_reloads", "Artifact reloads by result", ["result"], registry=r)
        self.ready = Gauge("nezha_ready", "1 when the server takes requests", registry=r)
        self.connections = Gauge("nezha_open_connections", "HTTP connections open (uvicorn engine)", registry=r)
        self.connections_closed = Counter("nezha_connections_closed", "Connections the server's bounds closed, by "
                                          "reason (evicted, busy, header_timeout, header_too_large)", ["reason"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
