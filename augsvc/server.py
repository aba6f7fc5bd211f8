"""The gRPC server: `create_server(address, settings) -> (server, port)` removes the shared-memory
segments of augsvc processes that no longer exist (`augsvc.shm.sweep_stale_segments`), loads the
datasets, starts the worker pool first, then builds the gRPC server around the Augmenter servicer
(`augsvc.servicer`) with health, reflection, the token interceptor and TLS, so no process is
forked once gRPC threads exist (DESIGN contract 5). `AugmentServer.stop()` drains and frees.
`ServerSettings` (augsvc/settings.py) is re-exported here, where servers are made.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .datasets import Dataset, load_dataset
from .errors import InvalidInputError
from .metrics import ServerMetrics
from .pool import WorkerPool, default_workers
from .security import TokenInterceptor, is_local_address, server_credentials
from .servicer import SERVICE_NAME, AugmenterServicer, add_augmenter_servicer
from .settings import ServerSettings
from .shm import sweep_stale_segments

__all__ = ["SERVICE_NAME", "AugmentServer", "ServerSettings", "create_server"]

log = logging.getLogger("augsvc.serve")


class AugmentServer:
    """A gRPC server with its worker pool and datasets; `stop()` drains, then frees everything."""

    def __init__(self, grpc_server: grpc.Server, pool: WorkerPool, datasets: dict[str, Dataset],
                 health_servicer: health.HealthServicer, metrics: ServerMetrics, settings: ServerSettings
                 ) -> None:
        self.grpc_server = grpc_server
        self.pool = pool
        self.datasets = datasets
        self.health = health_servicer
        self.metrics = metrics
        self.settings = settings
        self.metrics_port: int | None = None
        self._stopped = threading.Event()
        self._monitor = threading.Thread(target=self._watch_pool, name="augsvc-pool-metrics", daemon=True)
        self._health_status: int | None = None

    def start(self) -> AugmentServer:
        self.grpc_server.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        self._sample_pool()  # the gauges and health are true from the first scrape, not a second later
        self._monitor.start()
        return self

    def _watch_pool(self) -> None:
        while not self._stopped.wait(1.0):
            self._sample_pool()

    def _sample_pool(self) -> None:
        """Workers alive and restarted into the gauges; health SERVING unless no worker can start
        (every one dead and its last replacement failed: calls would only be refused)."""
        stats = self.pool.stats()
        self.metrics.worker_restarts.set(stats["restarts"])
        self.metrics.workers_alive.set(stats["alive"])
        status = health_pb2.HealthCheckResponse.NOT_SERVING if self.pool.unable_to_start() else \
            health_pb2.HealthCheckResponse.SERVING
        if status != self._health_status and not self._stopped.is_set():
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                log.error("no worker can start (see the errors above): health is NOT_SERVING until one does")
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)
            self._health_status = status

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight calls finish within `grace` seconds, then free workers
        and shared memory. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.settings.grace_seconds if grace is None else grace
        self.grpc_server.stop(grace).wait()
        self.metrics.close()
        self.pool.close()
        for ds in self.datasets.values():
            ds.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))

    def __enter__(self) -> AugmentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def load_datasets(settings: ServerSettings) -> dict[str, Dataset]:
    """The settings' datasets, loaded (each closed again if a later one fails)."""
    for option in ("decode_sizes", "layouts"):
        unknown = sorted(set(getattr(settings, option)) - set(settings.datasets))
        if unknown:
            raise InvalidInputError(f"{option}: {', '.join(unknown)} is not a served dataset; served: "
                                    f"{', '.join(settings.datasets) or 'none'}")
    datasets: dict[str, Dataset] = {}
    try:
        for name, source in settings.datasets.items():
            datasets[name] = load_dataset(
                name, source, builtin_side=settings.builtin_side, cache_budget_bytes=settings.cache_budget_bytes,
                decode_size=settings.decode_sizes.get(name), layout=settings.layouts.get(name, "auto"),
                on_bad_file=settings.on_bad_file, verify=settings.verify, max_image_side=settings.max_image_side)
    except BaseException:
        for ds in datasets.values():
            ds.close()
        raise
    return datasets


def _refuse_live_socket(path: str) -> None:
    """ValueError when a server already answers on the unix socket `path`: gRPC would unlink it and
    take the name over, leaving that server running unreachable. A stale file (nobody listening)
    is left for gRPC to replace."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return  # not a socket, or nobody listening: gRPC replaces it
    finally:
        probe.close()
    raise ValueError(f"unix socket {path}: another server is listening there; stop it or choose another path")


def create_server(address: str, settings: ServerSettings | None = None) -> tuple[AugmentServer, int]:
    """Build a server bound to `address` ('127.0.0.1:0', '[::1]:50051', 'unix:/path'); returns it
    (not yet started: call `.start()`) and the bound port (0 for unix sockets)."""
    settings = settings or ServerSettings()
    tls = settings.tls_cert is not None
    if tls != (settings.tls_key is not None):
        raise ValueError("tls_cert and tls_key: give both or neither")
    if settings.tls_client_ca and not tls:
        raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
    if not tls and not settings.insecure and not is_local_address(address):
        raise ValueError(f"address: {address!r} is not loopback or a unix socket; serve it with TLS "
                         "(tls_cert/tls_key) or pass insecure=True (--insecure) explicitly")
    if settings.token is not None and not settings.token:
        raise ValueError("token: empty; a token server needs a non-empty secret (an empty one would serve anyone)")
    if address.startswith("unix:"):
        _refuse_live_socket(address.removeprefix("unix:").removeprefix("//"))
    sweep_stale_segments()
    datasets = load_datasets(settings)
    pool = WorkerPool(settings.workers or default_workers(), datasets=datasets,
                      max_batch_bytes=settings.max_batch_bytes, max_inflight=settings.max_inflight,
                      max_image_side=settings.max_image_side)
    try:
        pool.start()  # before gRPC exists (DESIGN contract 5)
        metrics = ServerMetrics()
        interceptors = []
        if settings.token is not None:
            interceptors.append(TokenInterceptor(
                settings.token, on_reject=lambda m: metrics.errors.labels(m, "UNAUTHENTICATED").inc()))
        options = [("grpc.max_send_message_length", settings.max_message_bytes),
                   ("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        if settings.max_connection_age_seconds:
            options += [("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(settings.grace_seconds * 1000))]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_concurrent_rpcs + 8,
                                                        thread_name_prefix="augsvc-rpc"),
                             interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
        add_augmenter_servicer(AugmenterServicer(pool, datasets, settings, metrics), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        if tls:
            port = server.add_secure_port(address, server_credentials(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca))  # type: ignore[arg-type]
        else:
            port = server.add_insecure_port(address)
        if address.startswith(("unix:", "unix-abstract:")):
            port = 0  # grpc reports 1 for a bound unix socket
    except BaseException:
        pool.close()
        for ds in datasets.values():
            ds.close()
        raise
    return AugmentServer(server, pool, datasets, health_servicer, metrics, settings), port
