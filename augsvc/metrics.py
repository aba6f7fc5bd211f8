"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.images = Counter("augsvc_images_total", "Images augmented and sent", ["method"],
                              registry=self.registry)
        self.batches = Counter("augsvc_batches_total", "Batches sent", ["method"], registry=self.registry)
        self.latency = Histogram("augsvc_batch_seconds", "Time to produce one batch", ["method"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                          5, 10), registry=self.registry)
        self.inflight = Gauge("augsvc_inflight_calls", "Calls being served", registry=self.registry)
        self.errors = Counter("augsvc_errors_total", "Calls that ended in an error", ["method", "code"],
                              registry=self.registry)
        self.worker_restarts = Gauge("augsvc_worker_restarts", "Worker processes replaced after dying",
                                     registry=self.registry)
        self.bad_samples = Counter("augsvc_bad_samples_total", "Requests that named a dataset sample whose file "
                                   "does not decode (corrupt or truncated)", registry=self.registry)
        self.workers_alive = Gauge("augsvc_workers_alive", "Worker processes alive", registry=self.registry)
        self._http: Any = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks one)."""
        self._http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop serving /metrics (idempotent)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
