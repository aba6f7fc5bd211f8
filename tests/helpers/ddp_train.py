"""`augsvc-train` (trainer_client.cli.main) with a callback that records every batch each rank's
training loop receives — epoch, position, sample ids and a hash of the pixels — one JSON line
each in $TRACE_DIR/rank<r>.jsonl. With $HANG_AT=EPOCH:POSITION (0-based epoch) every rank
writes $TRACE_DIR/hung<r> when it receives that batch and then waits to be killed, as a crash
mid-epoch would leave it. Run under torchrun by tests/test_ddp.py with augsvc-train's arguments."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from trainer_client.cli import main
from trainer_client.train import Callback, StepEvent


class Trace(Callback):
    def __init__(self, folder: Path, rank: int, hang_at: tuple[int, int] | None) -> None:
        self.folder, self.rank, self.hang_at = folder, rank, hang_at
        self.file = (folder / f"rank{rank}.jsonl").open("a")

    def on_batch(self, event: StepEvent) -> None:
        images, _labels, ids = event.batch[:3]
        pixels = hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()
        self.file.write(json.dumps({"epoch": event.epoch, "position": event.position, "ids": ids.tolist(),
                                    "pixels": pixels}) + "\n")
        self.file.flush()
        if (event.epoch, event.position) == self.hang_at:
            (self.folder / f"hung{self.rank}").touch()
            while True:
                time.sleep(1)


if __name__ == "__main__":
    hang = os.environ.get("HANG_AT")
    at = tuple(int(v) for v in hang.split(":")) if hang else None
    trace = Trace(Path(os.environ["TRACE_DIR"]), int(os.environ.get("RANK", "0")), at)  # type: ignore[arg-type]
    sys.exit(main(sys.argv[1:], callbacks=[trace]))
