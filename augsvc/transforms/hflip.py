"""`hflip`: mirror left-right with probability p (exact: whole pixels move)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._albumentations import fgeometric
from ..rng import Draws
from .base import GeometricTransform, Resampling, identity_matrices


class HFlip(GeometricTransform[None]):
    name = "hflip"
    resampling = Resampling.EXACT

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, None]:
        return d.bernoulli(0, params.p), None

    def matrix(self, values: None, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        m = identity_matrices(h.size)
        m[:, 0, 0] = -1.0
        m[:, 0, 2] = w - 1.0
        return m

    def reference(self, image: np.ndarray, values: None, n: int, params: Any) -> Any:
        return fgeometric.hflip(image)


TRANSFORM = HFlip()
