"""Prometheus metrics of one `gradprobe serve` process (`--metrics-port`).

Each server gets its own registry: tests run several servers in one process, and a replica's
numbers must never mix with another's. Values that already live in the pool and the store
(queue depth, busy workers, store bytes) are read when scraped, so they cannot drift from the
truth; events (requests, restarts, evictions, uploaded bytes, stage latencies) are counted
where they happen.

What to autoscale on: `gradprobe_queue_depth` (probes waiting for a worker) says the replicas
are short of workers before latency shows it; CPU says little on a GPU replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from threading import Thread

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gradprobe.diagnostics.errors import ConfigError

log = logging.getLogger("gradprobe.server")

# A probe of a small model takes a fraction of a second; a large one on CPU, minutes.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0, 600.0)
STAGES = ("queue", "load", "probe", "rules", "total")


class ServerMetrics:
    """The metrics of one server. Cheap to make; serving them over HTTP is `serve_http`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("gradprobe_requests", "Calls by method and final status.",
                                ("method", "code"), registry=registry)
        self.job_seconds = Histogram("gradprobe_job_seconds",
                                     "Seconds one probe job spent in each stage.", ("stage",),
                                     buckets=STAGE_BUCKETS, registry=registry)
        self.worker_restarts = Counter("gradprobe_worker_restarts",
                                       "Worker processes started to replace one that died, "
                                       "was killed (timeout, cancel, memory) or exited.",
                                       registry=registry)
        self.store_evictions = Counter("gradprobe_store_evictions",
                                       "Models evicted from the store to stay within "
                                       "--store-max-gb.", registry=registry)
        self.uploaded_bytes = Counter("gradprobe_uploaded_bytes",
                                      "Model bytes received and stored.", registry=registry)
        self.queue_depth = Gauge("gradprobe_queue_depth", "Probes waiting for a free worker.",
                                 registry=registry)
        self.busy_workers = Gauge("gradprobe_busy_workers", "Workers running a probe now.",
                                  registry=registry)
        self.workers = Gauge("gradprobe_workers", "Worker processes alive.", registry=registry)
        self.store_bytes = Gauge("gradprobe_store_bytes",
                                 "Bytes in the model store, uploads in progress included.",
                                 registry=registry)
        for stage in STAGES:  # every series exists from the start: rate() needs a zero
            self.job_seconds.labels(stage)

    def observe_sources(self, *, queue_depth: Callable[[], float],
                        busy_workers: Callable[[], float], workers: Callable[[], float],
                        store_bytes: Callable[[], float]) -> None:
        """Read these values at scrape time from their owners."""
        self.queue_depth.set_function(queue_depth)
        self.busy_workers.set_function(busy_workers)
        self.workers.set_function(workers)
        self.store_bytes.set_function(store_bytes)

    def count_call(self, method: str, code: str) -> None:
        self.requests.labels(method.rsplit("/", 1)[-1], code).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.job_seconds.labels(stage).observe(max(seconds, 0.0))

    def serve_http(self, host: str, port: int) -> MetricsEndpoint:
        """Serve /metrics on `host:port` (0: any free port) in a background thread."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: "
                              f"{exc.strerror or exc}") from None
        return MetricsEndpoint(server, thread)


class MetricsEndpoint:
    def __init__(self, server: ThreadingHTTPServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
