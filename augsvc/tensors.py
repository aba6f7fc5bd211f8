"""Raw uint8 NHWC tensors on the wire (DESIGN contract 3): encode, and decode with validation.

Decoding never trusts the message: dtype, rank, channel count, sizes and the byte count are
checked against each other and against the server's limits before any pixel is touched.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError
from .v1 import augment_pb2 as pb
from .validation import Limits


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    """An (N,H,W,C) uint8 array as a Tensor message (C-order bytes)."""
    array = np.ascontiguousarray(array)
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape), dtype=str(array.dtype))


def check_tensor_shape(msg: pb.Tensor, nbytes: int, *, field: str = "images", limits: Limits | None = None
                       ) -> tuple[int, int, int, int]:
    """The (N,H,W,C) a Tensor claims, checked against its `nbytes` of data and the `limits`."""
    if msg.dtype != "uint8":
        raise InvalidInputError(f"{field}.dtype: {msg.dtype!r} is not supported; expected 'uint8'")
    shape = tuple(int(s) for s in msg.shape)
    if len(shape) != 4:
        raise InvalidInputError(f"{field}.shape: {list(shape)} is not [N, H, W, C]")
    n, h, w, c = shape
    if c not in (1, 3):
        raise InvalidInputError(f"{field}.shape: channels {c} is not allowed; expected 1 or 3")
    if n < 0 or h < 1 or w < 1:
        raise InvalidInputError(f"{field}.shape: {list(shape)} has an empty or negative side; "
                                "expected N >= 0 and H, W >= 1")
    expected = n * h * w * c
    if limits is not None:
        limits.check_side(f"{field}.shape", h, w)
        limits.check_batch_bytes(field, expected)
    if nbytes != expected:
        raise InvalidInputError(f"{field}.data: {nbytes} bytes do not match shape {list(shape)} "
                                f"({expected} bytes expected)")
    return n, h, w, c


def decode_tensor(msg: pb.Tensor, *, field: str = "images", limits: Limits | None = None) -> np.ndarray:
    """A read-only (N,H,W,C) uint8 view of the message's bytes, after every check."""
    data = msg.data
    shape = check_tensor_shape(msg, len(data), field=field, limits=limits)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)
