"""An embedded local augsvc: `augsvc serve` as a subprocess on a unix socket, for `augsvc-train`
without `--server` (and for tests and benchmarks that need a real server process)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path


class EmbeddedServer:
    """Starts `augsvc serve` and waits for its ready line; `target` is what clients dial."""

    def __init__(self, *, datasets: dict[str, str] | None = None, workers: int | None = None,
                 unix: bool = True, extra_args: list[str] | None = None, start_timeout: float = 120.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="augsvc-")
        args = [sys.executable, "-m", "augsvc.cli", "serve"]
        if unix:
            args += ["--unix", str(Path(self._tmp.name) / "augsvc.sock")]
        else:
            args += ["--host", "127.0.0.1", "--port", "0"]
        if workers:
            args += ["--workers", str(workers)]
        for name, source in (datasets or {"digits": "builtin:digits"}).items():
            args += ["--dataset", f"{name}={source}"]
        args += extra_args or []
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "AUGSVC_LOG_LEVEL": "WARNING"}
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=env)
        lines: queue.Queue[str | None] = queue.Queue()
        # The server's log lines, last ones kept: read all the time, so that a server that logs a lot
        # over a long run never blocks on a full pipe.
        self.stderr_tail: deque[str] = deque(maxlen=200)

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.put(line)
            lines.put(None)

        def pump_stderr() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.stderr_tail.append(line)

        threading.Thread(target=pump, daemon=True).start()
        stderr_reader = threading.Thread(target=pump_stderr, daemon=True)
        stderr_reader.start()
        try:
            while True:
                line = lines.get(timeout=start_timeout)
                if line is None:
                    code = self.process.wait()
                    stderr_reader.join(timeout=5)
                    raise RuntimeError(f"augsvc serve exited with {code}: {''.join(self.stderr_tail)[-2000:]}")
                if line.startswith("augsvc serving on "):
                    where = line.split()[3]
                    self.target = where if where.startswith("unix:") else where
                    self.workers = int(line.split("workers=")[1].split()[0])
                    break
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not exit within `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._tmp.cleanup()
        return self.process.returncode

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
