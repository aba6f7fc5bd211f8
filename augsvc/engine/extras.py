"""Allow-listed albumentations transforms (regularizers), run with a per-sample generator.

Only the transforms named here can be built — never an arbitrary class name from a request.
Their parameters are capped by the schema. Each applied sample gets its own generator seeded
from (seed, epoch, sample_id, slot), so results do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._albumentations import albumentations as A
from .params import StepDraw


def _coarse_dropout(p: Any) -> A.BasicTransform:
    return A.CoarseDropout(num_holes_range=(int(p.num_holes_range[0]), int(p.num_holes_range[1])),
                           hole_height_range=tuple(p.hole_height_range),
                           hole_width_range=tuple(p.hole_width_range), fill=float(p.fill), p=1.0)


def _gaussian_blur(p: Any) -> A.BasicTransform:
    return A.GaussianBlur(sigma_limit=tuple(p.sigma_range), blur_limit=0, p=1.0)


ALLOWED: dict[str, Callable[[Any], A.BasicTransform]] = {
    "coarse_dropout": _coarse_dropout,
    "gaussian_blur": _gaussian_blur,
}


def apply_extra(step: StepDraw, images: list[np.ndarray]) -> list[np.ndarray]:
    """Apply an allow-listed transform to the samples it was drawn for; others pass through."""
    # Built per call (cheap next to the per-sample work): transforms hold generator state, so a
    # shared instance would not be thread-safe.
    transform = ALLOWED[step.name](step.params)
    out = list(images)
    for n in np.flatnonzero(step.apply):
        img = images[n]
        transform.set_random_seed(int(step.values["seed"][n]))
        res = np.asarray(transform(image=img)["image"])
        out[n] = np.ascontiguousarray(res.reshape(img.shape))
    return out
