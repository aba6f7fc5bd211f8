"""A script that iterates a stream, all of an epoch or part of it, and exits without closing
anything leaves no shared-memory segment behind and no resource_tracker warning (the stream
unlinks every segment it made at interpreter exit, including those under a live batch)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.servers import serve

from augsvc.server import ServerSettings

SCRIPT = """
import sys
from trainer_client import AugmentClient, AugmentedStream
client = AugmentClient(sys.argv[1])
stream = AugmentedStream(client, "digits", {"transforms": [{"hflip": {}}]}, batch_size=64, seed=0)
for i, batch in enumerate(stream):
    if sys.argv[2] == "part" and i == 2:
        break
print("received", i + 1, "batches through", stream.received, flush=True)
"""


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as served:
        yield served.target


@pytest.mark.parametrize("how", ["all", "part"])
def test_exit_without_closing_leaves_nothing(target: str, how: str, tmp_path: Path) -> None:
    script = tmp_path / "iterate.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), target, how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"received {29 if how == 'all' else 3} batches" in out and "'shared_memory': 0" not in out
    assert "resource_tracker" not in err and "leaked" not in err, err
    # the segment names carry the creator's pid (augsvc.shm)
    left = [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("augsvc")
            and re.search(rf"_{proc.pid}[_.]", p.name)]
    assert not left
