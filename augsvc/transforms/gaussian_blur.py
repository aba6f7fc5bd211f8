"""`gaussian_blur`: Gaussian blur with sigma drawn from sigma_range pixels (albumentations'
GaussianBlur, with probability p)."""

from __future__ import annotations

from typing import Any

from .._albumentations import albumentations as A
from .albumentations_backed import AlbumentationsTransform


class GaussianBlur(AlbumentationsTransform):
    name = "gaussian_blur"

    def build(self, params: Any) -> A.BasicTransform:
        return A.GaussianBlur(sigma_limit=tuple(params.sigma_range), blur_limit=0, p=1.0)


TRANSFORM = GaussianBlur()
