"""Servers for tests: in-process (`serve`), as an `augsvc serve` subprocess (`CliServer`), and
process / shared-memory inspection for the clean-shutdown checks.

Every server binds 127.0.0.1 port 0 (or a unix socket) and uses the port it was given; every
wait is bounded by a timeout; every process started here is ended by its own id.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from augsvc.bench.common import descendants, parent_of  # noqa: F401 - re-exported for the tests
from augsvc.server import AugmentServer, ServerSettings, create_server
from augsvc.v1 import augment_pb2_grpc as pb_grpc

TIMEOUT = 30.0
#: The venv's console script, next to the interpreter running the tests.
AUGSVC = Path(sys.executable).with_name("augsvc")
#: A proxy in the environment must never see loopback test traffic.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
#: augsvc names every shared-memory segment ``augsvc_<creator pid>_<random>_<tag>``.
SEGMENT_PREFIX = "augsvc_"
READY_RE = re.compile(r"^augsvc serving on (?P<host>\S+):(?P<port>\d+) workers=(?P<workers>\d+) "
                      r"metrics=(?P<metrics>\S+)$")


def wait_until(cond: Callable[[], object], timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without proxies and without AUGSVC_* settings (which `augsvc serve`
    reads as flags), plus `extra`."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_grpc_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop and not k.startswith("AUGSVC_")}
    env.update(PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1", **extra)
    return env


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                      timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass
class Served:
    """An in-process server and a client channel to it."""

    server: AugmentServer
    port: int
    target: str
    channel: grpc.Channel
    stub: pb_grpc.AugmenterStub

    def health(self, service: str = "") -> str:
        return health_status(self.channel, service)


@contextlib.contextmanager
def serve(settings: ServerSettings, address: str = "127.0.0.1:0", *,
          credentials: grpc.ChannelCredentials | None = None) -> Iterator[Served]:
    """Start a server; yield it with a channel (TLS when `credentials`); stop it on exit."""
    server, port = create_server(address, settings)
    try:
        server.start()
        target = address if address.startswith("unix:") else f"127.0.0.1:{port}"
        channel = (grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS) if credentials
                   else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        try:
            yield Served(server, port, target, channel, pb_grpc.AugmenterStub(channel))
        finally:
            channel.close()
    finally:
        server.stop(0)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else gets it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def run_health(target: str, *extra: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AUGSVC), "health", "--target", target, *extra], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())


# -- processes and shared memory ------------------------------------------------------------------

def alive(pid: int) -> bool:
    return parent_of(pid) is not None


def segments_of(pid: int) -> list[str]:
    """Shared-memory segments created by process `pid` (augsvc names them after their creator)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"{SEGMENT_PREFIX}{pid}_"))


class CliServer:
    """`augsvc serve ...` as a subprocess; waits for its ready line and parses it."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 ready_timeout: float = 90.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(AUGSVC), "serve", *args], stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env or subprocess_env(),
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="cli-server-stdout").start()
        try:
            self.ready = self._wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise
        self.host = self.ready["host"]
        self.port = int(self.ready["port"])
        self.target = f"{self.host}:{self.port}"
        self.metrics_port = None if self.ready["metrics"] == "-" else int(self.ready["metrics"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _wait_ready(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no ready line within {timeout}s; log:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"augsvc serve exited ({self.proc.wait(5)}) before it was ready; "
                                     f"log:\n{self.log()}")
            match = READY_RE.match(line)
            if match:
                return match.groupdict()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        """Kill what is left (only this server's own process group) and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
