"""Input checks that several layers need, each written once: sample ids, image batches, and a
server's limits on image sides and batch bytes.

Sample ids play two roles. Where a dataset is involved they are indices, refused outside
[0, N) (`dataset_indices`). Otherwise they are only keys of the random draws (`sample_keys`):
any 64-bit value, and a negative Python int wraps modulo 2**64, as it would on the uint64 wire
field. Populations of an epoch plan are either (`population_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidInputError, LimitExceededError

__all__ = ["DEFAULT_MAX_BATCH_BYTES", "DEFAULT_MAX_SIDE", "Limits", "check_batch_array", "check_counter",
           "check_image", "dataset_indices", "population_ids", "sample_keys", "sample_strength",
           "strengths"]

#: Largest image side accepted by default (input and output); servers may set their own.
DEFAULT_MAX_SIDE = 4096
#: Largest batch (input or output pixels) a server takes by default.
DEFAULT_MAX_BATCH_BYTES = 64 << 20


def _integer_ids(ids: Any, field: str) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1:
        raise InvalidInputError(f"{field}: expected a 1-D sequence of integers, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{field}: expected integers, got dtype {array.dtype}")
    return array


def _check_count(ids: np.ndarray, count: int | None, field: str) -> None:
    if count is not None and ids.size != count:
        raise InvalidInputError(f"{field}: {ids.size} ids for {count} images; expected one per image")


def sample_keys(sample_ids: Any, count: int | None = None, field: str = "sample_ids") -> np.ndarray:
    """Sample ids as keys of the random draws: a 1-D uint64 array (negative ids wrap)."""
    ids = _integer_ids(sample_ids, field)
    _check_count(ids, count, field)
    return ids.astype(np.uint64)


def dataset_indices(sample_ids: Any, num_samples: int, count: int | None = None,
                    field: str = "sample_ids") -> np.ndarray:
    """Sample ids as indices into a dataset of `num_samples`: a 1-D int64 array, each in range."""
    ids = _integer_ids(sample_ids, field)
    _check_count(ids, count, field)
    if ids.size:
        bad = (ids < 0) | (ids >= num_samples)
        if bad.any():
            raise InvalidInputError(
                f"{field}: {ids[bad][0]} is outside [0, {num_samples - 1}] (the dataset has {num_samples})")
    return ids.astype(np.int64, copy=False)


def strengths(values: Any, field: str, count: int | None = None) -> np.ndarray:
    """Magnitude multipliers: a float64 array of finite values in [0, 1] (`count` of them)."""
    array = np.asarray(values, np.float64).reshape(-1)
    if count is not None and array.size != count:
        raise InvalidInputError(f"{field}: {array.size} values; expected {count}")
    bad = ~(np.isfinite(array) & (array >= 0.0) & (array <= 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(f"{field}[{i}]: {float(array[i])!r} is outside [0, 1]")
    return array


def sample_strength(strength: Any, count: int) -> np.ndarray:
    """Per-sample strength: one value for every sample, or one per sample."""
    array = np.asarray(strength, np.float64)
    return strengths(np.broadcast_to(array, (count,)) if array.ndim == 0 else array, "strength", count)


def population_ids(population: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """An epoch plan's population as int64 ids: a count N means 0..N-1."""
    if isinstance(population, (int, np.integer)):
        if population < 0:
            raise InvalidInputError(f"population: {population} is negative; expected a count >= 0")
        return np.arange(int(population), dtype=np.int64)
    return _integer_ids(population, "population").astype(np.int64, copy=False)


def _check_pixels(images: Any, field: str, layout: str) -> np.ndarray:
    ndim = len(layout.split(", "))
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != ndim \
            or images.shape[-1] not in (1, 3):
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        kind = "batch" if ndim == 4 else "image"
        raise InvalidInputError(f"{field}: {what} is not a uint8 ({layout}) {kind} with C in {{1, 3}}")
    count = images.shape[0] if ndim == 4 else 1
    if count and (images.shape[-3] < 1 or images.shape[-2] < 1):
        raise InvalidInputError(f"{field}: shape {tuple(images.shape)} has an empty side; expected H, W >= 1")
    return images


def check_batch_array(images: Any, field: str = "images") -> np.ndarray:
    """`images` as a uint8 (N, H, W, C) array with C in {1, 3} and no empty side (when N > 0)."""
    return _check_pixels(images, field, "N, H, W, C")


def check_image(image: Any, field: str) -> np.ndarray:
    """`image` as a uint8 (H, W, C) array with C in {1, 3} and no empty side."""
    return _check_pixels(image, field, "H, W, C")


def check_counter(value: Any, name: str) -> int:
    """A seed or epoch: an integer in [0, 2**64) (a uint64 on the wire)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name}: expected an integer in [0, 2**64), got {value!r}")
    if not 0 <= int(value) < 2**64:
        raise InvalidInputError(f"{name}: {value} is outside [0, 2**64)")
    return int(value)


@dataclass(frozen=True)
class Limits:
    """A server's limits on one batch; each is checked by one method here."""

    max_image_side: int = DEFAULT_MAX_SIDE
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES

    #: Each set of pixels a worker makes for one batch before its output (the images it reads, each
    #: step's output before the last) may take this many times `max_batch_bytes`: a crop of large
    #: photos reads far more than it returns. A worker may hold a few such sets at once (the images
    #: it read, a step's input and output).
    WORK_FACTOR = 16

    @property
    def max_work_bytes(self) -> int:
        return self.WORK_FACTOR * self.max_batch_bytes

    def __post_init__(self) -> None:
        for name in ("max_image_side", "max_batch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; expected >= 1")

    def check_side(self, field: str, height: int, width: int, *, what: str = "side") -> None:
        """LimitExceededError when an image (or output) side is over `max_image_side`."""
        side = max(height, width)
        if side > self.max_image_side:
            raise LimitExceededError(f"{field}: {what} {side} is over the limit of {self.max_image_side} pixels")

    def check_header_side(self, field: str, width: int, height: int) -> None:
        """`check_side` for an encoded image's header, quoting the size it claims."""
        if max(width, height) > self.max_image_side:
            raise LimitExceededError(f"{field}: {width}x{height} exceeds the maximum image side "
                                     f"{self.max_image_side}")

    def check_batch_bytes(self, field: str, nbytes: int, described: str = "") -> None:
        """LimitExceededError when a batch of `nbytes` is over `max_batch_bytes`; `described`
        says what the bytes are, e.g. '300 images of 40x40x3 are '."""
        _check_bytes(field, nbytes, described, self.max_batch_bytes, "the batch limit", "max_batch_bytes",
                     "ask for fewer or smaller images")

    def check_work_bytes(self, field: str, nbytes: int, described: str = "") -> None:
        """LimitExceededError when one set of a batch's pixels in a worker (the images it reads, or a
        step's output before the last) would take more than `max_work_bytes`."""
        _check_bytes(field, nbytes, described, self.max_work_bytes, "a worker's limit",
                     f"{self.WORK_FACTOR} x max_batch_bytes", "ask for fewer images or raise max_batch_bytes")


def _check_bytes(field: str, nbytes: int, described: str, limit: int, what: str, setting: str, hint: str) -> None:
    """LimitExceededError "<field>: <described><nbytes> bytes, over <what> of <limit> bytes
    (<setting>); <hint>" when `nbytes` is over `limit`."""
    if nbytes > limit:
        tail = "," if described else " is"
        raise LimitExceededError(f"{field}: {described}{nbytes} bytes{tail} over {what} of {limit} bytes "
                                 f"({setting}); {hint}")
