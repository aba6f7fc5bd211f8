"""Processes, memory and shared memory for the reliability suite.

`ServeProcess` runs `augsvc serve` as a subprocess in its own process group on 127.0.0.1 port 0
(or a unix socket) and waits for its ready line (augsvc.launcher); the /proc and /dev/shm readings
(RSS, peak RSS, the process tree, segments named ``augsvc_<creator pid>_<hex>_<tag>``) come from
augsvc.procfs. Every wait is bounded; every process started here is ended by its own id (or its
own group).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import traceback
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
from helpers import servers
from helpers.servers import OwnGroupServer, wait_until  # noqa: F401 - wait_until is re-exported

from augsvc.procfs import (  # noqa: F401 - re-exported for the tests
    alive,
    descendants,
    parent_of,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    status_kb,
)
from augsvc.server import AugmentServer, ServerSettings, create_server
from augsvc.shm import segments_of  # noqa: F401 - re-exported for the tests

TIMEOUT = 30.0
READY_TIMEOUT = 120.0
#: Loopback test traffic must never go through a proxy from the environment.
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]


def subprocess_env(**extra: str) -> dict[str, str]:
    """`helpers.servers.subprocess_env` with the server's log at WARNING (this suite starts many)."""
    return servers.subprocess_env(**{"AUGSVC_LOG_LEVEL": "WARNING", **extra})


def channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Iterable[tuple[str, object]] = (),
) -> grpc.Channel:
    opts = [*CHANNEL_OPTIONS, *options]
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=opts)
    return grpc.insecure_channel(target, options=opts)


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of a server's Prometheus endpoint (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return float(sample.value)
    return 0.0


# -- `augsvc serve` as a subprocess ----------------------------------------------------------------


class ServeProcess(OwnGroupServer):
    """`augsvc serve ARGS` in its own process group (log at WARNING unless `env` says otherwise);
    `wait_ready()` waits for its ready line. Start several with `start_all` so that they boot in
    parallel."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(args, log_path, env or subprocess_env())

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> ServeProcess:
        return super().wait_ready(timeout)

    @classmethod
    def start_all(cls, specs: list[tuple[list[str], Path, dict[str, str] | None]]) -> list[ServeProcess]:
        started = [cls(args, log, env) for args, log, env in specs]
        try:
            for server in started:
                server.wait_ready()
        except BaseException:
            for server in started:
                server.close()
            raise
        return started

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def descendants(self) -> set[int]:
        return descendants(self.pid)

    def segments(self) -> set[str]:
        return segments_of(self.pid)

    def worker_pids(self) -> set[int]:
        """Worker processes: children of the forkserver, itself a child of the server."""
        return {p for p in descendants(self.pid) if parent_of(p) not in (self.pid, None)}


# -- in-process servers ----------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_process(
    settings: ServerSettings, address: str = "127.0.0.1:0"
) -> Iterator[tuple[AugmentServer, str]]:
    """An in-process AugmentServer (its pool stats and pids are visible); yields (server, target)."""
    server, port = create_server(address, settings)
    try:
        server.start()
        yield server, (address if address.startswith("unix:") else f"127.0.0.1:{port}")
    finally:
        stop_bounded(server)


def thread_stacks() -> str:
    """Every thread's stack, for a report of something that hung."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


def stop_bounded(server: AugmentServer, timeout: float = 60.0) -> None:
    """server.stop(0), failing (with every thread's stack) instead of hanging past `timeout`."""
    done = threading.Event()
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            server.stop(0)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=stop, name="stop-bounded", daemon=True).start()
    if not done.wait(timeout):
        raise AssertionError(f"AugmentServer.stop(0) did not return within {timeout}s:\n{thread_stacks()}")
    if errors:
        raise errors[0]
