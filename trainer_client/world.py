"""Where this process stands among the trainer's processes: rank, world size, local rank, node.

Discovered in one place (`World.discover`), the way mosaicml streaming's `World` does it: an
initialised `torch.distributed` process group first, then the environment that `torchrun` (and
most launchers) set — RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK — else a single
process. Everything else (the stream's shard of an epoch, which process starts a node's embedded
server, which one writes metrics) asks this object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["World"]


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not an integer") from None


@dataclass(frozen=True)
class World:
    """rank of world_size processes; local_rank of local_world_size on this node, the node's
    index `node`. source: where the figures came from ("torch.distributed", "env", "single")."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: int = 0
    source: str = "single"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank/world_size: rank {self.rank} of {self.world_size} is not allowed; "
                             "expected 0 <= rank < world_size")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local_rank/local_world_size: {self.local_rank} of {self.local_world_size} is not "
                             "allowed; expected 0 <= local_rank < local_world_size")

    @classmethod
    def discover(cls, env: Mapping[str, str] | None = None) -> World:
        """This process's World: the initialised process group's rank and size (local figures
        from the environment), else RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
        GROUP_RANK, else rank 0 of 1."""
        env = os.environ if env is None else env
        if dist.is_available() and dist.is_initialized():
            rank, world_size, source = dist.get_rank(), dist.get_world_size(), "torch.distributed"
        elif "RANK" in env or "WORLD_SIZE" in env:
            rank, world_size, source = _env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), "env"
        else:
            return cls()
        local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", world_size)  # one node unless told
        local_rank = _env_int(env, "LOCAL_RANK", rank % local_world_size)
        node = _env_int(env, "GROUP_RANK", rank // local_world_size)
        return cls(rank, world_size, local_rank, local_world_size, node, source)

    @classmethod
    def of(cls, rank: int | None, world_size: int | None) -> World:
        """`discover()`, with a rank and world size given by the caller taking precedence (both
        or neither: one without the other is refused)."""
        if rank is None and world_size is None:
            return cls.discover()
        if rank is None or world_size is None:
            raise ValueError(f"rank/world_size: give both or neither (got rank={rank}, world_size={world_size})")
        return cls(rank, world_size, source="given")

    @property
    def is_main(self) -> bool:
        """True for rank 0, which writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """True for local rank 0, which starts a node's embedded server."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        """True when an initialised process group has more than one process."""
        return self.source == "torch.distributed" and self.world_size > 1
