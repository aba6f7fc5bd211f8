"""`coarse_dropout`: cutout — rectangular holes filled with `fill`, hole sides fractions of the
image side (albumentations' CoarseDropout, with probability p).
Strength s: the hole sides' ranges times s."""

from __future__ import annotations

from typing import Any

from .._albumentations import albumentations as A
from .albumentations_backed import AlbumentationsTransform


class CoarseDropout(AlbumentationsTransform):
    name = "coarse_dropout"

    def build(self, params: Any, strength: float) -> A.BasicTransform:
        def scaled(r: Any) -> tuple[float, float]:
            return (float(r[0]), float(r[1])) if strength == 1.0 else (strength * r[0], strength * r[1])

        return A.CoarseDropout(num_holes_range=(int(params.num_holes_range[0]), int(params.num_holes_range[1])),
                               hole_height_range=scaled(params.hole_height_range),
                               hole_width_range=scaled(params.hole_width_range), fill=float(params.fill), p=1.0)


TRANSFORM = CoarseDropout()
