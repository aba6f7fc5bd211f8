"""`coarse_dropout`: cutout — rectangular holes filled with `fill`, hole sides fractions of the
image side (albumentations' CoarseDropout, with probability p)."""

from __future__ import annotations

from typing import Any

from .._albumentations import albumentations as A
from .albumentations_backed import AlbumentationsTransform


class CoarseDropout(AlbumentationsTransform):
    name = "coarse_dropout"

    def build(self, params: Any) -> A.BasicTransform:
        return A.CoarseDropout(num_holes_range=(int(params.num_holes_range[0]), int(params.num_holes_range[1])),
                               hole_height_range=tuple(params.hole_height_range),
                               hole_width_range=tuple(params.hole_width_range), fill=float(params.fill), p=1.0)


TRANSFORM = CoarseDropout()
