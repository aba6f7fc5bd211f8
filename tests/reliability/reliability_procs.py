"""Processes, memory and shared memory for the reliability suite.

`ServeProcess` runs `augsvc serve` as a subprocess in its own process group on 127.0.0.1 port 0
(or a unix socket) and parses its ready line; the helpers below read /proc (RSS, peak RSS, CPU
time, the process tree) and /dev/shm (segments are named ``augsvc_<creator pid>_<hex>_<tag>``).
Every wait is bounded; every process started here is ended by its own id (or its own group).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
from helpers.servers import alive, descendants, parent_of  # noqa: F401 - alive is re-exported

from augsvc.server import AugmentServer, ServerSettings, create_server

TIMEOUT = 30.0
READY_TIMEOUT = 120.0
SEGMENT_PREFIX = "augsvc_"
#: Loopback test traffic must never go through a proxy from the environment.
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]
READY_RE = re.compile(r"^augsvc serving on (?P<where>\S+) workers=(?P<workers>\d+) metrics=(?P<metrics>\S+)$")


def wait_until(
    cond: Callable[[], object], timeout: float = TIMEOUT, what: str = "condition", interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without proxies or AUGSVC_* settings (`augsvc serve` reads them as flags)."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_grpc_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop and not k.startswith("AUGSVC_")}
    env.update(PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1", AUGSVC_LOG_LEVEL="WARNING", **extra)
    return env


def channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Iterable[tuple[str, object]] = (),
) -> grpc.Channel:
    opts = [*CHANNEL_OPTIONS, *options]
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=opts)
    return grpc.insecure_channel(target, options=opts)


# -- /proc -----------------------------------------------------------------------------------------


def status_kb(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    return status_kb(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, our own processes); False if not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (not of its children)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# alive() and descendants() come from tests/helpers/servers.py (one /proc scan for both suites).


def segments_of(pid: int) -> set[str]:
    """Shared-memory segments created by process `pid`."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"{SEGMENT_PREFIX}{pid}_")}


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


class ServeProcess:
    """`augsvc serve ARGS` in its own process group; `wait_ready()` parses the ready line.

    Start several with `start_all` so that they boot in parallel."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "augsvc.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env or subprocess_env(),
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"serve-{self.pid}-stdout").start()
        self.target = ""
        self.metrics_port: int | None = None
        self.workers = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise AssertionError(
                    f"augsvc serve: no ready line within {timeout}s; log:\n{self.log()}"
                ) from None
            if line is None:
                code = self.proc.wait(10)
                self.close()
                raise AssertionError(f"augsvc serve exited ({code}) before it was ready; log:\n{self.log()}")
            match = READY_RE.match(line)
            if match:
                self.target = match["where"]
                self.workers = int(match["workers"])
                self.metrics_port = None if match["metrics"] == "-" else int(match["metrics"])
                return self

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

    def log(self) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        return self.log_path.read_text()

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def descendants(self) -> set[int]:
        return descendants(self.pid)

    def segments(self) -> set[str]:
        return segments_of(self.pid)

    def worker_pids(self) -> set[int]:
        """Worker processes: children of the forkserver, itself a child of the server."""
        return {p for p in descendants(self.pid) if parent_of(p) not in (self.pid, None)}

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def close(self) -> None:
        """Kill what is left of this server's own process group and reap it."""
        # The group outlives its leader while a child lingers; the leader's pid stays reserved
        # until it is reaped below, so the group id cannot belong to anyone else yet.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
