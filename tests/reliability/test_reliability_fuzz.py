"""Hostile input: property-based fuzzing of every RPC with malformed messages (DESIGN contract 4).

The requests come from reliability_hostile (raw protos, load_spec bypassed) plus random bytes as
serialized messages on a raw channel with identity serializers. Every answer must be a
documented status code; UNAVAILABLE only when a worker died (and no input may kill one). Every
call has a deadline of a few seconds and must end by then (with a slack scaled by the measured
load, helpers.calibration), and the server must end it too: after each test no call is left in
the server (its in-flight gauge) and no job in its pool. The one shared server (1 worker, small
limits) must keep serving, and every OK answer must be the exact pixels `augment_batch` /
`epoch_batches` compute in-process. Targeted cases (and the bugs found) are pinned in
test_reliability_limits.py.

Case counts: CI runs FAST_FUZZ_CASES (2,000) spread over the RPCs; ``--fuzz-cases N`` sets the
total; the slow variant runs LONG_FUZZ_CASES (10,000) by default. Each family prints its count
of answers per status code.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.calibration import exceeds
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reliability_hostile import (
    GOOD_SPEC,
    MAX_SIDE,
    METHODS,
    NUM_DIGITS,
    augment_requests,
    raw_bodies,
    stream_requests,
    tensor,
    to_array,
    wire_garbage,
)
from reliability_options import Budget
from reliability_procs import (
    TIMEOUT,
    channel,
    serve_in_process,
    wait_until,
)

from augsvc import augment_batch, epoch_batches
from augsvc.datasets import decode_images
from augsvc.server import AugmentServer, ServerSettings
from augsvc.spec import Spec
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc
from augsvc.validation import Limits

MAX_BATCH = 256 << 10
DEADLINE = 5.0  # every fuzz call's deadline
SLACK = 3.0  # how much later than its deadline a call may end on an idle machine (scaled by the load)
MAX_STREAM_READS = 3  # batches read from a stream before it is cancelled
DOCUMENTED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "UNAVAILABLE",
}
#: Share of the total cases per RPC family.
SHARES = {
    "Augment": 0.35,
    "AugmentStream": 0.15,
    "StreamBatches": 0.25,
    "ListDatasets": 0.05,
    "GetServerInfo": 0.05,
    "raw_bytes": 0.15,
}
#: Answers of known bugs, each pinned by a strict xfail test (test_reliability_limits.py); the fuzz
#: records them as "known:<name>" instead of failing, so that it keeps guarding everything else.
#: Delete an entry when its xfail test starts passing. (None today: "malformed bytes -> INTERNAL"
#: and "0 images -> INTERNAL" were fixed in e338c4e; their tests now guard against regressions.)
KNOWN_BUGS: dict[str, tuple[str, str]] = {}


# -- the shared server and the bookkeeping ---------------------------------------------------------


@dataclass
class Fuzzed:
    server: AugmentServer
    target: str
    channel: grpc.Channel
    stub: pb_grpc.AugmenterStub
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    slowest: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, family: str, code: str, elapsed: float) -> None:
        with self.lock:
            self.outcomes.setdefault(family, Counter())[code] += 1
            self.slowest[family] = max(self.slowest.get(family, 0.0), elapsed)


@pytest.fixture(scope="module")
def fuzzed(digits_pixels: np.ndarray) -> Iterator[Fuzzed]:
    settings_ = ServerSettings(
        workers=1, datasets={"digits": "builtin:digits"}, max_image_side=MAX_SIDE, max_batch_bytes=MAX_BATCH
    )
    with serve_in_process(settings_) as (server, target), channel(target) as ch:
        state = Fuzzed(server, target, ch, pb_grpc.AugmenterStub(ch))
        yield state
        total = sum(sum(c.values()) for c in state.outcomes.values())
        print(f"\nfuzz: {total} cases")
        for family, counts in sorted(state.outcomes.items()):
            print(
                f"  {family:14s} {sum(counts.values()):6d}  slowest {state.slowest[family]:.2f}s  "
                f"{dict(counts.most_common())}"
            )


def assert_still_serving(fz: Fuzzed, digits: np.ndarray) -> None:
    """A good call answers with exact pixels, no worker was replaced, nothing is left in flight."""
    ids = np.arange(5, 13)
    reply = fz.stub.Augment(
        pb.AugmentRequest(
            spec=GOOD_SPEC.to_proto(), images=tensor(digits[ids]), seed=9, epoch=1, sample_ids=ids.tolist()
        ),
        timeout=TIMEOUT,
    )
    np.testing.assert_array_equal(
        to_array(reply.images), augment_batch(digits[ids], GOOD_SPEC, seed=9, epoch=1, sample_ids=ids)
    )
    stats = fz.server.pool.stats()
    assert stats["restarts"] == 0 and stats["alive"] == 1, f"a request killed a worker: {stats}"
    wait_until(lambda: fz.server.pool.stats()["inflight"] == 0, timeout=TIMEOUT, what="the pool to drain")
    # the server ended every call too (a handler still running past its deadline stays counted)
    inflight_calls = lambda: fz.server.metrics.registry.get_sample_value("augsvc_inflight_calls")  # noqa: E731
    wait_until(lambda: inflight_calls() == 0, timeout=TIMEOUT, what="every call to end in the server")


def cases(budget: Budget, mode: str, family: str) -> int:
    return max(1, math.ceil(budget.fuzz_cases(slow=mode == "long") * SHARES[family]))


def run(strategy: st.SearchStrategy[Any], n: int, check: Callable[[Any], None]) -> None:
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def inner(case: Any) -> None:
        check(case)

    inner()


MODES = [pytest.param("ci", id="ci"), pytest.param("long", id="long", marks=pytest.mark.slow)]

# -- oracles ---------------------------------------------------------------------------------------


def code_of(exc: grpc.RpcError) -> str:
    return exc.code().name


def known_bug(code: str, details: str | None) -> str | None:
    for name, answer in KNOWN_BUGS.items():
        if (code, details) == answer:
            return f"known:{name}"
    return None


def check_code(
    fz: Fuzzed, family: str, code: str, details: str | None, elapsed: float, allowed: set[str] = DOCUMENTED
) -> None:
    fz.record(family, code, elapsed)
    if code.startswith("known:"):
        return
    assert not exceeds(elapsed - DEADLINE, SLACK), f"{family}: answered after {elapsed:.1f}s (deadline {DEADLINE}s)"
    assert code in allowed, f"{family}: undocumented status {code}: {details}"
    if code == "UNAVAILABLE":
        raise AssertionError(f"{family}: UNAVAILABLE means a worker died; no input may kill one: {details}")


def well_formed(t: pb.Tensor) -> np.ndarray | None:
    """The batch a Tensor holds when it keeps contract 3 and the server's limits, else None."""
    shape = list(t.shape)
    if t.dtype != "uint8" or len(shape) != 4 or shape[3] not in (1, 3) or shape[0] < 0:
        return None
    n, h, w, c = shape
    if (
        not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE)
        or n * h * w * c > MAX_BATCH
        or len(t.data) != n * h * w * c
    ):
        return None
    return np.frombuffer(t.data, np.uint8).reshape(shape)


def check_augment_reply(msg: pb.AugmentRequest, reply: pb.AugmentResponse) -> None:
    """An OK answer holds exactly what augment_batch computes in-process from the same input."""
    assert list(reply.sample_ids) == list(msg.sample_ids) and reply.tag == msg.tag
    inputs: Any
    if msg.encoded_images:
        inputs = decode_images(list(msg.encoded_images), limits=Limits(max_image_side=MAX_SIDE))
    else:
        inputs = well_formed(msg.images)
        assert inputs is not None, "a malformed tensor was accepted"
    want = augment_batch(
        inputs,
        Spec.from_proto(msg.spec),
        seed=msg.seed,
        epoch=msg.epoch,
        sample_ids=np.array(msg.sample_ids, np.uint64),
        backend=msg.backend or "fused",
        max_side=MAX_SIDE,
    )
    np.testing.assert_array_equal(to_array(reply.images), want)


# -- the fuzz tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_augment(fuzzed: Fuzzed, budget: Budget, digits_pixels: np.ndarray, mode: str) -> None:
    def check(msg: pb.AugmentRequest) -> None:
        started = time.monotonic()
        try:
            reply = fuzzed.stub.Augment(msg, timeout=DEADLINE)
        except grpc.RpcError as exc:
            code = known_bug(code_of(exc), exc.details()) or code_of(exc)
            check_code(fuzzed, "Augment", code, exc.details(), time.monotonic() - started)
            return
        check_code(fuzzed, "Augment", "OK", None, time.monotonic() - started)
        check_augment_reply(msg, reply)

    run(augment_requests(), cases(budget, mode, "Augment"), check)
    assert_still_serving(fuzzed, digits_pixels)


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_augment_stream(fuzzed: Fuzzed, budget: Budget, digits_pixels: np.ndarray, mode: str) -> None:
    def check(case: list[pb.AugmentRequest]) -> None:
        started = time.monotonic()
        replies = []
        try:
            for reply in fuzzed.stub.AugmentStream(iter(case), timeout=DEADLINE):
                replies.append(reply)
        except grpc.RpcError as exc:
            code = known_bug(code_of(exc), exc.details()) or code_of(exc)
            check_code(fuzzed, "AugmentStream", code, exc.details(), time.monotonic() - started)
        else:
            check_code(fuzzed, "AugmentStream", "OK", None, time.monotonic() - started)
            assert len(replies) == len(case), "an OK stream answers every request"
        for msg, reply in zip(case, replies, strict=False):  # replies come in request order
            check_augment_reply(msg, reply)

    run(st.lists(augment_requests(), min_size=1, max_size=4), cases(budget, mode, "AugmentStream"), check)
    assert_still_serving(fuzzed, digits_pixels)


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_stream_batches(fuzzed: Fuzzed, budget: Budget, digits_pixels: np.ndarray, mode: str) -> None:
    labels = fuzzed.server.datasets["digits"].labels

    def check(msg: pb.StreamBatchesRequest) -> None:
        started = time.monotonic()
        batches = []
        call = fuzzed.stub.StreamBatches(msg, timeout=DEADLINE)
        try:
            for batch in call:
                batches.append(batch)
                if len(batches) == MAX_STREAM_READS:
                    break
            code, details = "OK", None
        except grpc.RpcError as exc:
            code, details = code_of(exc), exc.details()
        finally:
            call.cancel()
        check_code(fuzzed, "StreamBatches", code, details, time.monotonic() - started)
        if not batches:
            return
        population = np.array(msg.sample_ids, np.int64) if msg.sample_ids else NUM_DIGITS
        plan = epoch_batches(
            population,
            msg.batch_size,
            seed=msg.seed,
            epoch=msg.epoch,
            shuffle=msg.shuffle if msg.HasField("shuffle") else True,
            drop_last=msg.drop_last,
        )
        end = msg.end if msg.HasField("end") else len(plan)
        indices = list(range(msg.start, end, msg.stride or 1))
        spec = Spec.from_proto(msg.spec)
        for k, batch in zip(indices, batches, strict=False):
            ids = plan[k]
            assert batch.batch_index == k and batch.epoch == msg.epoch
            assert list(batch.sample_ids) == ids.tolist() and list(batch.labels) == labels[ids].tolist()
            np.testing.assert_array_equal(
                to_array(batch.images),
                augment_batch(
                    digits_pixels[ids],
                    spec,
                    seed=msg.seed,
                    epoch=msg.epoch,
                    sample_ids=ids,
                    backend=msg.backend or "fused",
                    max_side=MAX_SIDE,
                ),
            )

    run(stream_requests(), cases(budget, mode, "StreamBatches"), check)
    wait_until(lambda: fuzzed.server.pool.stats()["inflight"] == 0, timeout=TIMEOUT, what="the pool to drain")
    assert_still_serving(fuzzed, digits_pixels)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["ListDatasets", "GetServerInfo"])
def test_fuzz_metadata_rpcs(
    fuzzed: Fuzzed, budget: Budget, digits_pixels: np.ndarray, mode: str, method: str
) -> None:
    """Their requests have no fields: unknown fields and odd metadata must not matter."""
    call = fuzzed.channel.unary_unary(f"/augsvc.v1.Augmenter/{method}")
    reply_type = {"ListDatasets": pb.ListDatasetsResponse, "GetServerInfo": pb.ServerInfo}[method]
    metadata = st.lists(
        st.tuples(st.from_regex(r"\Ax-[a-z0-9]{1,20}\Z"), st.from_regex(r"\A[A-Za-z0-9._]{0,40}\Z")),
        max_size=3,
    )

    def check(case: tuple[bytes, list[tuple[str, str]]]) -> None:
        body, md = case
        started = time.monotonic()
        try:
            reply = reply_type.FromString(call(body, timeout=DEADLINE, metadata=md))
        except grpc.RpcError as exc:
            check_code(fuzzed, method, code_of(exc), exc.details(), time.monotonic() - started)
            return
        check_code(fuzzed, method, "OK", None, time.monotonic() - started)
        if method == "ListDatasets":
            assert [d.name for d in reply.datasets] == ["digits"]
        else:
            assert reply.max_image_side == MAX_SIDE and reply.workers == 1

    run(st.tuples(wire_garbage(), metadata), cases(budget, mode, method), check)
    assert_still_serving(fuzzed, digits_pixels)


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_random_bytes_as_messages(
    fuzzed: Fuzzed, budget: Budget, digits_pixels: np.ndarray, mode: str
) -> None:
    """Identity serializers: whatever bytes arrive, the server answers in time and keeps serving."""

    def check(case: tuple[str, bytes]) -> None:
        method, body = case
        path = f"/augsvc.v1.Augmenter/{method}"
        kind = METHODS[method]
        started = time.monotonic()
        code, details = "OK", None
        try:
            if kind == "unary_unary":
                fuzzed.channel.unary_unary(path)(body, timeout=DEADLINE)
            elif kind == "unary_stream":
                call = fuzzed.channel.unary_stream(path)(body, timeout=DEADLINE)
                try:
                    for i, _ in enumerate(call):
                        if i + 1 == MAX_STREAM_READS:
                            break
                finally:
                    call.cancel()
            else:
                for _ in fuzzed.channel.stream_stream(path)(iter([body]), timeout=DEADLINE):
                    pass
        except grpc.RpcError as exc:
            code, details = code_of(exc), exc.details()
        code = known_bug(code, details) or code
        check_code(fuzzed, "raw_bytes", code, details, time.monotonic() - started)

    run(raw_bodies(), cases(budget, mode, "raw_bytes"), check)
    wait_until(lambda: fuzzed.server.pool.stats()["inflight"] == 0, timeout=TIMEOUT, what="the pool to drain")
    assert_still_serving(fuzzed, digits_pixels)
