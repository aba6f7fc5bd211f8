"""Start `augsvc serve` as a child process and wait until it serves.

Once it accepts calls, `augsvc serve` prints one line on stdout, a JSON object (`ReadyLine`):

    {"event": "ready", "address": "127.0.0.1:50051", "host": "127.0.0.1", "port": 50051, "pid": 4242,
     "workers": 2, "metrics_port": null, "datasets": ["digits"]}

(on a unix socket: "address": "unix:/path", "host": null, "port": 0). Its logs go to stderr.
`ServeProcess` runs the command with this interpreter, keeps its log (in a file, or its last lines
in memory, read all along so that a chatty server never blocks on a full pipe), waits a bounded
time for the ready line, and ends the process by its own id: SIGTERM to drain, SIGKILL after a
timeout. augsvc-train's embedded server and the test suites' servers are this class.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = ["ReadyLine", "ServeProcess"]

READY_EVENT = "ready"

_Server = TypeVar("_Server", bound="ServeProcess")


@dataclass(frozen=True)
class ReadyLine:
    """What `augsvc serve` prints on stdout, as one JSON object, once it accepts calls."""

    address: str  # what a client dials: "HOST:PORT" or "unix:PATH"
    host: str | None  # the bound host (None on a unix socket)
    port: int  # the bound port (0 on a unix socket)
    pid: int
    workers: int
    metrics_port: int | None  # the Prometheus endpoint's port, None without one
    datasets: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"event": READY_EVENT, **asdict(self), "datasets": list(self.datasets)})

    @classmethod
    def parse(cls, line: str) -> ReadyLine | None:
        """The ready line's fields; None for any other line (a log line, say)."""
        try:
            fields: Any = json.loads(line)
            if not isinstance(fields, dict) or fields.get("event") != READY_EVENT:
                return None
            metrics_port = fields["metrics_port"]
            return cls(address=str(fields["address"]), host=None if fields["host"] is None else str(fields["host"]),
                       port=int(fields["port"]), pid=int(fields["pid"]), workers=int(fields["workers"]),
                       metrics_port=None if metrics_port is None else int(metrics_port),
                       datasets=tuple(str(name) for name in fields["datasets"]))
        except (ValueError, KeyError, TypeError):
            return None


class ServeProcess:
    """`augsvc serve ARGS` as a child process; `wait_ready()` waits for its ready line.

    log_path: the server's stderr goes to this file; without it, its last `tail_lines` lines are
    kept in `log_tail`. own_session: the server leads a new session and process group, so that
    `kill()` also ends whatever it leaves behind (its forkserver and workers), and a Ctrl-C in the
    caller's terminal does not reach it. The process starts at once; the attributes that come from
    the ready line (`ready`, `target`, `port`, `workers`, `metrics_port`) exist once `wait_ready()`
    has returned.
    """

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 own_session: bool = False, tail_lines: int = 200) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.own_session = own_session
        self.log_tail: deque[str] = deque(maxlen=tail_lines)
        self._log_file: IO[str] | None = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in kill()
        self._ready: ReadyLine | None = None
        self._ready_or_eof = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "augsvc.cli", "serve", *self.args], stdout=subprocess.PIPE,
            stderr=self._log_file or subprocess.PIPE, text=True, env=None if env is None else dict(env),
            start_new_session=own_session)
        self.pid = self.process.pid
        threading.Thread(target=self._read_stdout, daemon=True, name=f"serve-{self.pid}-stdout").start()
        self._stderr_reader: threading.Thread | None = None
        if self._log_file is None:
            self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True,
                                                   name=f"serve-{self.pid}-stderr")
            self._stderr_reader.start()

    # Each pipe is read to its end and closed by its own reader thread: it ends when the server and
    # every process that inherited the pipe (its forkserver, workers) have exited.

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                if self._ready is None and (ready := ReadyLine.parse(line)) is not None:
                    self._ready = ready
                    self._ready_or_eof.set()
        self._ready_or_eof.set()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                self.log_tail.append(line)

    def wait_ready(self: _Server, timeout: float = 120.0) -> _Server:
        """Wait (at most `timeout` seconds) for the ready line, then return this server, ready. When
        the server exits first, or prints nothing in time, it is killed and RuntimeError or
        TimeoutError says so with the end of its log."""
        if not self._ready_or_eof.wait(timeout):
            self.kill()
            raise TimeoutError(f"augsvc serve printed no ready line within {timeout}s; its log ends:\n"
                               f"{self.log()[-2000:]}")
        if self._ready is None:
            try:
                code = self.process.wait(10)
            except subprocess.TimeoutExpired:
                code = None  # it closed its stdout but lives on
            self.kill()
            if self._stderr_reader is not None:
                self._stderr_reader.join(timeout=5)  # the last lines of its log: why it exited
            raise RuntimeError(f"augsvc serve exited with {code} before it was ready; its log ends:\n"
                               f"{self.log()[-2000:]}")
        ready = self._ready
        #: What clients dial ("HOST:PORT" or "unix:PATH"), the port (0 on a unix socket), workers,
        #: and the metrics port (None without --metrics-port).
        self.target, self.port, self.workers, self.metrics_port = (ready.address, ready.port, ready.workers,
                                                                  ready.metrics_port)
        return self

    @property
    def ready(self) -> ReadyLine:
        """The ready line's fields."""
        if self._ready is None:
            raise RuntimeError("augsvc serve is not ready yet: call wait_ready() first")
        return self._ready


    def log(self) -> str:
        """The server's log so far: the whole file with `log_path`, else the lines kept."""
        if self._log_file is None or self.log_path is None:
            return "".join(self.log_tail)
        with contextlib.suppress(ValueError):  # already closed
            self._log_file.flush()
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        """Send `signum` to the server process (not its group), while it runs."""
        if self.process.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the server drains its calls and exits), then SIGKILL if it has not exited within
        `timeout` seconds; returns its exit status."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL what is left (with `own_session`, the whole process group, whose shared-memory
        segments are then unlinked: its resource tracker, which would have, died with it) and reap it."""
        if self.own_session:
            # The group outlives its leader while a child lingers, and no new process gets its id
            # while any member lives.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        elif self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.own_session and self.process.returncode is not None:
            from .shm import unlink_segments_of

            unlink_segments_of(self.pid)
        if self._log_file is not None and self.process.returncode is not None:
            self._log_file.close()  # the children write to their own copies of it

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
