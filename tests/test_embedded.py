"""An embedded server follows the process that started it: SIGKILL the trainer, and its
`augsvc serve` (started with --exit-with) drains and exits instead of living on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers.servers import TIMEOUT, wait_until

from augsvc.procfs import alive

SCRIPT = """
import sys, time
from trainer_client.embedded import EmbeddedServer
server = EmbeddedServer(workers=1, datasets={"digits": "builtin:digits"})
print(server.pid, flush=True)
time.sleep(600)
"""


def test_a_sigkilled_trainer_leaves_no_server_behind() -> None:
    trainer = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None
        server_pid = int(trainer.stdout.readline())
        assert alive(server_pid)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(TIMEOUT)
        wait_until(lambda: not alive(server_pid), timeout=TIMEOUT, what="the orphaned server to exit")
    finally:
        if trainer.poll() is None:
            trainer.kill()
