"""An embedded local augsvc: `augsvc serve` as a subprocess on a unix socket, for `augsvc-train`
without `--server` (and for tests and benchmarks that need a real server process)."""

from __future__ import annotations

import os
import tempfile
from collections import deque
from pathlib import Path

from augsvc.launcher import ServeProcess
from augsvc.procfs import start_time


class EmbeddedServer(ServeProcess):
    """Starts `augsvc serve` (its log at WARNING, the last lines kept in `stderr_tail`) and waits for
    its ready line; `target` is what clients dial. unix: a socket in a private temporary folder,
    else 127.0.0.1 on a port the system picks. RuntimeError with the end of its log when it exits
    before it is ready."""

    def __init__(self, *, datasets: dict[str, str] | None = None, workers: int | None = None,
                 unix: bool = True, extra_args: list[str] | None = None, start_timeout: float = 120.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="augsvc-")
        args = ["--unix", str(Path(self._tmp.name) / "augsvc.sock")] if unix else ["--host", "127.0.0.1", "--port", "0"]
        if workers:
            args += ["--workers", str(workers)]
        for name, source in (datasets or {"digits": "builtin:digits"}).items():
            args += ["--dataset", f"{name}={source}"]
        me = f"{os.getpid()}:{start_time(os.getpid())}"
        args += ["--exit-with", me, *(extra_args or [])]  # no orphan, even if we are SIGKILLed
        super().__init__(args, env={**os.environ, "AUGSVC_LOG_LEVEL": "WARNING"})
        try:
            self.wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def stderr_tail(self) -> deque[str]:
        """The last lines of the server's log (stderr), read all along."""
        return self.log_tail

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not exit within `timeout`."""
        code = super().stop(timeout)
        self._tmp.cleanup()
        return code
