"""Apply a spec to a batch: `augment_batch(images, spec, *, seed, epoch, sample_ids, backend)`.

Two backends apply the same vectorized draws (`transforms.draw_steps`): "fused" (default: one
warp per image for consecutive geometric steps, batch-wide color math) and "albumentations" (the
reference: every step in order with albumentations' own functions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..spec import Spec, load_spec
from ..transforms import Draw, draw_steps
from ..validation import (
    DEFAULT_MAX_SIDE,
    Limits,
    check_batch_array,
    check_counter,
    check_image,
    sample_keys,
    sample_strength,
)
from .fused import read_boxes, run_fused
from .images import Images
from .reference import run_reference

__all__ = ["augment_batch", "check_images", "source_boxes", "BACKENDS", "DEFAULT_MAX_SIDE", "ReadImage"]

#: read(i, box): fill image i — only the rectangle box = (x0, y0, x1, y1), or all of it when box is
#: None — before anything reads its pixels (`augment_batch(read=)`, `DatasetReader.gather_deferred`).
ReadImage = Callable[[int, "tuple[int, int, int, int] | None"], None]

BACKENDS: dict[str, Callable[[Images, list[Draw[Any]], Spec, np.ndarray | None], Images]] = {
    "fused": run_fused,
    "albumentations": run_reference,
}


def check_images(images: np.ndarray | Sequence[np.ndarray], *, max_side: int = DEFAULT_MAX_SIDE
                 ) -> tuple[Images, np.ndarray, np.ndarray, int]:
    """Validate a batch: (N,H,W,C) uint8 array, or a sequence of (H,W,C) uint8 arrays of one C.

    Returns (work, heights, widths, channels)."""
    limits = Limits(max_image_side=max_side)
    if isinstance(images, np.ndarray):
        n, h, w, c = check_batch_array(images).shape
        limits.check_side("images", h, w)
        return np.ascontiguousarray(images), np.full(n, h, np.int64), np.full(n, w, np.int64), c
    work = [check_image(img, f"images[{i}]") for i, img in enumerate(images)]
    for i, img in enumerate(work):
        limits.check_side(f"images[{i}]", *img.shape[:2])
    channels = {img.shape[2] for img in work}
    if len(channels) > 1:
        raise InvalidInputError(f"images: mixed channel counts {sorted(channels)}; expected one of 1 or 3")
    c = channels.pop() if channels else 3
    heights = np.array([img.shape[0] for img in work], np.int64)
    widths = np.array([img.shape[1] for img in work], np.int64)
    if work and (heights == heights[0]).all() and (widths == widths[0]).all():
        return np.stack(work), heights, widths, c
    return work, heights, widths, c


def augment_batch(images: np.ndarray | Sequence[np.ndarray], spec: Any, *, seed: int, epoch: int,
                  sample_ids: Any, backend: str = "fused", max_side: int = DEFAULT_MAX_SIDE,
                  out: np.ndarray | None = None, strength: Any = None, max_bytes: int | None = None,
                  read: ReadImage | None = None) -> np.ndarray:
    """Augment a batch; returns a new uint8 array (N, H', W', C), or `out` when given.

    max_side, max_bytes: refuse (LimitExceededError) input or output images with a longer side,
    an output batch of more bytes, or a step before the last whose images would take more than
    `Limits.WORK_FACTOR` times that, before any pixel is computed.

    out: a C-contiguous uint8 array of exactly the output shape to write into (e.g. a worker's
    shared-memory slot or a reused buffer): saves the allocation, its page faults and a copy.

    images: uint8 (N, H, W, C) with C in {1, 3}, or a sequence of (H, W, C) images of varying
    size when the spec ends in a sizing step (resize / random_resized_crop).
    strength: per-sample magnitude multipliers in [0, 1] (e.g. each sample's class strength), on
    top of the spec's own `strength`; None is 1 for every sample.

    read: images whose pixels are not there yet (`DatasetReader.gather_deferred`): read(i, box)
    fills images[i] — at least its rectangle `box` = (x0, y0, x1, y1), the only pixels the engine
    will read (`source_boxes`), or all of it when box is None — and is called once per image
    before anything reads its pixels: by the fused backend just before it warps that image, so a
    worker's freshly decoded image is warped while it is still in the cache; otherwise for every
    image, whole, before the work starts.

    The pixels of sample i depend only on (spec, its input pixels, seed, epoch, sample_ids[i],
    strength[i], backend) — not on the batch, its position in it, or anything else.
    """
    spec = load_spec(spec)
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend: {backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    seed = check_counter(seed, "seed")
    epoch = check_counter(epoch, "epoch")
    limits = Limits(max_image_side=max_side, max_batch_bytes=max_bytes or 2**62)
    if spec.output_size is not None:
        limits.check_side("spec", *spec.output_size, what="output side")
    if read is not None and (len({im.shape for im in images}) == 1 if not isinstance(images, np.ndarray)
                             else not images.flags.c_contiguous):
        for i in range(len(images)):  # stacked or made contiguous below: that reads every pixel
            read(i, None)
        read = None
    work, heights, widths, channels = check_images(images, max_side=max_side)
    ids = sample_keys(sample_ids, count=len(work))
    if len(work) == 0 and not isinstance(work, np.ndarray):
        raise InvalidInputError("images: an empty list has no shape; pass an empty (0, H, W, C) array")
    per_sample = None if strength is None else sample_strength(strength, len(work))
    if len(work) == 0 and isinstance(work, np.ndarray):  # an empty batch's shape: its size through the steps
        ids, heights, widths = np.zeros(1, np.uint64), np.array([work.shape[1]]), np.array([work.shape[2]])
        per_sample = None
    draws = draw_steps(spec, seed=seed, epoch=epoch, sample_ids=ids, heights=heights, widths=widths,
                       strength=per_sample)
    for i, draw in enumerate(draws):  # sizes that depend on the input (a shorter-side resize) are known only now
        oh, ow = draw.out_size
        limits.check_side("spec", int(oh.max()), int(ow.max()), what="output side")
        if len(work):
            nbytes = int((oh * ow).sum()) * channels
            if i == len(draws) - 1:
                limits.check_batch_bytes("spec", nbytes, "the augmented batch would be ")
            else:
                limits.check_work_bytes(f"spec: step {i}", nbytes, "its images would be ")
    out_h, out_w = draws[-1].out_size if draws else (heights, widths)
    if len(work) == 0:
        return np.zeros((0, int(out_h[0]), int(out_w[0]), channels), np.uint8)
    fill = None
    if read is not None:
        boxes = read_boxes(draws, spec, heights, widths) if backend == "fused" else None
        if boxes is None:  # this spec or backend reads whole images before any warp
            for i in range(len(work)):
                read(i, None)
        else:
            def fill(i: int, read: ReadImage = read,
                     boxes: np.ndarray = boxes) -> None:
                read(i, (int(boxes[i, 0]), int(boxes[i, 1]), int(boxes[i, 2]), int(boxes[i, 3])))
    if (out_h != out_h[0]).any() or (out_w != out_w[0]).any():
        raise InvalidInputError("images: the spec leaves images of different sizes in one batch; add a resize, "
                                "center_crop or random_resized_crop step so that a batch has one shape")
    if out is not None:
        want = (len(work), int(out_h[0]), int(out_w[0]), channels)
        if out.dtype != np.uint8 or out.shape != want or not out.flags.c_contiguous or not out.flags.writeable:
            raise InvalidInputError(f"out: expected a writable C-contiguous uint8 array of shape {want}, got "
                                    f"{out.dtype} {out.shape}")
    result = run_fused(work, draws, spec, out, fill) if fill is not None else BACKENDS[backend](work, draws, spec, out)
    if not isinstance(result, np.ndarray):  # pragma: no cover - guarded by the size check above
        raise InvalidInputError("images: the spec left images of different sizes in one batch")
    if out is not None:
        if result is not out:
            np.copyto(out, result)
        return out
    if result is images or (isinstance(images, np.ndarray) and np.shares_memory(result, images)):
        result = result.copy()
    return result


def source_boxes(spec: Any, *, seed: int, epoch: int, sample_ids: Any, heights: np.ndarray, widths: np.ndarray,
                 strength: Any = None, backend: str = "fused") -> np.ndarray | None:
    """The part of each input image that `augment_batch` with these arguments reads, before any
    pixel is there: (N, 4) int64 rows x0, y0, x1, y1 (a rectangle of the image of heights[i] x
    widths[i]), or None when it reads whole images (the reference backend; a spec that does not
    start with a geometric step). A worker decodes only these rectangles of its JPEGs; the
    output is the same bytes as from whole images (`engine.fused.read_boxes`)."""
    spec = load_spec(spec)
    if backend != "fused":
        return None
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    ids = sample_keys(sample_ids, count=len(heights))
    per_sample = None if strength is None else sample_strength(strength, len(heights))
    draws = draw_steps(spec, seed=check_counter(seed, "seed"), epoch=check_counter(epoch, "epoch"), sample_ids=ids,
                       heights=heights, widths=widths, strength=per_sample)
    return read_boxes(draws, spec, heights, widths)
