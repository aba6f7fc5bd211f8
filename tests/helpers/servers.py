"""Servers for tests: in-process (`serve`), as an `augsvc serve` subprocess (`OwnGroupServer`,
`CliServer`), and process / shared-memory inspection for the clean-shutdown checks (re-exported
from `augsvc.procfs`).

Every server binds 127.0.0.1 port 0 (or a unix socket) and uses the port it was given; every
wait is bounded by a timeout; every process started here is ended by its own id.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from augsvc.launcher import ServeProcess
from augsvc.procfs import alive, descendants, parent_of  # noqa: F401 - re-exported for the tests
from augsvc.server import AugmentServer, ServerSettings, create_server
from augsvc.shm import SEGMENT_PREFIX, segments_of  # noqa: F401 - re-exported for the tests
from augsvc.v1 import augment_pb2_grpc as pb_grpc

TIMEOUT = 30.0
#: The venv's console script, next to the interpreter running the tests.
AUGSVC = Path(sys.executable).with_name("augsvc")
#: A proxy in the environment must never see loopback test traffic.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def wait_until(cond: Callable[[], object], timeout: float = TIMEOUT, what: str = "condition",
               interval: float = 0.02) -> None:
    """Poll `cond` every `interval` seconds until it is true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without proxies and without AUGSVC_* settings (which `augsvc serve`
    reads as flags), plus `extra`."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_grpc_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop and not k.startswith("AUGSVC_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
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


class OwnGroupServer(ServeProcess):
    """`augsvc serve ARGS` as a subprocess (augsvc.launcher) in its own process group, its log in
    `log_path`; `close()` (and leaving a `with` block) kills the group and reaps it."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(args, env=env or subprocess_env(), log_path=log_path, own_session=True)

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.process

    @property
    def host(self) -> str | None:
        return self.ready.host

    def close(self) -> None:
        self.kill()

    def __exit__(self, *exc: object) -> None:
        self.close()


class CliServer(OwnGroupServer):
    """An `OwnGroupServer` that is ready once built (its ready line in `ready`)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 ready_timeout: float = 90.0) -> None:
        super().__init__(args, log_path, env)
        self.wait_ready(ready_timeout)
