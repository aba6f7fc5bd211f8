"""Two ranks under torchrun (gloo on the CPU): DDP through AugmentedStream finishes when the epoch's
batch count is odd, and a 2-rank augsvc-train run killed mid-epoch and resumed from its
checkpoint sees exactly the batches (epoch, position, sample ids, pixels) of an uninterrupted one.

Every run is bounded by a timeout that only stops a hang, in its own process group, killed at
the end whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.servers import descendants, serve, subprocess_env, wait_until

from augsvc.server import ServerSettings

HELPERS = Path(__file__).resolve().parent / "helpers"
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with serve(ServerSettings(workers=2, datasets={"digits": "builtin:digits"})) as served:
        yield served.target


def torchrun(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(OMP_NUM_THREADS="1", **(env or {})), start_new_session=True)


@contextlib.contextmanager
def killed_at_exit(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """torchrun and its ranks (each in a session of its own) are SIGKILLed by id when the block ends."""
    try:
        yield proc
    finally:
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def finish(proc: subprocess.Popen[str]) -> str:
    with killed_at_exit(proc):
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_ddp_through_the_stream_with_an_odd_batch_count(target: str, tmp_path: Path) -> None:
    """1,797 digits in batches of 128 are 15 batches: each of 2 ranks takes 8 steps (rank 1's
    last one repeats batch 0, marked as padding), none waits forever in an all-reduce, and the
    real samples of both ranks are the epoch exactly once."""
    finish(torchrun(HELPERS / "ddp_stream.py", target, str(tmp_path), "128"))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [[0, 2, "torch.distributed", 8, 15], [1, 2, "torch.distributed", 8, 15]]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8
    assert ranks[0]["padded_ids"] == [] and len(ranks[1]["padded_ids"]) == 128
    real = sorted(ranks[0]["real_ids"] + ranks[1]["real_ids"])
    assert real == list(range(1797))


def train_args(target: str, out: Path) -> list[str]:
    """A small 2-rank run: 400 training digits in batches of 32 are 13 batches an epoch (7 per
    rank, one padded), 3 epochs, a checkpoint every 2 steps; the strength per class follows the
    clean gap (each rank scores its shards, the sums are added over the ranks)."""
    return ["--server", target, "--out", str(out), "--epochs", "3", "--train-size", "400", "--val-fraction", "0.1",
            "--batch-size", "32", "--width", "8", "--depth", "2", "--patience", "10", "--checkpoint-every", "2",
            "--augment-strength", "adaptive", "--strength-per-class", "--strength-start", "0.5", "--no-progress"]


def trace(folder: Path, rank: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def test_ddp_training_killed_mid_epoch_resumes_exactly(target: str, tmp_path: Path) -> None:
    whole, crashed, resumed = (tmp_path / name for name in ("whole", "crashed", "resumed"))
    for folder in (whole, crashed, resumed):
        folder.mkdir()
    script = HELPERS / "ddp_train.py"
    finish(torchrun(script, *train_args(target, whole / "out"), env={"TRACE_DIR": str(whole)}))

    # Every rank stops when it receives batch 5 of epoch 1 (0-based), after the checkpoint of step 4.
    with killed_at_exit(torchrun(script, *train_args(target, crashed / "out"),
                                 env={"TRACE_DIR": str(crashed), "HANG_AT": "1:5"})) as proc:
        wait_until(lambda: all((crashed / f"hung{r}").exists() for r in range(2)) or proc.poll() is not None,
                   timeout=RUN_TIMEOUT, what="both ranks at epoch 1, batch 5")
        assert proc.poll() is None, proc.communicate()[0][-4000:]
    checkpoint = torch.load(crashed / "out" / "checkpoint.pt", weights_only=True)
    data = checkpoint["data"]
    assert (data["epoch"], data["position"]) == (1, 4) and not checkpoint["run"]["epoch_done"]

    out = finish(torchrun(script, *train_args(target, crashed / "out"), "--resume",
                          str(crashed / "out" / "checkpoint.pt"), env={"TRACE_DIR": str(resumed)}))
    assert "epoch 3:" in out
    for rank in range(2):
        before = [b for b in trace(crashed, rank) if (b["epoch"], b["position"]) <= (1, 4)]
        assert len(before) == 7 + 4 and trace(crashed, rank)[-1]["position"] == 5  # batch 5 came, untrained
        assert before + trace(resumed, rank) == trace(whole, rank), f"rank {rank} saw other batches"
    # The same batches, the same steps: the same weights and metrics as the run never interrupted.
    want = torch.load(whole / "out" / "last.pt", weights_only=True)
    got = torch.load(crashed / "out" / "last.pt", weights_only=True)
    for key, value in want["model_state"].items():
        assert torch.equal(got["model_state"][key], value), key
    rows = [[json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
            for run in (whole, crashed)]
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "l2_norm", "lr", "strength", "clean_gap")
    assert [[r[k] for k in keys] for r in rows[1]] == [[r[k] for k in keys] for r in rows[0]]
    assert rows[0][0]["strength"] == 0.5 and len({r["strength"] for r in rows[0]}) > 1  # the controller moved


def test_nproc_starts_one_embedded_server_for_the_node(tmp_path: Path) -> None:
    """`augsvc-train --nproc 2` without --server: torchrun, local rank 0 starts the node's server,
    rank 1 finds it through the process group; both train, rank 0 alone reports."""
    command = [str(Path(sys.executable).with_name("augsvc-train")), "--nproc", "2", "--workers", "1",
               "--out", str(tmp_path / "out"), "--epochs", "1", "--train-size", "256", "--val-fraction", "0.1",
               "--batch-size", "64", "--width", "8", "--depth", "2", "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(OMP_NUM_THREADS="1"), start_new_session=True)
    out = finish(proc)
    assert out.count("embedded augsvc on unix:") == 1 and "2 rank(s)" in out
    assert out.count("epoch 1: train loss") == 1 and "best epoch 1" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["world_size"] == 2
