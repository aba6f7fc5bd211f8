"""`augsvc bench`: images/s per core of a spec, to size a deployment.

A worker process augments one batch at a time on one core, with the fused backend, into a reused
output buffer (its shared-memory slot). `measure_spec` does the same in this process for a few
seconds, so the figure is what each worker of `augsvc serve` can deliver for that spec and image
size: workers needed = the images/s the trainers consume / images/s per core.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import augment_batch
from .spec import load_spec

__all__ = ["BatchWork", "SpecRate", "measure_spec", "run_for", "sizing_images"]

#: The input side of the sample photos when neither --side nor --image says otherwise.
DEFAULT_SIDE = 224


class BatchWork:
    """One worker's unit of work: `images` augmented as one batch with `backend`, each call in a new
    epoch (so that nothing can be cached), into one output buffer reused from call to call;
    calling it returns the number of images done. Building it augments epoch 0, which allocates
    that buffer (`out`, in the spec's output shape)."""

    def __init__(self, images: np.ndarray, spec: Any, *, backend: str = "fused") -> None:
        self.images = images
        self.spec = load_spec(spec)
        self.backend = backend
        self.sample_ids = np.arange(len(images))
        self.epoch = 0
        self.out = augment_batch(images, self.spec, seed=0, epoch=0, sample_ids=self.sample_ids, backend=backend)

    def __call__(self) -> int:
        self.epoch += 1
        augment_batch(self.images, self.spec, seed=0, epoch=self.epoch, sample_ids=self.sample_ids,
                      backend=self.backend, out=self.out)
        return len(self.images)


def run_for(work: Callable[[], int], seconds: float) -> tuple[int, float]:
    """Call `work` until `seconds` have passed: (items it reported done, seconds it took)."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += work()
    return done, elapsed


@dataclass(frozen=True)
class SpecRate:
    """What `measure_spec` found: images/s on one core, for batches of `input_shape` (N, H, W, C)
    augmented into `output_shape`."""

    images_per_second: float
    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, int, int, int]


def measure_spec(spec: Any, images: np.ndarray, *, seconds: float = 5.0) -> SpecRate:
    """Images/s on one core of `spec` with the fused backend over batches of `images`, as a worker
    runs it (one OpenCV thread, a reused output buffer), after one warm-up batch."""
    import cv2

    cv2.setNumThreads(0)  # one core, as in a worker process
    work = BatchWork(images, spec)  # its first batch is the warm-up
    done, elapsed = run_for(work, seconds)
    n, h, w, c = images.shape
    on, oh, ow, oc = work.out.shape
    return SpecRate(done / elapsed, (n, h, w, c), (on, oh, ow, oc))


def sizing_images(*, image_path: str | None, side: int | None, channels: int | None, batch: int) -> np.ndarray:
    """A batch of `batch` input images: the image at `image_path` repeated (resized to side x side
    when `side` is given), else distinct crops of the sample photos at `side` (default 224);
    converted to `channels` (1 gray, 3 RGB) when given."""
    import cv2

    from .preview import load_image
    from .samples import sample_images

    if image_path is None:
        return sample_images(batch, side or DEFAULT_SIDE, channels or 3)
    image = load_image(image_path)
    if side is not None:
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).reshape(side, side, image.shape[2])
    if channels is not None and channels != image.shape[2]:
        code = cv2.COLOR_RGB2GRAY if channels == 1 else cv2.COLOR_GRAY2RGB
        image = cv2.cvtColor(image, code).reshape(*image.shape[:2], channels)
    return np.ascontiguousarray(np.broadcast_to(image, (batch, *image.shape)))
