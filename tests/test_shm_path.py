"""The shared-memory reply path (StreamBatchesRequest.shm_segments / Batch.shm_segment): a
client on the server's host offers one segment per batch, the workers write the pixels there,
and the gRPC stream carries only labels, ids and shapes. Same pixels as inline; bad names are
refused; unusable segments fall back to inline; segments do not leak."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from helpers.data import served_digits
from helpers.servers import SEGMENT_PREFIX, Served, serve, wait_until

from augsvc import augment_batch, epoch_batches, load_spec
from augsvc.server import ServerSettings
from augsvc.shm import CLIENT_SEGMENT_PREFIX, create_segment, is_client_segment, release_segment
from augsvc.v1 import augment_pb2 as pb
from augsvc.wire import parse_reply
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SLEEP_HOOK_ENV, f"{SLOW_SEED}:1.5")
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


def test_raw_client_segments(served: Served, digits: np.ndarray) -> None:
    """Pixels land in the segments offered, in call order; the replies carry no pixel bytes."""
    segments = [create_segment(BATCH * 32 * 32, "batch", reserve=False, client=True) for _ in range(3)]
    try:
        replies = raw_stream(served, request(start=2, end=5, shm_segments=[s.name for s in segments]))
        want = expected(digits, 0)
        for j, (msg, pixels) in enumerate(replies):
            assert pixels is None and msg.shm_segment == segments[j].name and msg.batch_index == 2 + j
            shape = tuple(msg.images.shape)
            got = np.ndarray(shape, np.uint8, buffer=segments[j].buf)
            assert np.array_equal(got, want[2 + j])
            del got
    finally:
        for s in segments:
            release_segment(s, unlink=True)


def test_unusable_segments_fall_back_to_inline(served: Served, digits: np.ndarray) -> None:
    small = create_segment(10, "batch", reserve=False, client=True)  # too small for a batch
    missing = f"{CLIENT_SEGMENT_PREFIX}{os.getpid()}_0badf00d_batch"  # never created
    try:
        replies = raw_stream(served, request(start=0, end=2, shm_segments=[small.name, missing]))
    finally:
        release_segment(small, unlink=True)
    want = expected(digits, 0)
    for j, (msg, pixels) in enumerate(replies):
        assert msg.shm_segment == "" and pixels is not None
        assert np.array_equal(pixels, want[j])


@pytest.mark.parametrize("names, why", [
    (["augsvc_client_1_deadbeef_batch"], "2 batches, one name"),
    (["augsvc_1_deadbeef_out", "augsvc_client_1_deadbeef_batch"], "a server-style name"),
    (["/etc/passwd", "augsvc_client_1_deadbeef_batch"], "a path"),
    (["augsvc_client_1_deadbeef_batch"] * 2, "a name twice"),
])
def test_bad_segment_names_are_refused(served: Served, names: list[str], why: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(served, request(start=0, end=2, shm_segments=names))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
    assert "shm_segments" in (info.value.details() or "")
    assert served.health() == "SERVING"


def test_worker_killed_mid_batch_with_shared_memory(served: Served, digits: np.ndarray) -> None:
    """The slow seed keeps a batch on a worker; killing it fails that call (UNAVAILABLE), the
    stream re-asks with fresh segments, and the epoch is still exact."""
    pool = served.server.pool
    restarts = pool.stats()["restarts"]
    with AugmentClient(served.target) as client:
        stream = AugmentedStream(client, "digits", SPEC, batch_size=450, seed=SLOW_SEED, prefetch=2)
        it = iter(stream)
        first = next(it)
        wait_until(lambda: pool.stats()["inflight"] >= 1, what="a batch on a worker")
        pid = next(p for p in pool.pids() if p is not None)
        os.kill(pid, signal.SIGKILL)
        rest = [(x.clone(), ids.clone()) for x, _, ids in it]
    wait_until(lambda: pool.stats()["restarts"] == restarts + 1, what="the replacement worker")
    plan = epoch_batches(1797, 450, seed=SLOW_SEED, epoch=0)
    batches = [(first[0], first[2]), *rest]
    assert len(batches) == len(plan)
    for (x, ids), p in zip(batches, plan, strict=True):
        assert np.array_equal(ids.numpy(), p)
        want = augment_batch(digits[p], SPEC, seed=SLOW_SEED, epoch=0, sample_ids=p)
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), want)
    assert served.health() == "SERVING"


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
    ("ipv6:[2001:db8::1]:443", False), ("ipv4:localhost.evil.com:1", False), ("", False), ("dns:x", False),
])
def test_only_unix_and_loopback_peers_count_as_local(peer: str, local: bool) -> None:
    from augsvc.security import is_local_peer

    assert is_local_peer(peer) is local
