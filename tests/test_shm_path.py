"""The shared-memory reply path (StreamBatchesRequest.shm_segments / Batch.shm_segment): a
client on the server's host offers one segment per batch, the workers write the pixels there,
and the gRPC stream carries only labels, ids and shapes. Same pixels as inline; bad names are
refused; unusable segments fall back to inline; segments do not leak."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory

import grpc
import numpy as np
import pytest
import torch
from helpers.data import served_digits
from helpers.servers import SEGMENT_PREFIX, Served, serve, wait_until

from augsvc import augment_batch, epoch_batches, load_spec
from augsvc.server import ServerSettings, create_server
from augsvc.shm import (
    CLIENT_SEGMENT_PREFIX,
    client_pixels,
    create_client_segment,
    create_segment,
    is_client_segment,
    release_segment,
)
from augsvc.v1 import augment_pb2 as pb
from augsvc.wire import TooManyFields, _varint, parse_reply, split_field
from augsvc.worker import SLEEP_HOOK_ENV
from trainer_client import AugmentClient, AugmentedStream

SPEC = load_spec({"transforms": [{"hflip": {"p": 0.5}}, {"rotate": {"limit_range": [-12, 12]}},
                                 {"color": {"brightness": 0.2, "saturation": 0.3, "p": 0.8}}]})
BATCH = 100
SEED = 3
SLOW_SEED = 4242
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def digits() -> Iterator[np.ndarray]:
    yield served_digits()[0]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve(ServerSettings(workers=2, datasets={"digits": "builtin:digits"})) as s:
        yield s


def my_client_segments() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"{CLIENT_SEGMENT_PREFIX}{os.getpid()}_"))


def expected(digits: np.ndarray, epoch: int) -> list[np.ndarray]:
    return [augment_batch(digits[ids], SPEC, seed=SEED, epoch=epoch, sample_ids=ids)
            for ids in epoch_batches(1797, BATCH, seed=SEED, epoch=epoch)]


def request(**kw: object) -> pb.StreamBatchesRequest:
    base = {"dataset": "digits", "spec": SPEC.to_proto(), "seed": SEED, "epoch": 0, "batch_size": BATCH}
    base.update(kw)
    return pb.StreamBatchesRequest(**base)  # type: ignore[arg-type]


def raw_stream(served: Served, req: pb.StreamBatchesRequest) -> list[tuple[pb.Batch, np.ndarray | None]]:
    call = served.channel.unary_stream("/augsvc.v1.Augmenter/StreamBatches",
                                       request_serializer=pb.StreamBatchesRequest.SerializeToString,
                                       response_deserializer=parse_reply)
    return list(call(req, timeout=TIMEOUT))


def test_client_segment_names() -> None:
    shm = create_segment(16, "batch", reserve=False, client=True)
    try:
        assert is_client_segment(shm.name)
    finally:
        release_segment(shm, unlink=True)
    server_side = create_segment(16, "out", reserve=False)
    try:
        assert server_side.name.startswith(SEGMENT_PREFIX) and not is_client_segment(server_side.name)
    finally:
        release_segment(server_side, unlink=True)
    for bad in ["", "augsvc_client_1_deadbeef", "augsvc_client_x_deadbeef_batch", "../augsvc_client_1_deadbeef_b",
                "augsvc_client_1_deadbeef_batch/x", "augsvc_123_deadbeef_out"]:
        assert not is_client_segment(bad), bad


@pytest.mark.parametrize("channels_last", [True, False])
def test_stream_through_shared_memory_equals_engine(served: Served, digits: np.ndarray, channels_last: bool) -> None:
    with AugmentClient(served.target) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, channels_last=channels_last)
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            got = [(x.clone(), ids.clone()) for x, _, ids in stream]
            want = expected(digits, epoch)
            assert len(got) == len(want)
            for (x, ids), w, plan in zip(got, want, epoch_batches(1797, BATCH, seed=SEED, epoch=epoch), strict=True):
                assert x.shape == (len(plan), 1, 32, 32) and x.dtype == torch.uint8
                assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                                       else torch.contiguous_format)
                assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), w)
                assert np.array_equal(ids.numpy(), plan)
        assert stream.received == {"shared_memory": 2 * len(want), "inline": 0}
        # segments are reused across epochs: at most the pool's keep, not one per batch
        assert 0 < len(my_client_segments()) <= stream.streams * stream.chunk + stream.prefetch + 4
        del stream, got
        gc.collect()
    assert my_client_segments() == []


def test_server_without_shared_memory_sends_inline(digits: np.ndarray) -> None:
    settings = ServerSettings(workers=1, datasets={"digits": "builtin:digits"}, shared_memory=False)
    with serve(settings) as s, AugmentClient(s.target) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
        got = [x.permute(0, 2, 3, 1).numpy().copy() for x, _, _ in stream]
        assert stream.received == {"shared_memory": 0, "inline": len(got)}
    for g, w in zip(got, expected(digits, 0), strict=True):
        assert np.array_equal(g, w)


def test_batches_held_by_the_consumer_keep_their_pixels(served: Served, digits: np.ndarray) -> None:
    """A delivered batch owns its segment: later batches never overwrite a batch still held."""
    with AugmentClient(served.target) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED, prefetch=2)
        held = list(stream)  # no clone: every tensor still views its segment
        assert stream.received["shared_memory"] == len(held)
        for (x, _, _), w in zip(held, expected(digits, 0), strict=True):
            assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), w)
        assert len({x.data_ptr() for x, _, _ in held}) == len(held)
        del held, stream, x
        gc.collect()
    assert my_client_segments() == []


def offer(*segments: tuple[SharedMemory, bytes]) -> list[pb.ShmSegment]:
    return [pb.ShmSegment(name=shm.name, token=token) for shm, token in segments]


def test_raw_client_segments(served: Served, digits: np.ndarray) -> None:
    """Pixels land in the segments offered (after their header), in call order; the replies
    carry no pixel bytes."""
    segments = [create_client_segment(BATCH * 32 * 32) for _ in range(3)]
    try:
        replies = raw_stream(served, request(start=2, end=5, shm_segments=offer(*segments)))
        want = expected(digits, 0)
        for j, (msg, pixels) in enumerate(replies):
            shm = segments[j][0]
            assert pixels is None and msg.shm_segment == shm.name and msg.batch_index == 2 + j
            got = client_pixels(shm, tuple(msg.images.shape))
            assert np.array_equal(got, want[2 + j])
            del got
    finally:
        for shm, _ in segments:
            release_segment(shm, unlink=True)


def test_unusable_segments_fall_back_to_inline(served: Served, digits: np.ndarray) -> None:
    small = create_client_segment(10)  # too small for a batch
    missing = pb.ShmSegment(name=f"{CLIENT_SEGMENT_PREFIX}{os.getpid()}_0badf00d_batch", token=bytes(16))
    try:
        replies = raw_stream(served, request(start=0, end=2, shm_segments=[*offer(small), missing]))
    finally:
        release_segment(small[0], unlink=True)
    want = expected(digits, 0)
    for j, (msg, pixels) in enumerate(replies):
        assert msg.shm_segment == "" and pixels is not None
        assert np.array_equal(pixels, want[j])


def test_someone_elses_segment_is_never_written(served: Served, digits: np.ndarray) -> None:
    """Segment names are visible in /dev/shm; the token is not. A call naming another client's
    segment with any other token gets its batch inline and leaves the segment as it was."""
    victim = create_client_segment(BATCH * 32 * 32)
    try:
        shm, token = victim
        client_pixels(shm, (BATCH * 32 * 32,))[:] = 77
        guesses = [bytes(16), bytes(a ^ 1 for a in token)]
        for guess in guesses:
            (reply,) = raw_stream(served, request(start=0, end=1, shm_segments=[
                pb.ShmSegment(name=shm.name, token=guess)]))
            assert reply[0].shm_segment == "" and np.array_equal(reply[1], expected(digits, 0)[0])
            assert (client_pixels(shm, (BATCH * 32 * 32,)) == 77).all()
        # the right token does get it written
        (reply,) = raw_stream(served, request(start=0, end=1, shm_segments=offer(victim)))
        assert reply[0].shm_segment == shm.name
    finally:
        release_segment(victim[0], unlink=True)


def test_segment_shrunk_after_use_is_not_written(served: Served, digits: np.ndarray) -> None:
    """A worker keeps client segments mapped; a segment truncated since (a write past its end
    would kill the worker with SIGBUS) gets its batch inline, and no worker dies."""
    seg = create_client_segment(BATCH * 32 * 32)
    restarts = served.server.pool.stats()["restarts"]
    try:
        for _ in range(3):  # every worker has it mapped now (or at least one, twice)
            (reply,) = raw_stream(served, request(start=0, end=1, shm_segments=offer(seg)))
            assert reply[0].shm_segment == seg[0].name
        os.ftruncate(seg[0]._fd, 0)  # type: ignore[attr-defined]
        for _ in range(3):
            (reply,) = raw_stream(served, request(start=0, end=1, shm_segments=offer(seg)))
            assert reply[0].shm_segment == "" and np.array_equal(reply[1], expected(digits, 0)[0])
    finally:
        release_segment(seg[0], unlink=True)
    assert served.server.pool.stats()["restarts"] == restarts
    assert served.health() == "SERVING"


GOOD = "augsvc_client_1_deadbeef_batch"


@pytest.mark.parametrize("segments, why", [
    ([(GOOD, 16)], "2 batches, one segment"),
    ([("augsvc_1_deadbeef_out", 16), (GOOD, 16)], "a server-style name"),
    ([("/etc/passwd", 16), (GOOD, 16)], "a path"),
    ([("../" + GOOD, 16), (GOOD, 16)], "a relative path"),
    ([(GOOD, 16), (GOOD, 16)], "a name twice"),
    ([(GOOD, 3), ("augsvc_client_1_deadbeee_batch", 16)], "a short token"),
])
def test_bad_segments_are_refused(served: Served, segments: list[tuple[str, int]], why: str) -> None:
    offered = [pb.ShmSegment(name=name, token=bytes(n)) for name, n in segments]
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(served, request(start=0, end=2, shm_segments=offered))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
    assert "shm_segments" in (info.value.details() or "")
    assert served.health() == "SERVING"


def test_unpacked_population_is_parsed_by_protobuf(served: Served, digits: np.ndarray) -> None:
    """sample_ids sent unpacked (one field per id: legal protobuf) skip the server's field scan
    (TooManyFields) and give the same batches as the packed encoding."""
    population = np.random.default_rng(0).permutation(1797)[:1500]
    packed = request(start=0, end=2, sample_ids=population.tolist())
    unpacked = b"".join(bytes([0x40]) + _varint(int(i)) for i in population)
    head = packed.SerializeToString()
    rest, ids = split_field(head, 8)
    assert pb.StreamBatchesRequest.FromString(rest + unpacked).sample_ids == packed.sample_ids
    with pytest.raises(TooManyFields):
        split_field(rest + unpacked, 8)
    call = served.channel.unary_stream("/augsvc.v1.Augmenter/StreamBatches",
                                       request_serializer=lambda b: b, response_deserializer=parse_reply)
    got = list(call(rest + unpacked, timeout=TIMEOUT))
    want = raw_stream(served, packed)
    assert len(got) == len(want) == 2
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a is not None and b is not None and np.array_equal(a, b)


def test_changing_the_spec_within_an_epoch_takes_effect(served: Served, digits: np.ndarray) -> None:
    other = load_spec({"transforms": [{"vflip": {"p": 1.0}}]})
    with AugmentClient(served.target) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
        assert np.array_equal(next(iter(stream))[0].permute(0, 2, 3, 1).numpy(), expected(digits, 0)[0])
        stream.spec = other
        stream.set_epoch(0)
        x = next(iter(stream))[0].permute(0, 2, 3, 1).numpy()
    ids = epoch_batches(1797, BATCH, seed=SEED, epoch=0)[0]
    assert np.array_equal(x, augment_batch(digits[ids], other, seed=SEED, epoch=0, sample_ids=ids))


def test_ipv6_loopback_client_gets_shared_memory(digits: np.ndarray) -> None:
    try:
        server, port = create_server("[::1]:0", ServerSettings(workers=1, datasets={"digits": "builtin:digits"}))
    except Exception as exc:  # noqa: BLE001 - no IPv6 loopback here
        pytest.skip(f"no IPv6 loopback: {exc}")
    server.start()
    try:
        with AugmentClient(f"[::1]:{port}") as client:
            stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
            got = [x.permute(0, 2, 3, 1).numpy().copy() for x, _, _ in stream]
            assert stream.received == {"shared_memory": len(got), "inline": 0}
    finally:
        server.stop(0)
    for g, w in zip(got, expected(digits, 0), strict=True):
        assert np.array_equal(g, w)


def test_worker_killed_mid_batch_with_shared_memory(digits: np.ndarray) -> None:
    """With one worker, the slow seed keeps a batch on it; killing it fails that call
    (UNAVAILABLE), the stream re-asks with fresh segments, and the epoch is still exact."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SLEEP_HOOK_ENV, f"{SLOW_SEED}:1.5")
        with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as one:
            pool = one.server.pool
            restarts, failed = pool.stats()["restarts"], pool.stats()["failed"]
            with AugmentClient(one.target) as client:
                stream = AugmentedStream(client, "digits", SPEC, batch_size=450, seed=SLOW_SEED, prefetch=2)
                it = iter(stream)
                first = next(it)
                stats = pool.stats
                wait_until(lambda: stats()["inflight"] - stats()["queued"] >= 1, what="a batch on the worker")
                (pid,) = pool.pids()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                rest = [(x.clone(), ids.clone()) for x, _, ids in it]
            wait_until(lambda: pool.stats()["restarts"] == restarts + 1, what="the replacement worker")
            assert pool.stats()["failed"] > failed, "a job died with the worker"
            assert one.health() == "SERVING"
    plan = epoch_batches(1797, 450, seed=SLOW_SEED, epoch=0)
    batches = [(first[0], first[2]), *rest]
    assert len(batches) == len(plan)
    assert stream.received["shared_memory"] == len(plan)
    for (x, ids), p in zip(batches, plan, strict=True):
        assert np.array_equal(ids.numpy(), p)
        want = augment_batch(digits[p], SPEC, seed=SLOW_SEED, epoch=0, sample_ids=p)
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), want)


def test_full_dev_shm_falls_back_to_inline(served: Served, digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """Segments get their pages when created (a worker writing into a page tmpfs cannot supply
    would die of SIGBUS); when /dev/shm is full the stream warns and receives inline."""
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with AugmentClient(served.target) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
        with pytest.warns(ResourceWarning, match="no shared memory"):
            got = [x.permute(0, 2, 3, 1).numpy().copy() for x, _, _ in stream]
        assert stream.received == {"shared_memory": 0, "inline": len(got)}
    for g, w in zip(got, expected(digits, 0), strict=True):
        assert np.array_equal(g, w)
    assert my_client_segments() == []


def worker_mapped_client_segments(served: Served) -> set[str]:
    names = set()
    for pid in served.server.pool.pids():
        if pid is None:
            continue
        with open(f"/proc/{pid}/maps") as f:
            mapped = (line.split("/dev/shm/")[1].split()[0] for line in f if "/dev/shm/" in line)
            names |= {n for n in mapped if n.startswith(CLIENT_SEGMENT_PREFIX)}
    return names


def test_workers_let_go_of_segments_whose_client_left(served: Served) -> None:
    with AugmentClient(served.target) as client:
        first = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
        assert sum(1 for _ in first) == first.received["shared_memory"] > 0
        old = worker_mapped_client_segments(served)
        assert old, "the workers attached the first stream's segments"
        del first
        gc.collect()  # the first stream's segments are unlinked now
        second = AugmentedStream(client, "digits", SPEC, batch_size=BATCH, seed=SEED)
        assert sum(1 for _ in second) == second.received["shared_memory"] > 0
        now = worker_mapped_client_segments(served)
    assert now and not now & old


@pytest.mark.parametrize("peer, local", [
    ("unix:/tmp/augsvc.sock", True), ("unix:", True), ("ipv4:127.0.0.1:50051", True),
    ("ipv4:127.8.9.10:1", True), ("ipv6:[::1]:50051", True), ("ipv4:10.0.0.7:50051", False),
    ("ipv6:%5B::1%5D:50051", True), ("ipv6:[2001:db8::1]:443", False),
    ("ipv6:%5B2001:db8::1%5D:443", False), ("ipv4:localhost.evil.com:1", False), ("", False), ("dns:x", False),
])
def test_only_unix_and_loopback_peers_count_as_local(peer: str, local: bool) -> None:
    from augsvc.security import is_local_peer

    assert is_local_peer(peer) is local
