"""Training checkpoints that resume exactly, and the few collectives a run needs across ranks.

A checkpoint (`checkpoint.pt` in the run's folder, replaced atomically) is written by rank 0 at
the end of every epoch and, with `checkpoint_every`, after every that many steps inside one. It
holds what the next step depends on: the model, optimizer and scheduler; the run's own state
(`RunState`: the epoch and the steps of it done, the history, early stopping, the overfitting
monitor); the data's position as the training loop received it (an AugmentedStream's
`state_dict()`: one rank's state resumes every rank, which stand at the same position between
steps); each rank's torch RNG state and running sums of the epoch (gathered from every rank);
and the state of any other object the caller hands `fit` (`stateful`). It loads with
`torch.load(weights_only=True)`: only tensors and plain containers. It also holds what defines
the run — the config and the caller's settings — and a resume that differs is refused
(`ResumeMismatch`, naming what differs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .world import World

CHECKPOINT_FORMAT = "augsvc.train/1"


class ResumeMismatch(ValueError):
    """A checkpoint cannot resume this run: another world size, config, settings or state."""


class Stateful(Protocol):
    """What a checkpoint can hold: an object with state_dict() and load_state_dict()."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> None: ...


@dataclass
class RunState:
    """What `fit` carries from step to step besides the model and optimizer. epoch: 1-based, the
    epoch in progress (or just finished when `epoch_done`); step: its batches trained."""

    epoch: int = 1
    step: int = 0
    epoch_done: bool = False
    stopped_early: bool = False
    rows: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = float("inf")
    best_epoch: int = 0
    since_best: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunState:
        return cls(**data)


def rank_state(device: torch.device, sums: list[float]) -> dict[str, Any]:
    """This rank's RNG states and the epoch's running sums."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"rng": torch.get_rng_state(), "cuda_rng": cuda, "sums": sums}


def restore_rank_state(state: Mapping[str, Any], device: torch.device) -> list[float]:
    """Put back a `rank_state`'s RNG states; returns its sums."""
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return [float(v) for v in state["sums"]]


def gather_objects(obj: Any, world: World) -> list[Any]:
    """`obj` from every rank, in rank order (a collective: every rank calls it at the same point)."""
    if not world.distributed:
        return [obj]
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """`values` summed over the ranks (a collective), in place; unchanged in a single process."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader (or a resumed run) never sees half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, its tensors on the CPU (load_state_dict moves
    them where the model is); ValueError for any other file."""
    data: Any = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a training checkpoint of this trainer (format {CHECKPOINT_FORMAT!r})")
    return data
