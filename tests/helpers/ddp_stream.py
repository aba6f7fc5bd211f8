"""One rank of the 2-process DDP check (run under torchrun by tests/test_ddp.py): trains a tiny
DistributedDataParallel model on an AugmentedStream whose rank and world size it discovers, and
writes what it saw to OUT/rank<r>.json.  Usage: ddp_stream.py TARGET OUT BATCH_SIZE"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer_client import AugmentClient, AugmentedStream
from trainer_client.train import settle_before_exit


def main() -> None:
    target, out, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(32 * 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with AugmentClient(target) as client, \
            AugmentedStream(client, "digits", {"transforms": [{"rotate": {"limit_range": [-10, 10]}}]},
                            batch_size=batch_size, seed=5, with_mask=True) as stream:
        steps, real_ids, padded_ids = 0, [], []
        for images, labels, ids, real in stream:
            loss = torch.nn.functional.cross_entropy(model(images.flatten(1).float() / 255), labels)
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces the gradients: every rank must take this step
            optimizer.step()
            steps += 1
            real_ids += ids[real].tolist()
            padded_ids += ids[~real].tolist()
        world = (stream.rank, stream.world_size, stream.world.source, len(stream), len(stream.plan()))
    dist.barrier()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"world": world, "steps": steps, "real_ids": real_ids, "padded_ids": padded_ids}))
    dist.destroy_process_group()
    settle_before_exit()  # as augsvc-train ends: no thread left to take the GIL during finalization


if __name__ == "__main__":
    main()
