"""What the servicers do with a request before the work: parse it (malformed bytes become
MalformedRequest, answered INVALID_ARGUMENT instead of grpc's INTERNAL), keep a StreamBatches
population encoded, and remember recent epoch plans and validated specs — a trainer sends the same
spec and asks for the same epoch in many small calls."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidInputError
from .spec import Spec
from .v1 import augment_pb2 as pb
from .wire import TooManyFields, split_field

__all__ = ["MalformedRequest", "PlanCache", "StreamBatchesCall", "parse_stream_batches", "parser", "spec_of"]


class MalformedRequest:
    """Stands for request bytes that do not parse, so the servicer answers INVALID_ARGUMENT
    (grpc itself would answer INTERNAL when a deserializer raises)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidInputError:
        return InvalidInputError(f"request: the bytes are not a valid augsvc.v1.{self.type_name} message")


@dataclass(frozen=True)
class StreamBatchesCall:
    """A StreamBatchesRequest without its population, which stays encoded (`ids_field`: the
    sample_ids field's bytes) so that the many calls of one epoch find its plan in `_PlanCache`
    without decoding and permuting a large population again. `ids_field` None: the message
    keeps its ids (an unusual encoding, parsed by protobuf alone; its plan is not cached)."""

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


def parse_stream_batches(data: bytes) -> StreamBatchesCall | MalformedRequest:
    try:
        try:
            rest, ids = split_field(data, _SAMPLE_IDS_FIELD)
        except TooManyFields:
            return StreamBatchesCall(pb.StreamBatchesRequest.FromString(data), None)
        pb.StreamBatchesRequest.FromString(ids)  # a malformed population is refused up front
        return StreamBatchesCall(pb.StreamBatchesRequest.FromString(rest), ids)
    except Exception:  # noqa: BLE001 - DecodeError, ValueError from split_field
        return MalformedRequest("StreamBatchesRequest")


class PlanCache:
    """Recent epoch permutations, keyed by (dataset, encoded population, seed, epoch, shuffle).
    A trainer fetches an epoch in calls of a few batches each; without this, every call decoded
    the population and permuted it again (measured: ~3 ms per call for 50,000 ids)."""

    def __init__(self, max_bytes: int = 64 << 20, max_entry_bytes: int = 16 << 20, max_entries: int = 8) -> None:
        self._entries: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        # A few entries are enough: a trainer's calls all ask for its current epoch (all ranks
        # alike); more would only hold old epochs' permutations.
        self._max_bytes, self._max_entry, self._max_entries = max_bytes, max_entry_bytes, max_entries
        self._pending: dict[tuple[Any, ...], futures.Future[np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: tuple[Any, ...], order: np.ndarray) -> int:
        return int(order.nbytes) + len(key[1])

    def get(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        """The plan for `key`, made by `make()` once: concurrent callers of a missing key (every
        stream at an epoch's start) wait for the first one's result, or its error."""
        with self._lock:
            order = self._entries.get(key)
            if order is not None:
                self._entries.move_to_end(key)
                return order
            pending = self._pending.get(key)
            mine = pending is None
            if pending is None:
                pending = self._pending[key] = futures.Future()
        if not mine:
            return pending.result()
        try:
            order = make()
            order.setflags(write=False)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        size = self._size(key, order)
        with self._lock:
            del self._pending[key]
            if size <= self._max_entry:
                self._entries[key] = order
                self._bytes += size
                while self._bytes > self._max_bytes or len(self._entries) > self._max_entries:
                    old_key, old = self._entries.popitem(last=False)
                    self._bytes -= self._size(old_key, old)
        pending.set_result(order)
        return order


def parser(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError and friends
            return MalformedRequest(message_type.__name__)

    return parse


def spec_of(msg: pb.Pipeline) -> Spec:
    """The validated Spec of a request; a trainer sends the same spec with every call."""
    return _spec_of_bytes(msg.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=64)  # only valid specs are kept: a SpecError is raised, not cached
def _spec_of_bytes(data: bytes) -> Spec:
    return Spec.from_proto(pb.Pipeline.FromString(data))
