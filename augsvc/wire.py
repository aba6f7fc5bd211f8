"""Serialized replies built with one copy of the pixels, and a client-side parser that takes no
copy at all.

`batch_bytes` / `augment_response_bytes` produce exactly the bytes that serializing a `Batch` /
`AugmentResponse` message would (fields in another order, which protobuf allows), but copy the
pixels once, straight from the worker's shared-memory slot, instead of four times (into a bytes
object, into the message, into the serialization). `parse_reply` reads such a message and returns
the small fields as a normal message and the pixels as a numpy view of the received buffer.
Any protobuf client can still read these replies: they are ordinary messages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .tensors import check_tensor_shape
from .v1 import augment_pb2 as pb

_TENSOR_DATA = 0x0A           # Tensor.data: field 1, length-delimited
_BATCH_IMAGES = 0x1A          # Batch.images: field 3
_RESPONSE_IMAGES = 0x0A       # AugmentResponse.images: field 1
_IMAGES_KEY = {pb.Batch: _BATCH_IMAGES, pb.AugmentResponse: _RESPONSE_IMAGES}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _with_images(meta: bytes, key: int, images: np.ndarray) -> bytes:
    images = np.ascontiguousarray(images)
    data = memoryview(images.reshape(-1)).cast("B")  # type: ignore[arg-type]  # 0-size arrays need the reshape
    tail = pb.Tensor(shape=list(images.shape), dtype="uint8").SerializeToString()
    head = bytes([_TENSOR_DATA]) + _varint(data.nbytes)
    size = len(head) + data.nbytes + len(tail)
    return b"".join((meta, bytes([key]), _varint(size), head, data, tail))


def batch_bytes(*, epoch: int, batch_index: int, images: np.ndarray, labels: Any, sample_ids: Any) -> bytes:
    meta = pb.Batch(epoch=epoch, batch_index=batch_index, labels=labels, sample_ids=sample_ids)
    return _with_images(meta.SerializeToString(), _BATCH_IMAGES, images)


def batch_shm_bytes(*, epoch: int, batch_index: int, shape: tuple[int, ...], labels: Any, sample_ids: Any,
                    segment: str) -> bytes:
    """A Batch whose pixels the worker wrote into the client's shared-memory `segment`."""
    message = pb.Batch(epoch=epoch, batch_index=batch_index, labels=labels, sample_ids=sample_ids,
                       images=pb.Tensor(shape=list(shape), dtype="uint8"), shm_segment=segment)
    data: bytes = message.SerializeToString()
    return data


def augment_response_bytes(*, images: np.ndarray, sample_ids: Any, tag: int) -> bytes:
    meta = pb.AugmentResponse(sample_ids=sample_ids, tag=tag)
    return _with_images(meta.SerializeToString(), _RESPONSE_IMAGES, images)


def serialize(message: Any) -> bytes:
    """Response serializer: pre-serialized bytes pass through, messages are serialized."""
    if isinstance(message, bytes):
        return message
    data: bytes = message.SerializeToString()
    return data


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Any:
    """(key, value_start, value_end, field_start) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            yield key, pos, pos, field_start
            continue
        if wire == 2:
            length, pos = _read_varint(buf, pos)
            value_start, pos = pos, pos + length
        elif wire == 1:
            value_start, pos = pos, pos + 8
        elif wire == 5:
            value_start, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of the message")
        yield key, value_start, pos, field_start


class TooManyFields(ValueError):
    """A message with more top-level fields than `split_field` looks through."""


def split_field(data: bytes, field: int, *, max_fields: int = 256) -> tuple[bytes, bytes]:
    """(the message without field `field`, every occurrence of that field, tags included); each
    part parses on its own as the same message type. Lets a server look at a big repeated field
    (StreamBatchesRequest.sample_ids) as bytes, and decode it only when it has not seen it.
    Raises TooManyFields past `max_fields` top-level fields (e.g. an unpacked repeated field),
    which protobuf's own parser handles far faster than this loop."""
    buf = memoryview(data)
    rest: list[memoryview] = []
    taken: list[memoryview] = []
    for count, (key, _start, end, field_start) in enumerate(_fields(buf, 0, len(buf))):
        if count >= max_fields:
            raise TooManyFields(f"more than {max_fields} top-level fields")
        (taken if key >> 3 == field else rest).append(buf[field_start:end])
    return b"".join(rest), b"".join(taken)


def parse_reply(data: bytes, message_type: Any = pb.Batch) -> tuple[Any, np.ndarray | None]:
    """(message without its images, images as a read-only (N,H,W,C) view of `data`); for a Batch
    whose pixels are in a client segment (`shm_segment`), (the whole message, None)."""
    buf = memoryview(data)
    images_key = _IMAGES_KEY[message_type]
    rest: list[memoryview] = []
    pixels: tuple[int, int] | None = None
    tensor = pb.Tensor()
    for key, start, end, field_start in _fields(buf, 0, len(buf)):
        if key != images_key:
            rest.append(buf[field_start:end])
            continue
        parts: list[memoryview] = []
        for tkey, tstart, tend, tfield in _fields(buf, start, end):
            if tkey == _TENSOR_DATA:
                pixels = (tstart, tend - tstart)
            else:
                parts.append(buf[tfield:tend])
        tensor = pb.Tensor.FromString(b"".join(parts))
    message = message_type.FromString(b"".join(rest))
    segment: str = getattr(message, "shm_segment", "")
    if pixels is None and segment:
        message.images.CopyFrom(tensor)
        return message, None
    offset, length = pixels if pixels is not None else (0, 0)
    shape = check_tensor_shape(tensor, length)
    return message, np.frombuffer(data, np.uint8, count=length, offset=offset).reshape(shape)
