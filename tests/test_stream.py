"""AugmentedStream and AugmentClient against real servers (DESIGN contracts 1-2): every sample
exactly once per epoch, bit-identical batches with 1 or 2 servers and when a server is killed
mid-epoch, resume from a state_dict, ranks, and data the client owns."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import served_digits

from augsvc import augment_batch, epoch_batches, load_spec
from augsvc.errors import InvalidInputError
from augsvc.server import ServerSettings, create_server
from augsvc.worker import SLEEP_HOOK_ENV
from trainer_client import AugmentClient, AugmentedStream, StreamError
from trainer_client.embedded import EmbeddedServer

SPEC = load_spec({"transforms": [{"rotate": {"limit_range": [-12, 12]}}, {"scale": {"scale_range": [0.9, 1.1]}},
                                 {"color": {"brightness": 0.2, "contrast": 0.2, "p": 0.8}}],
                  "border": "constant"})
BATCH = 64
SEED = 7


@pytest.fixture(scope="module")
def digits() -> Iterator[np.ndarray]:
    yield served_digits()[0]


@pytest.fixture(scope="module")
def servers() -> Iterator[list[str]]:
    started = []
    for _ in range(2):
        server, port = create_server("127.0.0.1:0", ServerSettings(workers=1, datasets={"digits": "builtin:digits"}))
        started.append((server.start(), port))
    yield [f"127.0.0.1:{port}" for _, port in started]
    for server, _ in started:
        server.stop(0)


def collect(stream: AugmentedStream) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone(), ids.clone()) for x, y, ids in stream]


def expected_epoch(digits: np.ndarray, epoch: int, population: np.ndarray | int = 1797) -> list[np.ndarray]:
    """The epoch as augment_batch computes it in-process: NCHW uint8 per batch."""
    return [augment_batch(digits[ids], SPEC, seed=SEED, epoch=epoch, sample_ids=ids).transpose(0, 3, 1, 2)
            for ids in epoch_batches(population, BATCH, seed=SEED, epoch=epoch)]


def assert_epoch(batches: list, digits: np.ndarray, epoch: int, population: np.ndarray | int = 1797) -> None:
    want = expected_epoch(digits, epoch, population)
    assert len(batches) == len(want)
    for (x, _, ids), (plan_ids, w) in zip(batches, zip(epoch_batches(population, BATCH, seed=SEED, epoch=epoch),
                                                       want, strict=True), strict=True):
        assert torch.equal(ids, torch.as_tensor(plan_ids))
        assert x.dtype == torch.uint8 and np.array_equal(x.numpy(), w)
    all_ids = torch.cat([b[2] for b in batches]).sort().values.numpy()
    pop = np.arange(population) if isinstance(population, int) else np.sort(population)
    assert np.array_equal(all_ids, pop), "every sample exactly once"


def test_one_and_two_servers_give_the_same_epoch(servers: list[str], digits: np.ndarray) -> None:
    with AugmentClient(servers[0]) as one, AugmentClient(servers) as two:
        a = collect(AugmentedStream(one, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=3))
        b = collect(AugmentedStream(two, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=3))
    assert_epoch(a, digits, 3)
    assert_epoch(b, digits, 3)
    labels = torch.cat([y for _, y, _ in b])
    ids = torch.cat([i for _, _, i in b])
    from sklearn.datasets import load_digits

    assert torch.equal(labels, torch.as_tensor(load_digits().target[ids.numpy()], dtype=torch.int64))


def test_server_killed_mid_epoch_changes_nothing(servers: list[str], digits: np.ndarray) -> None:
    with EmbeddedServer(workers=1, unix=False) as doomed, AugmentClient([doomed.target, servers[0]]) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=5, prefetch=4)
        got = []
        for i, batch in enumerate(stream):
            got.append(tuple(t.clone() for t in batch))
            if i == 3:
                os.kill(doomed.pid, signal.SIGKILL)
        assert doomed.process.wait(timeout=10) == -signal.SIGKILL
    assert_epoch(got, digits, 5)


def test_resume_from_state_dict(servers: list[str], digits: np.ndarray) -> None:
    with AugmentClient(servers) as client:
        full = collect(AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=2))
        first = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=2)
        it = iter(first)
        for _ in range(5):
            next(it)
        state = first.state_dict()
        it.close()
        assert state["position"] == 5 and state["epoch"] == 2
        resumed = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
        resumed.load_state_dict(state)
        rest = collect(resumed)
    assert len(rest) == len(full) - 5
    for (x, _, ids), (fx, _, fids) in zip(rest, full[5:], strict=True):
        assert torch.equal(x, fx) and torch.equal(ids, fids)


def test_two_ranks_cover_the_epoch_exactly_once(servers: list[str], digits: np.ndarray) -> None:
    """29 batches over 2 ranks: 15 each; rank 1's last is batch 0 again, marked as padding."""
    with AugmentClient(servers) as client:
        full = collect(AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=1))
        streams = [AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=1, rank=r,
                                   world_size=2, with_mask=True) for r in range(2)]
        ranks = [[tuple(t.clone() for t in b) for b in s] for s in streams]
    assert len(full) == 29 and [len(s) for s in streams] == [15, 15] and [len(r) for r in ranks] == [15, 15]
    assert [s.real_batches for s in streams] == [15, 14]
    for r in range(2):
        for j, (x, _, ids, real) in enumerate(ranks[r]):
            fx, _, fids = full[(r + 2 * j) % 29]
            assert torch.equal(x, fx) and torch.equal(ids, fids)
            assert bool(real.all()) == (r + 2 * j < 29) and bool(real.any()) == (r + 2 * j < 29)
    ids = torch.cat([b[2][b[3]] for rank in ranks for b in rank]).sort().values
    assert torch.equal(ids, torch.arange(1797)), "the un-padded samples are the epoch, each once"


def test_subset_population_and_epochs_differ(servers: list[str], digits: np.ndarray) -> None:
    subset = np.random.default_rng(0).choice(1797, 300, replace=False)
    with AugmentClient(servers) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, sample_ids=subset)
        e0 = collect(stream)
        stream.set_epoch(1)
        e1 = collect(stream)
    assert_epoch(e0, digits, 0, subset)
    assert_epoch(e1, digits, 1, subset)
    assert not torch.equal(e0[0][2], e1[0][2]), "a new epoch is a new permutation"


def test_client_owned_arrays_through_augment_stream(servers: list[str], digits: np.ndarray) -> None:
    images = digits[:500]
    labels = np.arange(500) % 10
    with AugmentClient(servers) as client:
        got = collect(AugmentedStream.from_arrays(client, images, labels, SPEC, batch_size=BATCH, seed=SEED,
                                                  epoch=4))
    plan = epoch_batches(500, BATCH, seed=SEED, epoch=4)
    assert len(got) == len(plan)
    for (x, y, _ids), plan_ids in zip(got, plan, strict=True):
        want = augment_batch(images[plan_ids], SPEC, seed=SEED, epoch=4, sample_ids=plan_ids)
        assert np.array_equal(x.numpy(), want.transpose(0, 3, 1, 2))
        assert torch.equal(y, torch.as_tensor(labels[plan_ids]))
    assert torch.equal(torch.cat([b[2] for b in got]).sort().values, torch.arange(500))


def test_client_augment_matches_engine_and_metadata(servers: list[str], digits: np.ndarray) -> None:
    ids = np.arange(40, 72)
    with AugmentClient(servers) as client:
        out = client.augment(digits[ids], SPEC, seed=1, epoch=2, sample_ids=ids)
        info = client.server_info()
        datasets = client.list_datasets()
    assert np.array_equal(out, augment_batch(digits[ids], SPEC, seed=1, epoch=2, sample_ids=ids))
    assert info.workers == 1 and "fused" in info.backends
    assert datasets[0].name == "digits" and int(datasets[0].num_samples) == 1797


def test_non_retryable_errors_surface(servers: list[str]) -> None:
    with AugmentClient(servers[0]) as client:
        with pytest.raises(LookupError):
            AugmentedStream(client, "nope", SPEC, batch_size=BATCH, seed=0)
        # ids the dataset does not have, or that are not integers: refused before any call
        for ids, fragment in [([0, 1, 5000], r"sample_ids: 5000 is outside \[0, 1796\]"),
                              ([0.7, 1.9], "sample_ids: expected integers, got dtype float64"),
                              ([-1], r"sample_ids: -1 is outside \[0, 1796\]")]:
            with pytest.raises(InvalidInputError, match=fragment):
                AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=0, sample_ids=ids)
        with pytest.raises(InvalidInputError, match=r"seed: -1 is outside \[0, 2\*\*64\)"):
            AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=-1)
        # the server's refusal (a class vector of the wrong length) ends the pass at the first try
        bad = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=0, class_strength=[1.0] * 3)
        with pytest.raises(StreamError, match="INVALID_ARGUMENT"):
            collect(bad)


def test_all_endpoints_down_fails_instead_of_hanging() -> None:
    with AugmentClient("127.0.0.1:1", timeout=2) as client:
        stream = AugmentedStream.from_arrays(client, np.zeros((8, 4, 4, 1), np.uint8), np.zeros(8), SPEC,
                                             batch_size=4, seed=0, max_attempts=2)
        with pytest.raises(StreamError, match="UNAVAILABLE"):
            collect(stream)


def test_default_prefetch_is_sized_by_the_batch(servers: list[str], digits: np.ndarray) -> None:
    """Small batches get a deep prefetch (32), big ones as many as fit in PREFETCH_BYTES (at least
    4); an explicit prefetch wins; a call never asks for more batches than the prefetch holds."""
    from trainer_client.stream import PREFETCH_BYTES, default_prefetch

    assert default_prefetch(None) == 8
    assert default_prefetch(64 * 32 * 32) == 32
    assert default_prefetch(PREFETCH_BYTES // 6) == 6
    assert default_prefetch(PREFETCH_BYTES) == 4
    with AugmentClient(servers[0]) as client:
        small = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=0)  # 64 images of 32x32x1
        assert small.prefetch == 32 and small.streams * small.chunk <= small.prefetch
        big = load_spec({"transforms": [{"resize": {"height": 1024, "width": 1024}}]})
        large = AugmentedStream(client, "digits", big, batch_size=64, seed=0)  # 64 MiB a batch: the server's limit
        assert large.prefetch == 4 and large.chunk == 2
        assert AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=0, prefetch=3).prefetch == 3
        owned = AugmentedStream.from_arrays(client, np.zeros((8, 512, 512, 3), np.uint8), np.zeros(8), SPEC,
                                            batch_size=4, seed=0)  # 3 MiB a batch
        assert owned.prefetch == 32 and owned.chunk == 8


def test_embedded_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    """Its log is read all along (a long run never blocks on a full stderr pipe) and its tail is the
    error when it exits before serving."""
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(RuntimeError, match="augsvc serve exited with") as info:
        EmbeddedServer(datasets={"x": str(missing)}, workers=1)
    assert "no-such-dataset" in str(info.value)


def test_a_server_that_refuses_our_segment_names_gets_the_epoch_inline(servers: list[str], digits: np.ndarray,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A server of an older version checks client segment names against its own form (INVALID_ARGUMENT
    # "shm_segments[0].name: ..."): the stream asks again without segments, and stays inline there.
    import augsvc.jobs

    monkeypatch.setattr(augsvc.jobs, "is_client_segment", lambda name: False)
    with AugmentClient(servers[0]) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, epoch=2)
        with pytest.warns(ResourceWarning, match="refused this client's shared-memory segments"):
            batches = collect(stream)
        assert stream.received["shared_memory"] == 0 and stream.received["inline"] == len(batches)
        stream.close()
    assert_epoch(batches, digits, 2)


def test_streams_beyond_the_pool_limit_are_refused_retried_and_each_gets_its_epoch(
        digits: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each StreamBatches call keeps up to 2 x workers batches in the pool; a server admits
    # max_inflight. Three streams at once on a server that admits 2 jobs: calls beyond the limit
    # are refused (RESOURCE_EXHAUSTED, counted), the clients retry them, and every stream still
    # gets its whole epoch exactly once. Every batch sleeps 20 ms in the worker (the tests' hook),
    # so the three streams' calls overlap for certain.
    from helpers.servers import serve

    monkeypatch.setenv(SLEEP_HOOK_ENV, f"{SEED}:0.02")
    settings = ServerSettings(workers=1, datasets={"digits": "builtin:digits"}, max_inflight=2)
    results: dict[int, list] = {}
    errors: list[str] = []
    with serve(settings) as s:
        def run(epoch: int) -> None:
            try:
                with AugmentClient(s.target) as client:
                    results[epoch] = collect(AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED,
                                                             epoch=epoch))
            except Exception as exc:  # reported below, with the others
                errors.append(repr(exc))

        threads = [threading.Thread(target=run, args=(epoch,)) for epoch in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        refused = s.server.metrics.registry.get_sample_value(
            "augsvc_errors_total", {"method": "StreamBatches", "code": "RESOURCE_EXHAUSTED"})
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    assert refused is not None and refused >= 1
    for epoch in range(3):
        assert_epoch(results[epoch], digits, epoch)


def test_a_pass_keeps_what_it_started_with_when_set_epoch_starts_another(servers: list[str],
                                                                          digits: np.ndarray) -> None:
    """Two open passes of one stream: set_epoch between them changes the next pass only. Before,
    the older pass's later calls asked for the new epoch (its pixels, silently, with shuffle off)
    and an arrays stream's pass took the new strength mid-way."""
    with AugmentClient(servers[0]) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, shuffle=False, prefetch=2)
        old = iter(stream)
        first = [tuple(t.clone() for t in next(old)) for _ in range(3)]
        stream.set_epoch(5)
        new = iter(stream)
        newer = tuple(t.clone() for t in next(new))
        rest = [tuple(t.clone() for t in b) for b in old]
        new.close()
        plan = epoch_batches(1797, BATCH, seed=SEED, epoch=0, shuffle=False)
        for (x, _, ids), want in zip(first + rest, plan, strict=True):
            assert torch.equal(ids, torch.as_tensor(want))
            assert np.array_equal(x.numpy(), augment_batch(digits[want], SPEC, seed=SEED, epoch=0,
                                                           sample_ids=want).transpose(0, 3, 1, 2))
        assert np.array_equal(newer[0].numpy(), augment_batch(digits[plan[0]], SPEC, seed=SEED, epoch=5,
                                                              sample_ids=plan[0]).transpose(0, 3, 1, 2))

        images, labels = digits[:256], np.zeros(256, np.int64)
        arrays = AugmentedStream.from_arrays(client, images, labels, SPEC, batch_size=32, seed=SEED, prefetch=1)
        old = iter(arrays)
        got = [next(old)[0].clone()]
        arrays.set_epoch(1, strength=0.0)
        got += [b[0].clone() for b in old]
        for x, ids in zip(got, epoch_batches(256, 32, seed=SEED, epoch=0), strict=True):
            assert np.array_equal(x.numpy(), augment_batch(images[ids], SPEC, seed=SEED, epoch=0,
                                                           sample_ids=ids).transpose(0, 3, 1, 2))


def test_a_state_without_class_strength_clears_it(servers: list[str]) -> None:
    """load_state_dict applies the state's class strength, "none" included (before, a stream
    built with a class vector kept it, and the resumed batches differed from the saved run's)."""
    with AugmentClient(servers[0]) as client:
        plain = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
        classed = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, class_strength=[0.0] * 10)
        classed.load_state_dict(plain.state_dict())
        assert classed.class_strength is None and classed.state_dict() == plain.state_dict()


def test_a_closed_client_ends_the_pass_at_once(servers: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An error no retry can mend (here the client's channel closed under the stream) ends the
    pass at its first occurrence; before, anything but a gRPC status was retried with backoff,
    max_attempts times."""
    import trainer_client.stream as stream_module

    backoffs: list[float] = []
    real_sleep = stream_module.time.sleep
    monkeypatch.setattr(stream_module.time, "sleep", lambda s: backoffs.append(s) or real_sleep(0))
    client = AugmentClient(servers[0])
    stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, prefetch=2, max_attempts=50)
    with pytest.raises(StreamError, match="Channel closed"):
        for i, _ in enumerate(stream):
            if i == 0:
                client.close()
    # a call in flight when the channel closed ends CANCELLED, which is worth one more try; the
    # next try finds the channel closed and ends the pass (before: 50 tries per batch)
    assert len(backoffs) <= stream.streams
    stream.close()


def test_client_augment_takes_sample_ids_as_augment_batch_does(servers: list[str], digits: np.ndarray) -> None:
    """Negative ids wrap to the same uint64 keys on both sides (before, the client raised
    protobuf's bare "Value out of range"); a seed outside [0, 2**64) is refused by name."""
    with AugmentClient(servers[0]) as client:
        ids = [-1, 2, -(2**40)]
        got = client.augment(digits[:3], SPEC, seed=SEED, epoch=1, sample_ids=ids)
        assert np.array_equal(got, augment_batch(digits[:3], SPEC, seed=SEED, epoch=1, sample_ids=ids))
        with pytest.raises(InvalidInputError, match=r"seed: -3 is outside \[0, 2\*\*64\)"):
            client.augment(digits[:3], SPEC, seed=-3, epoch=1, sample_ids=ids)


def test_a_batch_over_the_servers_limit_is_refused_when_the_stream_is_made() -> None:
    """The server would refuse every such batch RESOURCE_EXHAUSTED (and the stream retried them
    10 times with backoff, ~12 s); the dataset's shape and the spec tell the stream up front."""
    settings = ServerSettings(workers=1, datasets={"digits": "builtin:digits"}, max_batch_bytes=1 << 20)
    server, port = create_server("127.0.0.1:0", settings)
    server.start()
    try:
        with AugmentClient(f"127.0.0.1:{port}") as client:
            big = {"transforms": [{"resize": {"height": 256, "width": 256}}]}  # 64 KiB a digit
            with pytest.raises(ValueError, match=r"batch_size: 32 images of 65536 bytes .* use at most 16"):
                AugmentedStream(client, "digits", big, batch_size=32, seed=0)
            assert len(collect(AugmentedStream(client, "digits", big, batch_size=16, seed=0,
                                               sample_ids=list(range(32))))) == 2
    finally:
        server.stop(0)
