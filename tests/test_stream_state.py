"""AugmentedStream as PyTorch code uses it: rank discovery, equal batch counts per rank (padding
or dropping the remainder), where the position stands after an epoch, resume and its refusals
(one test each), and DataLoader with and without worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from helpers.servers import serve
from torch.utils.data import DataLoader

from augsvc import load_spec
from augsvc.server import ServerSettings
from trainer_client import AugmentClient, AugmentedStream, World

SPEC = load_spec({"transforms": [{"rotate": {"limit_range": [-12, 12]}}], "border": "constant"})
OTHER_SPEC = load_spec({"transforms": [{"rotate": {"limit_range": [-10, 10]}}], "border": "constant"})
SUBSET = np.arange(0, 600, 2)  # 300 samples: 10 batches of 32 (the last partial)
BATCH = 32


@pytest.fixture(scope="module")
def client() -> Iterator[AugmentClient]:
    with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as served, \
            AugmentClient(served.target) as c:
        yield c


def stream(client: AugmentClient, **overrides: Any) -> AugmentedStream:
    kwargs: dict[str, Any] = {"batch_size": BATCH, "seed": 3, "sample_ids": SUBSET, "rank": 0, "world_size": 1}
    kwargs.update(overrides)
    spec = kwargs.pop("spec", SPEC)
    return AugmentedStream(client, kwargs.pop("dataset", "digits"), spec, **kwargs)


def ids_of(batches: list[tuple[torch.Tensor, ...]]) -> list[list[int]]:
    return [b[2].tolist() for b in batches]


# ---- world ----------------------------------------------------------------------------------------

def test_world_comes_from_the_environment_torchrun_sets() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert World.discover(env) == World(3, 4, 1, 2, 1, "env")
    assert World.discover({"RANK": "1", "WORLD_SIZE": "2"}) == World(1, 2, 1, 2, 0, "env")
    assert World.discover({}) == World()
    with pytest.raises(ValueError, match="rank/world_size"):
        World.discover({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="both or neither"):
        World.of(1, None)


def test_stream_discovers_its_rank(client: AugmentClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    discovered = stream(client, rank=None, world_size=None)
    assert (discovered.rank, discovered.world_size, discovered.world.source) == (1, 3, "env")
    given = stream(client, rank=0, world_size=2)
    assert (given.rank, given.world_size) == (0, 2)


# ---- equal batch counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [3, 4])
def test_pad_gives_every_rank_the_same_count_and_the_epoch_once(client: AugmentClient, world_size: int) -> None:
    full = stream(client)
    plan = [p.tolist() for p in full.plan()]
    assert len(plan) == 10
    ranks = [list(stream(client, rank=r, world_size=world_size, with_mask=True)) for r in range(world_size)]
    per_rank = -(-10 // world_size)
    assert [len(r) for r in ranks] == [per_rank] * world_size
    real_ids: list[int] = []
    for r, batches in enumerate(ranks):
        for j, (_x, _y, ids, real) in enumerate(batches):
            k = r + world_size * j
            assert ids.tolist() == plan[k % 10], "a padded position repeats the plan from its start"
            assert real.dtype == torch.bool and real.tolist() == [k < 10] * len(ids)
            real_ids += ids[real].tolist()
    assert sorted(real_ids) == SUBSET.tolist(), "the un-padded samples are the epoch, each exactly once"


def test_drop_leaves_out_the_remainder(client: AugmentClient) -> None:
    plan = [p.tolist() for p in stream(client).plan()]
    ranks = [stream(client, rank=r, world_size=4, remainder="drop") for r in range(4)]
    assert [len(s) for s in ranks] == [2] * 4 and all(s.real_batches == 2 for s in ranks)
    got = sorted(i for s in ranks for b in s for i in b[2].tolist())
    assert got == sorted(i for batch in plan[:8] for i in batch)
    with pytest.raises(ValueError, match="remainder"):
        stream(client, remainder="wrap")


# ---- position and resume -------------------------------------------------------------------------

def test_after_the_last_batch_the_state_points_at_the_next_epoch(client: AugmentClient) -> None:
    s = stream(client, epoch=4)
    batches = []
    for batch in s:
        batches.append(batch)
        state = s.state_dict()
        if len(batches) < 10:
            assert (state["epoch"], state["position"]) == (4, len(batches)), "counts what was received"
    assert (state["epoch"], state["position"]) == (5, 0)
    nxt = stream(client)
    nxt.load_state_dict(state)
    assert ids_of(list(nxt)) == ids_of(list(stream(client, epoch=5)))


def test_resume_mid_epoch_through_set_epoch_sees_the_rest(client: AugmentClient) -> None:
    full = [tuple(t.clone() for t in b) for b in stream(client, epoch=2)]
    first = stream(client, epoch=2)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    it.close()
    resumed = stream(client)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a training loop does at every epoch: keeps the checkpoint's position
    rest = list(resumed)
    assert len(rest) == 6
    for got, want in zip(rest, full[4:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    resumed.set_epoch(2)  # no resume pending any more: the start of the epoch
    assert len(list(resumed)) == 10


def test_one_ranks_state_resumes_another(client: AugmentClient) -> None:
    rank0 = stream(client, rank=0, world_size=2)
    it = iter(rank0)
    next(it)
    next(it)
    rank1 = stream(client, rank=1, world_size=2)
    rank1.load_state_dict(rank0.state_dict())
    plan = rank1.plan()
    assert ids_of(list(rank1)) == [plan[k].tolist() for k in (5, 7, 9)]


def test_strength_is_state_not_identity(client: AugmentClient) -> None:
    s = stream(client, strength=0.25)
    resumed = stream(client)
    resumed.load_state_dict(s.state_dict())
    assert resumed.strength == 0.25


REFUSALS = [
    ("dataset", {"dataset": "other"}, "dataset"),
    ("population", {"sample_ids": SUBSET[:-1]}, "population"),
    ("shuffle", {"shuffle": False}, "shuffle"),
    ("batch size", {"batch_size": 16}, "batch_size"),
    ("world size", {"world_size": 2}, "world_size"),
    ("spec", {"spec": OTHER_SPEC}, "spec"),
]


@pytest.mark.parametrize(("what", "change", "key"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_load_state_dict_refuses_another_stream(client: AugmentClient, what: str, change: dict[str, Any],
                                                key: str) -> None:
    state = stream(client).state_dict()
    if key == "dataset":  # one server, one dataset: the state is what another dataset's stream would write
        state["dataset"] = "other"
        other = stream(client)
    else:
        other = stream(client, **change)
    with pytest.raises(ValueError, match=rf"load_state_dict: another {what}.*\({key}\): the state has"):
        other.load_state_dict(state)


# ---- DataLoader ------------------------------------------------------------------------------------

def test_dataloader_without_workers_yields_the_stream(client: AugmentClient) -> None:
    direct = ids_of(list(stream(client, epoch=1)))
    loader = DataLoader(stream(client, epoch=1), batch_size=None)
    got = [batch for batch in loader]
    assert [b[2].tolist() for b in got] == direct
    images, labels, ids = got[0]
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and len(ids) == BATCH


@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")  # gc scan touches it
@pytest.mark.filterwarnings("ignore:Got pickle error when attempting to start a worker:UserWarning")  # the refusal
def test_dataloader_with_workers_is_refused_with_what_to_do(client: AugmentClient) -> None:
    """The loaders' iterators are gone when the test ends: left in cyclic garbage, an iterator's
    __del__ joins worker processes in whatever thread collects next (a later stream's fetch
    thread, even while the interpreter shuts down, where that thread is ended mid-join)."""
    import gc

    from torch.utils.data.dataloader import _BaseDataLoaderIter

    def iterators() -> int:
        return sum(isinstance(o, _BaseDataLoaderIter) for o in gc.get_objects())

    gc.collect()
    before = iterators()
    loader = DataLoader(stream(client), batch_size=None, num_workers=2)
    it = iter(loader)
    try:
        with pytest.raises(RuntimeError, match=r"num_workers=0"):
            next(it)
    finally:
        it._shutdown_workers()  # type: ignore[attr-defined]  # what its __del__ would do, here and now
    del it, loader
    spawned = DataLoader(stream(client), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(TypeError, match=r"DataLoader worker process"):
        next(iter(spawned))  # refused while pickling the worker's arguments: no process started
    gc.collect()
    assert iterators() == before


def test_a_batch_outlives_its_closed_stream(client: AugmentClient) -> None:
    """close() unlinks the segment under a batch still held, but keeps it mapped until the batch
    is freed (unmapping it would crash the reader)."""
    import gc

    s = stream(client)
    it = iter(s)
    images, _labels, ids = next(it)
    want = images.clone()
    it.close()
    s.close()
    del s, it
    gc.collect()
    assert torch.equal(images, want) and int(images.sum()) == int(want.sum())
