"""The gRPC service end to end: results, every documented error code, deadlines and
cancellation, worker death mid-call, metrics, and the `augsvc serve` / `augsvc health` CLI
(DESIGN contracts 2-5).

Servers are module-scoped where tests do not disturb each other; the worker-killing tests get
their own 1-worker server. The worker sleep hook (AUGSVC_TEST_WORKER_SLEEP) makes every job
with SLOW_SEED take HOOK_S seconds, so "mid-call" is deterministic.

Tests wait for events (a job running, a worker replaced, a gauge) with the shared TIMEOUT, which
only stops a hung test; the one duration that is the property (SIGTERM: exit once drained, before
the grace runs out) is compared with a grace scaled by the measured load (helpers.calibration).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import signal
import struct
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from helpers.calibration import margin
from helpers.servers import (
    CHANNEL_OPTIONS,
    TIMEOUT,
    CliServer,
    Served,
    alive,
    descendants,
    refused_port,
    run_health,
    segments_of,
    serve,
    subprocess_env,
    wait_until,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import augsvc
from augsvc import augment_batch, epoch_batches, load_spec
from augsvc.datasets import attach
from augsvc.server import ServerSettings, create_server
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc
from augsvc.worker import SLEEP_HOOK_ENV

SLOW_SEED = 424_242
HOOK_S = 1.0
#: A deadline shorter than HOOK_S: the worker sleeps HOOK_S before it answers, so the call ends
#: DEADLINE_EXCEEDED however loaded the machine is (load only makes the answer later still).
SHORT_DEADLINE_S = 0.3
#: `augsvc serve --grace` on an idle machine, scaled by the measured load: about 5x what the drain
#: (one HOOK_S job) and the exit take.
CLI_GRACE_S = 10.0
MAX_SIDE = 64
MAX_BATCH = 1 << 20
NUM_DIGITS = 1797

SPEC = load_spec({"transforms": [
    {"hflip": {"p": 0.5}},
    {"rotate": {"limit_range": [-15, 15]}},
    {"color": {"brightness": 0.2, "contrast": 0.2, "p": 0.8}},
]})
RESIZE = load_spec({"transforms": [{"rotate": {"limit_range": [-10, 10]}},
                                   {"resize": {"height": 20, "width": 20}}]})


def batch(n: int, h: int = 24, w: int = 20, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape), dtype=str(array.dtype))


def to_array(msg: pb.Tensor) -> np.ndarray:
    assert msg.dtype == "uint8"
    return np.frombuffer(msg.data, np.uint8).reshape(tuple(msg.shape))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries (almost) no pixels: it must be refused
    from its header, without being decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def augment_request(images: np.ndarray, *, seed: int = 1, epoch: int = 0, sample_ids: Any = None,
                    spec: Any = SPEC, backend: str = "") -> pb.AugmentRequest:
    ids = list(range(len(images))) if sample_ids is None else list(sample_ids)
    return pb.AugmentRequest(spec=load_spec(spec).to_proto(), images=tensor(images), seed=seed, epoch=epoch,
                             sample_ids=ids, backend=backend)


def stream_request(**fields: Any) -> pb.StreamBatchesRequest:
    spec = fields.pop("spec", SPEC)
    fields.setdefault("dataset", "digits")
    fields.setdefault("batch_size", 64)
    return pb.StreamBatchesRequest(spec=spec if isinstance(spec, pb.Pipeline) else load_spec(spec).to_proto(),
                                   **fields)


def running_jobs(served: Served) -> int:
    stats = served.server.pool.stats()
    return stats["inflight"] - stats["queued"]


def dataset_pixels(served: Served, name: str, ids: np.ndarray) -> Any:
    reader = attach(served.server.datasets[name].handle())
    try:
        images = reader.gather(ids)
        return images.copy() if isinstance(images, np.ndarray) else [im.copy() for im in images]
    finally:
        reader.close()


def assert_serving(served: Served) -> None:
    """Health says SERVING and a real call still returns the exact pixels."""
    assert served.health() == "SERVING"
    x = batch(2, seed=99)
    reply = served.stub.Augment(augment_request(x, seed=3, sample_ids=[5, 6]), timeout=TIMEOUT)
    np.testing.assert_array_equal(to_array(reply.images), augment_batch(x, SPEC, seed=3, epoch=0,
                                                                        sample_ids=[5, 6]))


def metrics_text(port: int) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
        return str(reply.read().decode())


def sample_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return float(sample.value)
    return None


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_hook() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SLEEP_HOOK_ENV, f"{SLOW_SEED}:{HOOK_S}")
        yield


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder with two classes and two image sizes."""
    root = tmp_path_factory.mktemp("mixed")
    for i, (h, w) in enumerate([(20, 24), (28, 16), (20, 24), (28, 16), (12, 30)]):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(batch(1, h, w, 1, seed=i)[0, :, :, 0]).save(root / f"class{i % 2}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def main(slow_hook: None, mixed_folder: Path) -> Iterator[Served]:
    settings = ServerSettings(workers=2, datasets={"digits": "builtin:digits", "mixed": str(mixed_folder)},
                              max_image_side=MAX_SIDE, max_batch_bytes=MAX_BATCH, metrics_port=0)
    with serve(settings) as served:
        yield served


@pytest.fixture(scope="module")
def fragile(slow_hook: None) -> Iterator[Served]:
    """One worker, at most two jobs in flight: for the tests that kill workers."""
    settings = ServerSettings(workers=1, max_inflight=2, datasets={"digits": "builtin:digits"})
    with serve(settings) as served:
        yield served


# -- metadata ---------------------------------------------------------------------------------------

def test_server_info(main: Served) -> None:
    info = main.stub.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT)
    assert info.version == augsvc.__version__
    assert info.workers == 2
    assert list(info.backends) == ["fused", "albumentations"]
    assert (info.max_image_side, info.max_batch_bytes) == (MAX_SIDE, MAX_BATCH)
    assert info.max_inflight == main.server.pool.max_inflight >= 2
    assert info.pid == os.getpid()
    assert info.hostname


def test_list_datasets(main: Served) -> None:
    reply = main.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=TIMEOUT)
    infos = {d.name: d for d in reply.datasets}
    assert set(infos) == {"digits", "mixed"}
    digits, mixed = infos["digits"], infos["mixed"]
    assert (digits.num_samples, digits.num_classes, digits.source) == (NUM_DIGITS, 10, "builtin")
    assert list(digits.class_names) == [str(i) for i in range(10)]
    assert list(digits.image_shape) == [32, 32, 1]
    assert (mixed.num_samples, mixed.num_classes, mixed.source) == (5, 2, "folder")
    assert list(mixed.class_names) == ["class0", "class1"]
    assert list(mixed.image_shape) == []  # sizes differ


def test_health_and_reflection(main: Served) -> None:
    assert main.health("") == "SERVING"
    assert main.health("augsvc.v1.Augmenter") == "SERVING"
    services = set(ProtoReflectionDescriptorDatabase(main.channel).get_services())
    assert {"augsvc.v1.Augmenter", "grpc.health.v1.Health"} <= services


# -- results ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["", "albumentations"])
def test_augment_and_augment_stream_match_augment_batch(main: Served, backend: str) -> None:
    cases = [(batch(4, seed=1), 7, 0, [0, 1, 2, 3]), (batch(3, 17, 31, 1, seed=2), 8, 5, [9, 2**50, 9])]
    for x, seed, epoch, ids in cases:
        reply = main.stub.Augment(augment_request(x, seed=seed, epoch=epoch, sample_ids=ids, backend=backend),
                                  timeout=TIMEOUT)
        expected = augment_batch(x, SPEC, seed=seed, epoch=epoch, sample_ids=ids, backend=backend or "fused")
        np.testing.assert_array_equal(to_array(reply.images), expected)
        assert list(reply.sample_ids) == ids
    requests = [augment_request(x, seed=seed, epoch=epoch, sample_ids=ids, backend=backend)
                for x, seed, epoch, ids in cases * 3]
    for tag, req in enumerate(requests):
        req.tag = 100 + tag
    replies = list(main.stub.AugmentStream(iter(requests), timeout=TIMEOUT))
    assert [r.tag for r in replies] == [r.tag for r in requests]
    for (x, seed, epoch, ids), reply in zip(cases * 3, replies, strict=True):
        expected = augment_batch(x, SPEC, seed=seed, epoch=epoch, sample_ids=ids, backend=backend or "fused")
        np.testing.assert_array_equal(to_array(reply.images), expected)


def test_encoded_images(main: Served) -> None:
    x = batch(3, 20, 18, 3, seed=4)
    req = pb.AugmentRequest(spec=SPEC.to_proto(), encoded_images=[png(im) for im in x], seed=2, epoch=1,
                            sample_ids=[4, 5, 6])
    reply = main.stub.Augment(req, timeout=TIMEOUT)
    np.testing.assert_array_equal(to_array(reply.images),
                                  augment_batch(x, SPEC, seed=2, epoch=1, sample_ids=[4, 5, 6]))


def test_empty_batch(main: Served) -> None:
    reply = main.stub.Augment(augment_request(np.zeros((0, 8, 8, 3), np.uint8)), timeout=TIMEOUT)
    assert list(reply.images.shape) == [0, 8, 8, 3] and reply.images.data == b""


def test_stream_batches_rank_of_a_split(main: Served) -> None:
    """Rank 1 of 3 over a validation split: batches k % 3 == 1 of the split's plan, in order."""
    split = np.arange(0, NUM_DIGITS, 7)
    req = stream_request(batch_size=20, seed=13, epoch=4, sample_ids=split.tolist(), start=1, stride=3)
    plan = epoch_batches(split, 20, seed=13, epoch=4)
    got = list(main.stub.StreamBatches(req, timeout=TIMEOUT))
    assert [b.batch_index for b in got] == list(range(1, len(plan), 3))
    labels = main.server.datasets["digits"].labels
    for b in got:
        ids = plan[b.batch_index]
        assert list(b.sample_ids) == ids.tolist() and list(b.labels) == labels[ids].tolist()
        assert b.epoch == 4
        np.testing.assert_array_equal(to_array(b.images), augment_batch(
            dataset_pixels(main, "digits", ids), SPEC, seed=13, epoch=4, sample_ids=ids))


def test_stream_batches_mixed_sizes_with_a_resize(main: Served) -> None:
    got = list(main.stub.StreamBatches(stream_request(dataset="mixed", spec=RESIZE, batch_size=2, seed=3,
                                                      shuffle=False), timeout=TIMEOUT))
    assert [list(b.sample_ids) for b in got] == [[0, 1], [2, 3], [4]]
    for b in got:
        ids = np.array(b.sample_ids)
        expected = augment_batch(dataset_pixels(main, "mixed", ids), RESIZE, seed=3, epoch=0, sample_ids=ids)
        assert list(b.images.shape) == [len(ids), 20, 20, 1]
        np.testing.assert_array_equal(to_array(b.images), expected)


# -- bad input: the documented code, and the server keeps serving -----------------------------------

Call = Callable[[Served], Any]


def augment(req: pb.AugmentRequest) -> Call:
    return lambda s: s.stub.Augment(req, timeout=TIMEOUT)


def stream(req: pb.StreamBatchesRequest) -> Call:
    return lambda s: list(s.stub.StreamBatches(req, timeout=TIMEOUT))


def raw_augment(images: pb.Tensor, **fields: Any) -> Call:
    fields.setdefault("sample_ids", list(range(max(1, images.shape[0] if images.shape else 1))))
    return augment(pb.AugmentRequest(spec=SPEC.to_proto(), images=images, seed=1, **fields))


def bad_rotate() -> pb.Pipeline:
    msg = pb.Pipeline()
    msg.transforms.add().rotate.limit_range.extend([-400, 0])
    return msg


def nan_rotate() -> pb.Pipeline:
    msg = pb.Pipeline()
    msg.transforms.add().rotate.limit_range.extend([float("nan"), 0])
    return msg


def empty_transform() -> pb.Pipeline:
    msg = pb.Pipeline()
    msg.transforms.add()
    return msg


def bad_border() -> pb.Pipeline:
    msg = SPEC.to_proto()
    msg.border = "wrap"
    return msg


INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
X2 = batch(2, 8, 8, 3)
BAD_INPUTS: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("rank_3_shape", raw_augment(pb.Tensor(data=bytes(128), shape=[2, 8, 8], dtype="uint8")),
     INVALID, r"images\.shape: \[2, 8, 8\] is not \[N, H, W, C\]"),
    ("four_channels", raw_augment(pb.Tensor(data=bytes(256), shape=[1, 8, 8, 4], dtype="uint8")),
     INVALID, r"images\.shape: channels 4 is not allowed; expected 1 or 3"),
    ("negative_side", raw_augment(pb.Tensor(data=b"", shape=[1, -8, 8, 1], dtype="uint8")),
     INVALID, r"images\.shape: .*empty or negative side"),
    ("size_mismatch", raw_augment(pb.Tensor(data=bytes(100), shape=[2, 8, 8, 3], dtype="uint8")),
     INVALID, r"images\.data: 100 bytes do not match shape \[2, 8, 8, 3\] \(384 bytes expected\)"),
    ("float32_dtype", raw_augment(pb.Tensor(data=bytes(4 * 192), shape=[1, 8, 8, 3], dtype="float32")),
     INVALID, r"images\.dtype: 'float32' is not supported; expected 'uint8'"),
    ("no_images_at_all", augment(pb.AugmentRequest(spec=SPEC.to_proto(), sample_ids=[0])),
     INVALID, r"images\.dtype: '' is not supported"),
    ("corrupt_png", augment(pb.AugmentRequest(spec=SPEC.to_proto(), sample_ids=[0, 1],
                                              encoded_images=[png(X2[0]), b"\x89PNG\r\n\x1a\nbroken"])),
     INVALID, r"encoded_images\[1\]: not a decodable PNG/JPEG image"),
    ("images_and_encoded_images", augment(pb.AugmentRequest(spec=SPEC.to_proto(), images=tensor(X2[:1]),
                                                            encoded_images=[png(X2[0])], sample_ids=[0])),
     INVALID, r"send either images or encoded_images, not both"),
    ("side_over_limit", raw_augment(pb.Tensor(data=bytes(65 * 8), shape=[1, 65, 8, 1], dtype="uint8")),
     EXHAUSTED, rf"images\.shape: side 65 is over the limit of {MAX_SIDE} pixels"),
    ("png_claiming_9000_pixels_a_side", augment(pb.AugmentRequest(
        spec=SPEC.to_proto(), encoded_images=[png(X2[0]), png_header(9000, 9000)], sample_ids=[0, 1])),
     EXHAUSTED, rf"encoded_images\[1\]: 9000x9000 exceeds the maximum image side {MAX_SIDE}"),
    ("png_decompression_bomb", augment(pb.AugmentRequest(
        spec=SPEC.to_proto(), encoded_images=[png_header(20000, 20000)], sample_ids=[0])),
     EXHAUSTED, r"encoded_images\[0\]: the image has too many pixels"),
    ("output_side_over_limit", augment(augment_request(X2, spec={"transforms": [
        {"resize": {"height": 100, "width": 10}}]})),
     EXHAUSTED, rf"output side 100 is over the limit of {MAX_SIDE} pixels"),
    ("batch_over_max_batch_bytes", augment(augment_request(batch(300, 40, 40, 3))),  # 1.44 MB > 1 MiB
     EXHAUSTED, rf"images: 1440000 bytes is over the batch limit of {MAX_BATCH} bytes"),
    ("message_over_grpc_limit", augment(augment_request(batch(1000, 40, 40, 3))),  # 4.8 MB
     EXHAUSTED, r"(?i)message larger than max|received message larger"),
    ("invalid_spec_rotate", augment(pb.AugmentRequest(spec=bad_rotate(), images=tensor(X2),
                                                      sample_ids=[0, 1])),
     INVALID, r"transforms\[0\]\.rotate\.limit_range: -400 is outside \[-180, 180\]"),
    ("invalid_spec_in_stream", stream(stream_request(spec=bad_rotate())),
     INVALID, r"transforms\[0\]\.rotate\.limit_range: -400 is outside \[-180, 180\]"),
    ("nan_in_spec", augment(pb.AugmentRequest(spec=nan_rotate(), images=tensor(X2), sample_ids=[0, 1])),
     INVALID, r"transforms\[0\]\.rotate\.limit_range\[0\]: nan is not a finite number"),
    ("empty_transform", augment(pb.AugmentRequest(spec=empty_transform(), images=tensor(X2),
                                                  sample_ids=[0, 1])),
     INVALID, r"transforms\[0\]: empty transform; expected one of: hflip, "),
    ("unknown_border", augment(pb.AugmentRequest(spec=bad_border(), images=tensor(X2), sample_ids=[0, 1])),
     INVALID, r"border: 'wrap' is not allowed; allowed: reflect_101, constant, replicate"),
    ("too_few_sample_ids", augment(augment_request(X2, sample_ids=[0])),
     INVALID, r"sample_ids: 1 ids for 2 images; expected one per image"),
    ("no_sample_ids", augment(augment_request(X2, sample_ids=[])),
     INVALID, r"sample_ids: 0 ids for 2 images"),
    ("unknown_backend", augment(augment_request(X2, backend="torch")),
     INVALID, r"backend: 'torch' is not allowed; allowed: fused, albumentations"),
    ("unknown_backend_in_stream", stream(stream_request(backend="torch")),
     INVALID, r"backend: 'torch' is not allowed"),
    ("unknown_dataset", stream(stream_request(dataset="nope")),
     grpc.StatusCode.NOT_FOUND, r"dataset: 'nope' is not served here; available: digits, mixed"),
    ("batch_range_outside_the_epoch", stream(stream_request(batch_size=128, start=5, end=100)),
     INVALID, r"start/end: batch range \[5, 100\) is outside the epoch's batches \[0, 15\)"),
    ("start_past_the_end", stream(stream_request(batch_size=128, start=16)),
     INVALID, r"batch range \[16, 15\) is outside"),
    ("sample_id_outside_the_dataset", stream(stream_request(sample_ids=[0, NUM_DIGITS])),
     INVALID, rf"sample_ids: {NUM_DIGITS} is outside \[0, {NUM_DIGITS - 1}\]"),
    ("mixed_sizes_without_a_sizing_step", stream(stream_request(dataset="mixed")),
     INVALID, r"spec: dataset 'mixed' has images of different sizes; add a resize"),
    ("batch_size_zero", stream(stream_request(batch_size=0)),
     INVALID, r"batch_size: 0 is not allowed; expected an integer >= 1"),
    ("stream_batch_over_max_batch_bytes", stream(stream_request(batch_size=1100)),  # 1100 x 32 x 32
     EXHAUSTED, rf"batch_size: 1100 images of 32x32x1 are 1126400 bytes, over the batch limit of "
                rf"{MAX_BATCH}"),
    ("stream_output_side_over_limit", stream(stream_request(spec={"transforms": [
        {"resize": {"height": 8, "width": 65}}]})),
     EXHAUSTED, rf"output side 65 is over the limit of {MAX_SIDE} pixels"),
]


@pytest.mark.parametrize("call, code, message", [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_its_code_and_the_server_keeps_serving(main: Served, call: Call, code: grpc.StatusCode,
                                                              message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(main)
    assert info.value.code() == code, info.value.details()
    assert info.value.details() is not None
    assert re.search(message, info.value.details()), info.value.details()
    assert_serving(main)


@pytest.mark.parametrize("method, kind", [("Augment", "unary_unary"), ("AugmentStream", "stream_stream"),
                                          ("StreamBatches", "unary_stream"), ("ListDatasets", "unary_unary"),
                                          ("GetServerInfo", "unary_unary")])
def test_undecodable_request_bytes(main: Served, method: str, kind: str) -> None:
    """Bytes that are no message of the method's request type at all: INVALID_ARGUMENT naming the
    type (grpc alone would answer INTERNAL), for every method; the server carries on."""
    raw = getattr(main.channel, kind)(f"/augsvc.v1.Augmenter/{method}")
    garbage = b"\xff\xff\xff\xff"
    with pytest.raises(grpc.RpcError) as info:
        if kind == "unary_unary":
            raw(garbage, timeout=TIMEOUT)
        else:
            list(raw(iter([garbage]) if kind == "stream_stream" else garbage, timeout=TIMEOUT))
    assert info.value.code() == INVALID, info.value.details()
    assert "not a valid augsvc.v1." in info.value.details()
    assert_serving(main)


def test_bad_request_in_the_middle_of_augment_stream(main: Served) -> None:
    x = batch(2, seed=5)
    good = augment_request(x, seed=4, sample_ids=[1, 2])
    bad = augment_request(x, seed=4, sample_ids=[1])
    replies = main.stub.AugmentStream(iter([good, bad, good]), timeout=TIMEOUT)
    first = next(replies)
    np.testing.assert_array_equal(to_array(first.images), augment_batch(x, SPEC, seed=4, epoch=0,
                                                                        sample_ids=[1, 2]))
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert info.value.code() == INVALID and "sample_ids: 1 ids for 2 images" in info.value.details()
    assert_serving(main)


def test_a_call_over_a_million_batches_serves_its_last_ones(main: Served) -> None:
    """A population of a million ids at batch size 1 is a million batches in one call: the
    server walks them as they are asked for (before, it built a tuple per batch, and a list of
    the ids as Python ints, before the first reply: GBs for 16 million ids)."""
    n = 1_000_000
    ids = np.arange(n, dtype=np.uint64) % NUM_DIGITS
    request = stream_request(batch_size=1, shuffle=False, start=n - 2)
    request.sample_ids.extend(ids.tolist())
    got = list(main.stub.StreamBatches(request, timeout=TIMEOUT))
    assert [b.batch_index for b in got] == [n - 2, n - 1]
    assert [list(b.sample_ids) for b in got] == [[int(ids[-2])], [int(ids[-1])]]


def test_offers_pair_each_batch_with_its_segment_lazily() -> None:
    from augsvc.jobs import ClientSegment
    from augsvc.servicer import _Offers

    segs = [ClientSegment(f"s{i}", b"t" * 16) for i in range(3)]
    assert list(_Offers(range(4, 10, 2), segs)) == list(zip(range(4, 10, 2), segs, strict=True))
    plain = _Offers(range(0, 10**12, 7), [])
    assert len(plain) == len(range(0, 10**12, 7)) and plain[-1] == (range(0, 10**12, 7)[-1], None)
    assert plain[1:3] == [(7, None), (14, None)]


# -- deadlines and cancellation ---------------------------------------------------------------------

def test_short_deadline(main: Served) -> None:
    def errors() -> list[str]:
        return [f"{s.labels}" for m in main.server.metrics.registry.collect() for s in m.samples
                if s.name == "augsvc_errors_total" and s.labels.get("code") in ("CANCELLED", "DEADLINE_EXCEEDED")]

    before = errors()
    with pytest.raises(grpc.RpcError) as info:
        main.stub.Augment(augment_request(batch(2), seed=SLOW_SEED), timeout=SHORT_DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as info:
        list(main.stub.StreamBatches(stream_request(seed=SLOW_SEED), timeout=SHORT_DEADLINE_S))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_serving(main)
    # the started jobs run to their end; nothing stays in flight
    wait_until(lambda: main.server.pool.stats()["inflight"] == 0, what="the pool to drain")
    assert main.server.pool.stats()["restarts"] == 0
    # a caller that left is not a server error, in a unary call as in a stream (before, Augment's
    # passed deadline was counted as a CANCELLED error)
    wait_until(lambda: main.server.metrics.registry.get_sample_value("augsvc_inflight_calls") == 0,
               what="the calls to end on the server")
    assert errors() == before


def test_cancelled_stream_stops_producing(main: Served) -> None:
    def sent() -> float:
        value = main.server.metrics.registry.get_sample_value("augsvc_batches_total",
                                                              {"method": "StreamBatches"})
        return value or 0.0

    before = sent()
    total = len(epoch_batches(NUM_DIGITS, 8, seed=1, epoch=0))  # 225 batches
    call = main.stub.StreamBatches(stream_request(batch_size=8, seed=1), timeout=TIMEOUT)
    assert next(call).batch_index == 0
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: main.server.pool.stats()["inflight"] == 0, what="the pool to drain")
    produced = sent() - before
    assert produced < total / 2, "the server kept producing batches for a cancelled stream"
    assert_serving(main)


# -- worker death -----------------------------------------------------------------------------------

def test_sigkill_during_augment(fragile: Served) -> None:
    pool = fragile.server.pool
    (old_pid,) = pool.pids()
    assert old_pid is not None
    restarts = pool.stats()["restarts"]
    x, ids = batch(3, seed=7), [10, 11, 12]
    slow = fragile.stub.Augment.future(augment_request(x, seed=SLOW_SEED, sample_ids=ids), timeout=TIMEOUT)
    wait_until(lambda: running_jobs(fragile) == 1, what="the slow job to run")
    queued = fragile.stub.Augment.future(augment_request(x, seed=1, sample_ids=ids), timeout=TIMEOUT)
    wait_until(lambda: pool.stats()["queued"] == 1, what="the second job to queue")
    with pytest.raises(grpc.RpcError) as info:  # max_inflight=2
        fragile.stub.Augment(augment_request(x, seed=2, sample_ids=ids), timeout=TIMEOUT)
    assert info.value.code() == EXHAUSTED and "max_inflight" in info.value.details()

    os.kill(old_pid, signal.SIGKILL)
    err = slow.exception(timeout=TIMEOUT)
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "died (exit code -9)" in err.details() and "retry" in err.details()
    # the job queued behind it runs on the replacement, with the same pixels
    np.testing.assert_array_equal(to_array(queued.result(timeout=TIMEOUT).images),
                                  augment_batch(x, SPEC, seed=1, epoch=0, sample_ids=ids))
    assert pool.stats()["restarts"] == restarts + 1
    assert pool.pids() != [old_pid] and pool.pids()[0] is not None
    wait_until(lambda: not alive(old_pid), what="the killed worker to be reaped")
    assert_serving(fragile)
    # a retry of the failed call succeeds (the hook makes it slow, not wrong)
    reply = fragile.stub.Augment(augment_request(x, seed=SLOW_SEED, sample_ids=ids), timeout=TIMEOUT)
    np.testing.assert_array_equal(to_array(reply.images), augment_batch(x, SPEC, seed=SLOW_SEED, epoch=0,
                                                                        sample_ids=ids))


def test_sigkill_mid_stream(fragile: Served) -> None:
    pool = fragile.server.pool
    (old_pid,) = pool.pids()
    assert old_pid is not None
    restarts = pool.stats()["restarts"]
    plan = epoch_batches(NUM_DIGITS, 64, seed=SLOW_SEED, epoch=2)
    call = fragile.stub.StreamBatches(stream_request(seed=SLOW_SEED, epoch=2), timeout=TIMEOUT)
    first = next(call)  # about HOOK_S; by then batch 1 is on the worker
    assert first.batch_index == 0 and list(first.sample_ids) == plan[0].tolist()
    wait_until(lambda: running_jobs(fragile) >= 1, what="batch 1 to run")
    os.kill(old_pid, signal.SIGKILL)
    after: list[int] = []
    with pytest.raises(grpc.RpcError) as info:
        for b in call:  # bounded: the call has a deadline and the plan 29 batches
            after.append(b.batch_index)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert after == []  # batch 1 failed, and batches are delivered in index order
    # the call fails as soon as the worker is found dead; its replacement comes right after
    wait_until(lambda: pool.stats()["restarts"] == restarts + 1 and pool.stats()["alive"] == 1,
               what="the replacement worker")
    assert pool.pids() != [old_pid]
    assert_serving(fragile)
    # any server can produce batch k again, with the same bytes: re-ask for the failed one ...
    retry = stream_request(seed=SLOW_SEED, epoch=2, start=1, end=2)
    (again,) = fragile.stub.StreamBatches(retry, timeout=TIMEOUT)
    ids = plan[1]
    assert again.batch_index == 1 and list(again.sample_ids) == ids.tolist()
    pixels = dataset_pixels(fragile, "digits", ids)
    expected = augment_batch(pixels, SPEC, seed=SLOW_SEED, epoch=2, sample_ids=ids)
    np.testing.assert_array_equal(to_array(again.images), expected)
    # ... and the first one is unchanged too
    np.testing.assert_array_equal(to_array(first.images), augment_batch(
        dataset_pixels(fragile, "digits", plan[0]), SPEC, seed=SLOW_SEED, epoch=2, sample_ids=plan[0]))


def test_idle_worker_killed_is_replaced(fragile: Served) -> None:
    pool = fragile.server.pool
    wait_until(lambda: pool.stats()["inflight"] == 0, what="the pool to be idle")
    (old_pid,) = pool.pids()
    assert old_pid is not None
    restarts = pool.stats()["restarts"]
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: pool.stats()["restarts"] == restarts + 1 and pool.stats()["alive"] == 1,
               what="the replacement worker")
    assert pool.pids() != [old_pid]
    assert_serving(fragile)


def test_a_worker_that_cannot_start_again_fails_calls_and_health(tmp_path: Path) -> None:
    """The dataset's segment removed under the server (systemd-logind's RemoveIPC, an operator's
    clean-up), then the only worker killed: no replacement can attach. Calls are refused
    UNAVAILABLE at once and health turns NOT_SERVING (before: every call waited for its deadline,
    health said SERVING, and each failed start counted as a restart). The gauges are right from
    the first scrape."""
    with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as served:
        registry, pool = served.server.metrics.registry, served.server.pool
        assert registry.get_sample_value("augsvc_workers_alive") == 1  # before: 0 for the first second
        os.unlink(f"/dev/shm/{served.server.datasets['digits'].handle().segment}")
        (pid,) = pool.pids()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: served.health() == "NOT_SERVING", what="health to say no worker can start")
        assert served.health("augsvc.v1.Augmenter") == "NOT_SERVING"
        for call in (lambda: served.stub.Augment(augment_request(batch(3)), timeout=TIMEOUT),
                     lambda: list(served.stub.StreamBatches(stream_request(), timeout=TIMEOUT))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no worker process of this server can start" in info.value.details()
        assert pool.stats()["restarts"] == 0 and registry.get_sample_value("augsvc_worker_restarts") == 0
        assert registry.get_sample_value("augsvc_workers_alive") == 0


# -- metrics ----------------------------------------------------------------------------------------

def test_metrics_endpoint(main: Served) -> None:
    assert main.server.metrics_port
    main.stub.Augment(augment_request(batch(3)), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        main.stub.Augment(augment_request(batch(3), backend="torch"), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        list(main.stub.StreamBatches(stream_request(dataset="nope"), timeout=TIMEOUT))
    text = metrics_text(main.server.metrics_port)
    assert (sample_value(text, "augsvc_images_total", {"method": "Augment"}) or 0) >= 3
    assert (sample_value(text, "augsvc_batches_total", {"method": "Augment"}) or 0) >= 1
    assert (sample_value(text, "augsvc_errors_total", {"method": "Augment", "code": "INVALID_ARGUMENT"})
            or 0) >= 1
    assert (sample_value(text, "augsvc_errors_total", {"method": "StreamBatches", "code": "NOT_FOUND"})
            or 0) >= 1
    assert sample_value(text, "augsvc_inflight_calls") == 0
    wait_until(lambda: sample_value(metrics_text(main.server.metrics_port), "augsvc_workers_alive") == 2,
               what="the pool gauge")


# -- unix sockets and stop() ------------------------------------------------------------------------

def test_unix_socket_and_stop_releases_workers_and_memory(tmp_path: Path) -> None:
    before = set(segments_of(os.getpid()))
    address = f"unix:{tmp_path}/augsvc.sock"
    with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"}), address) as served:
        assert_serving(served)
        pids = served.server.pool.pids()
        assert len(set(segments_of(os.getpid())) - before) == 3  # the dataset, one input and one output slot
    assert set(segments_of(os.getpid())) == before
    wait_until(lambda: not any(pid and alive(pid) for pid in pids), what="workers to exit")


def test_unix_socket_port_is_reported_as_0(tmp_path: Path) -> None:
    server, port = create_server(f"unix:{tmp_path}/augsvc.sock", ServerSettings(workers=1))
    server.stop(0)
    assert port == 0


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed here")
def test_workers_do_not_load_torch(main: Served) -> None:
    """DESIGN: the service side never imports torch; each worker would pay its import time and memory."""
    loaded = [pid for pid in main.server.pool.pids() if "libtorch" in Path(f"/proc/{pid}/maps").read_text()]
    assert loaded == [], f"workers {loaded} have torch loaded"


def test_stop_closes_the_metrics_endpoint() -> None:
    with serve(ServerSettings(workers=1, metrics_port=0)) as served:
        port = served.server.metrics_port
        assert port and "augsvc_inflight_calls" in metrics_text(port)
    with pytest.raises(OSError):
        metrics_text(port)


# -- the CLI ----------------------------------------------------------------------------------------

def test_cli_serve_health_and_sigterm(tmp_path: Path) -> None:
    grace = round(margin(CLI_GRACE_S), 1)
    cli = CliServer(["--port", "0", "--workers", "1", "--dataset", "digits=builtin:digits", "--grace", str(grace),
                     "--metrics-port", "0"], tmp_path / "serve.log",
                    env=subprocess_env(**{SLEEP_HOOK_ENV: f"{SLOW_SEED}:{HOOK_S}"}))
    try:
        assert (cli.host, cli.workers) == ("127.0.0.1", 1) and cli.port > 0 and cli.metrics_port
        pid = cli.proc.pid
        channel = grpc.insecure_channel(cli.target, options=CHANNEL_OPTIONS)
        stub = pb_grpc.AugmenterStub(channel)
        try:
            assert stub.GetServerInfo(pb.ServerInfoRequest(), timeout=TIMEOUT).pid == pid
            children = descendants(pid)
            assert len(children) >= 3, children  # the resource tracker, the forkserver and its worker
            assert len(segments_of(pid)) == 3
            health = run_health(cli.target)
            assert health.returncode == 0 and "SERVING" in health.stdout, health
            # SIGTERM drains: a call in flight still completes (it would be CANCELLED had the grace
            # run out first), then the process exits 0
            x = batch(2, seed=8)
            slow = stub.Augment.future(augment_request(x, seed=SLOW_SEED, sample_ids=[3, 4]), timeout=TIMEOUT)
            wait_until(lambda: sample_value(metrics_text(cli.metrics_port), "augsvc_inflight_calls") == 1,
                       what="the call to be in flight")
            os.kill(pid, signal.SIGTERM)
            sent = time.monotonic()
            np.testing.assert_array_equal(to_array(slow.result(timeout=TIMEOUT).images),
                                          augment_batch(x, SPEC, seed=SLOW_SEED, epoch=0, sample_ids=[3, 4]))
        finally:
            channel.close()
        assert cli.proc.wait(timeout=grace + TIMEOUT) == 0, cli.log()
        exited = time.monotonic() - sent
        # Ordering, not speed: it exits once drained, not when the grace runs out (a server that sat
        # out its grace would exit after it).
        assert exited < grace, f"exit {exited:.1f}s after SIGTERM with a {grace}s grace: not once drained"
        wait_until(lambda: not any(alive(p) for p in children), what="worker processes to exit")
        assert segments_of(pid) == set()
        assert "Traceback" not in cli.log() and "resource_tracker" not in cli.log(), cli.log()
    finally:
        cli.close()


def test_cli_health_against_a_closed_port() -> None:
    with refused_port() as port:
        result = run_health(f"127.0.0.1:{port}", "--timeout", str(TIMEOUT))  # refused at once; a bound only
    assert result.returncode == 1, result
    assert "UNAVAILABLE" in result.stdout


def test_plan_cache_is_bounded_and_reuses_plans() -> None:
    from augsvc.plan import PlanCache

    cache = PlanCache(max_bytes=1 << 20, max_entry_bytes=256 << 10, max_entries=3)
    made: list[int] = []

    def make(n: int) -> Any:
        made.append(n)
        return np.arange(n, dtype=np.int64)

    first = cache.get(("d", b"", 0, 0, True), lambda: make(10))
    assert cache.get(("d", b"", 0, 0, True), lambda: make(10)) is first and made == [10]
    assert not first.flags.writeable  # shared by calls: nobody may write into it
    for epoch in range(1, 5):  # four more epochs: only the last three stay
        cache.get(("d", b"", 0, epoch, True), lambda: make(10))
    cache.get(("d", b"", 0, 0, True), lambda: make(10))
    assert made == [10] * 6, "epoch 0 was evicted and made again"
    big = cache.get(("d", b"", 0, 9, True), lambda: make(100_000))  # 800 KB: over the entry cap
    assert cache.get(("d", b"", 0, 9, True), lambda: make(100_000)) is not big


def test_plan_cache_makes_a_missing_plan_once_for_concurrent_callers() -> None:
    import threading

    from augsvc.errors import InvalidInputError
    from augsvc.plan import PlanCache

    cache = PlanCache()
    started, release = threading.Event(), threading.Event()
    made: list[int] = []

    def make() -> Any:
        made.append(1)
        started.set()
        release.wait(TIMEOUT)
        return np.arange(5)

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(("d", b"", 1, 2, True), make)))
               for _ in range(4)]
    for t in threads:
        t.start()
    assert started.wait(TIMEOUT)
    release.set()
    for t in threads:
        t.join(TIMEOUT)
    assert made == [1] and len(results) == 4 and all(r is results[0] for r in results)

    def broken() -> Any:
        raise InvalidInputError("sample_ids: bad")

    for _ in range(2):  # an error reaches the caller and is not cached
        with pytest.raises(InvalidInputError):
            cache.get(("d", b"x", 1, 2, True), broken)


def test_a_clean_stop_replaces_no_worker(caplog: pytest.LogCaptureFixture) -> None:
    """close() terminates the workers; before, a feeder that saw one gone first logged "worker 0 is
    gone; starting a replacement" on most clean stops (log alerts fired on every rolling update)."""
    with caplog.at_level(logging.WARNING, logger="augsvc.pool"):
        for _ in range(5):  # the race showed on about half the stops
            with serve(ServerSettings(workers=2)) as served:
                served.stub.Augment(augment_request(batch(2)), timeout=TIMEOUT)
    assert "starting a replacement" not in caplog.text and "failed to start" not in caplog.text
