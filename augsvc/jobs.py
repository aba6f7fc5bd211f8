"""Requests parsed once into validated jobs: what the worker pool queues and a worker runs.

Two kinds of job travel from the servicer through the pool and the worker pipe:

- `DatasetBatch` — samples of a served dataset, which the worker reads from shared memory;
- `ClientPixels` — images the caller sent (raw NHWC pixels or encoded PNG/JPEG), which reach
  the worker through its input slot.

The builders here are where a request is checked — spec, backend, counters, sample ids, image
shapes and bytes against the server's `Limits`, the dataset name — each once; the pool and the
workers trust a job. A StreamBatches request becomes a `BatchRange`: the checked range of batch
indices of an epoch plan (cached in `plan.PlanCache`), which makes one `DatasetBatch` per batch.

Request bytes that do not parse become `MalformedRequest` (answered INVALID_ARGUMENT; grpc itself
would answer INTERNAL when a deserializer raises), and StreamBatches populations stay encoded
(`StreamBatchesCall`) so that the many calls of one epoch find its plan without decoding it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from .datasets import Dataset
from .engine import BACKENDS
from .errors import InvalidInputError, NotFoundError, SpecError
from .plan import PlanCache, epoch_permutation, num_batches
from .shm import CLIENT_SEGMENT_FORM, CLIENT_TOKEN_BYTES, is_client_segment
from .spec import Spec, load_spec
from .tensors import decode_tensor
from .v1 import augment_pb2 as pb
from .validation import Limits, check_batch_array, check_counter, dataset_indices, sample_keys, strengths
from .wire import TooManyFields, split_field

__all__ = ["Augmentation", "BatchRange", "ClientPixels", "ClientSegment", "DatasetBatch", "Job", "MalformedRequest",
           "StreamBatchesCall", "augment_request", "batch_range", "client_pixels", "client_segments",
           "dataset_batch", "find_dataset", "parse_stream_batches", "parser", "refuse_malformed", "spec_of"]

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augmentation:
    """How a job's images are augmented: a validated spec (its canonical wire bytes, which a worker
    turns back into a Spec once and caches), the counters of the random draws, the backend."""

    spec: bytes
    seed: int
    epoch: int
    backend: str

    @classmethod
    def of(cls, spec: Any, *, seed: Any, epoch: Any, backend: str = "fused") -> Augmentation:
        """Validate every part; `spec` is a Spec, a Pipeline message, its wire bytes, or anything
        `load_spec` takes."""
        if isinstance(spec, (bytes, bytearray)):
            spec = _spec_of_bytes(bytes(spec))
        name = backend or "fused"
        if name not in BACKENDS:
            raise InvalidInputError(f"backend: {name!r} is not allowed; allowed: {', '.join(BACKENDS)}")
        return cls(load_spec(spec).to_bytes(), check_counter(seed, "seed"), check_counter(epoch, "epoch"), name)

    @property
    def validated_spec(self) -> Spec:
        return _spec_of_bytes(self.spec)


@dataclass(frozen=True)
class ClientSegment:
    """A client's shared-memory segment offered for one batch's pixels (`augsvc.shm`)."""

    name: str
    token: bytes


@dataclass(frozen=True)
class DatasetBatch:
    """Samples `sample_ids` (checked indices) of the served dataset `dataset`. With `out_segment`,
    the worker writes the pixels there when it can (the shared-memory reply path)."""

    augmentation: Augmentation
    dataset: str
    sample_ids: np.ndarray
    channels: int
    out_segment: ClientSegment | None = None
    strength: np.ndarray | None = None     # per sample, on top of the spec's (class strengths)


@dataclass(frozen=True)
class ClientPixels:
    """Images the caller sent, in the worker's input slot: raw (N, H, W, C) uint8 pixels of
    `shape`, or `encoded_lengths` PNG/JPEG blobs back to back (decoded in the worker)."""

    augmentation: Augmentation
    sample_ids: np.ndarray
    shape: tuple[int, int, int, int] | None = None
    encoded_lengths: tuple[int, ...] = ()


Job = DatasetBatch | ClientPixels
#: What a ClientPixels job hands the worker through its input slot.
Payload = np.ndarray | Sequence[bytes]


def find_dataset(datasets: Mapping[str, Dataset], name: str) -> Dataset:
    """The served dataset `name`; NotFoundError naming the ones served."""
    ds = datasets.get(name)
    if ds is None:
        served = ", ".join(sorted(datasets)) or "none"
        raise NotFoundError(f"dataset: {name!r} is not served here; available: {served}")
    return ds


def dataset_batch(datasets: Mapping[str, Dataset], name: str, sample_ids: Any, augmentation: Augmentation,
                  limits: Limits, out_segment: ClientSegment | None = None) -> DatasetBatch:
    """A job for samples of a served dataset."""
    ds = find_dataset(datasets, name)
    ids = dataset_indices(sample_ids, ds.num_samples)
    if ds.image_shape is not None:  # sizes known before any pixel: refuse here, not in a worker
        limits.check_work_bytes("sample_ids", len(ids) * math.prod(ds.image_shape), "the batch's images once read are ")
        size = augmentation.validated_spec.output_size_for(ds.image_shape[:2])
        if size is not None:
            limits.check_batch_bytes("sample_ids", len(ids) * size[0] * size[1] * ds.channels,
                                     "the augmented batch would be ")
    if out_segment is not None and not is_client_segment(out_segment.name):
        raise InvalidInputError(f"out_segment: {out_segment.name!r} is not a client segment name")
    return DatasetBatch(augmentation, ds.name, ids, ds.channels, out_segment)


def client_pixels(images: Payload, augmentation: Augmentation, sample_ids: Any, limits: Limits
                  ) -> tuple[ClientPixels, Payload]:
    """A job for an (N, H, W, C) uint8 array or N encoded PNG/JPEG images, and its payload."""
    if isinstance(images, np.ndarray):
        array = check_batch_array(images)
        limits.check_side("images", *array.shape[1:3])
        limits.check_batch_bytes("images", array.nbytes)
        return _raw_pixels(array, augmentation, sample_ids), array
    blobs = list(images)
    if not all(isinstance(b, (bytes, bytearray, memoryview)) for b in blobs):
        raise InvalidInputError("encoded_images: expected bytes (PNG/JPEG) per image")
    limits.check_batch_bytes("encoded_images", sum(len(b) for b in blobs))
    ids = sample_keys(sample_ids, count=len(blobs))
    return ClientPixels(augmentation, ids, encoded_lengths=tuple(len(b) for b in blobs)), blobs


def _raw_pixels(array: np.ndarray, augmentation: Augmentation, sample_ids: Any) -> ClientPixels:
    n, h, w, c = (int(s) for s in array.shape)
    return ClientPixels(augmentation, sample_keys(sample_ids, count=n), shape=(n, h, w, c))


def augment_request(message: pb.AugmentRequest | MalformedRequest, limits: Limits
                    ) -> tuple[ClientPixels, Payload]:
    """The job of an Augment / AugmentStream request, and its payload."""
    request: pb.AugmentRequest = refuse_malformed(message)
    augmentation = Augmentation.of(spec_of(request.spec), seed=request.seed, epoch=request.epoch,
                                   backend=request.backend)
    if request.encoded_images:
        if request.HasField("images") and request.images.data:
            raise InvalidInputError("images: send either images or encoded_images, not both")
        return client_pixels(list(request.encoded_images), augmentation, request.sample_ids, limits)
    # The tensor's checks (dtype, shape, side, bytes) run before any pixel is touched.
    images = decode_tensor(request.images, limits=limits)
    return _raw_pixels(images, augmentation, request.sample_ids), images


# ---------------------------------------------------------------------------------------------
# StreamBatches
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamBatchesCall:
    """A StreamBatchesRequest without its population, which stays encoded (`ids_field`: the
    sample_ids field's bytes) so that the many calls of one epoch find its plan in the
    `PlanCache` without decoding and permuting a large population again. `ids_field` None: the
    message keeps its ids (an unusual encoding, parsed by protobuf alone; its plan is not cached)."""

    message: pb.StreamBatchesRequest
    ids_field: bytes | None

    @classmethod
    def of(cls, request: pb.StreamBatchesRequest) -> StreamBatchesCall:
        rest, ids = split_field(request.SerializeToString(), _SAMPLE_IDS_FIELD)
        return cls(pb.StreamBatchesRequest.FromString(rest), ids)

    def sample_ids(self) -> Any:
        if self.ids_field is None:
            return self.message.sample_ids
        return pb.StreamBatchesRequest.FromString(self.ids_field).sample_ids


_SAMPLE_IDS_FIELD = pb.StreamBatchesRequest.DESCRIPTOR.fields_by_name["sample_ids"].number


@dataclass(frozen=True)
class BatchRange:
    """The batches one StreamBatches call asks for, checked: batch k of the epoch is
    `order[k * batch_size:(k + 1) * batch_size]` (a view: a population of millions of ids costs
    one array, not one per batch)."""

    dataset: Dataset
    augmentation: Augmentation
    order: np.ndarray
    batch_size: int
    indices: range
    class_strength: np.ndarray | None = None

    def sample_ids(self, k: int) -> np.ndarray:
        return self.order[k * self.batch_size:(k + 1) * self.batch_size]

    def job(self, k: int, out_segment: ClientSegment | None = None) -> DatasetBatch:
        """Batch k's job: its ids are a slice of the checked plan, so nothing is checked again."""
        ids = self.sample_ids(k)
        strength = None if self.class_strength is None else self.class_strength[self.dataset.labels[ids]]
        return DatasetBatch(self.augmentation, self.dataset.name, ids, self.dataset.channels, out_segment, strength)


def batch_range(call: StreamBatchesCall | pb.StreamBatchesRequest | MalformedRequest,
                datasets: Mapping[str, Dataset], limits: Limits, plans: PlanCache) -> BatchRange:
    """Check a StreamBatches request and find (or make) its epoch plan."""
    checked = refuse_malformed(call)
    if isinstance(checked, pb.StreamBatchesRequest):  # called directly, not through gRPC
        checked = StreamBatchesCall.of(checked)
    parsed: StreamBatchesCall = checked
    request = parsed.message
    ds = find_dataset(datasets, request.dataset)
    augmentation = Augmentation.of(spec_of(request.spec), seed=request.seed, epoch=request.epoch,
                                   backend=request.backend)
    spec = augmentation.validated_spec
    if ds.image_shape is None and spec.output_size is None:
        raise InvalidInputError(f"spec: dataset {ds.name!r} has images of different sizes; add a resize, "
                                "center_crop or random_resized_crop step so that every batch has one shape")
    if request.batch_size < 1:
        raise InvalidInputError("batch_size: 0 is not allowed; expected an integer >= 1")
    size = spec.output_size_for(ds.image_shape[:2] if ds.image_shape else None)
    if size is not None:
        limits.check_batch_bytes("batch_size", request.batch_size * size[0] * size[1] * ds.channels,
                                 f"{request.batch_size} images of {size[0]}x{size[1]}x{ds.channels} are ")
    shuffle = request.shuffle if request.HasField("shuffle") else True
    class_strength = None
    if request.class_strength:
        classes = len(ds.class_names)
        if len(request.class_strength) != classes:
            raise InvalidInputError(f"class_strength: {len(request.class_strength)} values for the {classes} classes "
                                    f"of dataset {ds.name!r}; expected one per class, or none")
        class_strength = strengths(request.class_strength, "class_strength")

    def plan() -> np.ndarray:
        ids = parsed.sample_ids()
        # np.fromiter: no list of Python ints on the way (a population of millions would cost GBs)
        population = dataset_indices(np.fromiter(ids, np.uint64, count=len(ids)), ds.num_samples) if ids \
            else ds.num_samples
        return epoch_permutation(population, seed=request.seed, epoch=request.epoch, shuffle=shuffle)

    order = (plan() if parsed.ids_field is None else
             plans.get((ds.name, parsed.ids_field, request.seed, request.epoch, shuffle), plan))
    count = num_batches(order.size, request.batch_size, drop_last=request.drop_last)
    end = request.end if request.HasField("end") else count
    if not request.start <= end <= count:
        raise InvalidInputError(f"start/end: batch range [{request.start}, {end}) is outside the epoch's "
                                f"batches [0, {count})")
    return BatchRange(ds, augmentation, order, request.batch_size, range(request.start, end, request.stride or 1),
                      class_strength)


def client_segments(request: pb.StreamBatchesRequest, count: int) -> list[ClientSegment]:
    """The request's shm_segments, checked: one per batch of the call, or none."""
    segments = [ClientSegment(s.name, s.token) for s in request.shm_segments]
    if not segments:
        return []
    if len(segments) != count:
        raise InvalidInputError(f"shm_segments: {len(segments)} segments for the {count} batches of this "
                                "call; expected one per batch, or none")
    for j, seg in enumerate(segments):
        if not is_client_segment(seg.name):
            raise InvalidInputError(f"shm_segments[{j}].name: {seg.name[:80]!r} is not a client segment name; "
                                    f"expected {CLIENT_SEGMENT_FORM}")
        if len(seg.token) != CLIENT_TOKEN_BYTES:
            raise InvalidInputError(f"shm_segments[{j}].token: {len(seg.token)} bytes; expected "
                                    f"{CLIENT_TOKEN_BYTES}")
    if len({seg.name for seg in segments}) != len(segments):
        raise InvalidInputError("shm_segments: a name appears twice; expected one segment per batch")
    return segments


# ---------------------------------------------------------------------------------------------
# request bytes and specs
# ---------------------------------------------------------------------------------------------

class MalformedRequest:
    """Stands for request bytes that do not parse, so the servicer answers INVALID_ARGUMENT
    (grpc itself would answer INTERNAL when a deserializer raises)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidInputError:
        return InvalidInputError(f"request: the bytes are not a valid augsvc.v1.{self.type_name} message")


def refuse_malformed(request: T | MalformedRequest) -> T:
    """The request itself; INVALID_ARGUMENT for bytes that did not parse."""
    if isinstance(request, MalformedRequest):
        raise request.error()
    return request


def parser(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that turns bytes that do not parse into `MalformedRequest`."""
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError and friends
            return MalformedRequest(message_type.__name__)

    return parse


def parse_stream_batches(data: bytes) -> StreamBatchesCall | MalformedRequest:
    """StreamBatchesRequest deserializer that keeps the population encoded."""
    try:
        try:
            rest, ids = split_field(data, _SAMPLE_IDS_FIELD)
        except TooManyFields:
            return StreamBatchesCall(pb.StreamBatchesRequest.FromString(data), None)
        pb.StreamBatchesRequest.FromString(ids)  # a malformed population is refused up front
        return StreamBatchesCall(pb.StreamBatchesRequest.FromString(rest), ids)
    except Exception:  # noqa: BLE001 - DecodeError, ValueError from split_field
        return MalformedRequest("StreamBatchesRequest")


def spec_of(msg: pb.Pipeline) -> Spec:
    """The validated Spec of a request; a trainer sends the same spec with every call."""
    return _spec_of_bytes(msg.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=64)  # only valid specs are kept: a SpecError is raised, not cached
def _spec_of_bytes(data: bytes) -> Spec:
    try:
        message = pb.Pipeline.FromString(data)
    except DecodeError:
        raise SpecError("spec: not a valid augsvc.v1.Pipeline message") from None
    return Spec.from_proto(message)
