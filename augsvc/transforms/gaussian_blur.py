"""`gaussian_blur`: Gaussian blur with sigma drawn from sigma_range pixels (albumentations'
GaussianBlur, with probability p).
Strength s: the sigma range times s."""

from __future__ import annotations

from typing import Any

from .._albumentations import albumentations as A
from .albumentations_backed import AlbumentationsTransform


class GaussianBlur(AlbumentationsTransform):
    name = "gaussian_blur"

    def build(self, params: Any, strength: float) -> A.BasicTransform:
        lo, hi = (float(v) for v in params.sigma_range)
        return A.GaussianBlur(sigma_limit=(strength * lo, strength * hi), blur_limit=0, p=1.0)


TRANSFORM = GaussianBlur()
