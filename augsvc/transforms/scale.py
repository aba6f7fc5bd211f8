"""`scale`: isotropic zoom about the image centre by a factor drawn uniformly from scale_range,
with probability p; the output keeps the input size.
Strength s: the factor moves toward 1 in log space (factor ** s), so zooming in and out scale alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..rng import Draws
from .base import GeometricTransform, Resampling, about_centre, affine_reference_matrix


@dataclass(frozen=True)
class Zooms:
    scale: np.ndarray  # factor, (N,)


class Scale(GeometricTransform[Zooms]):
    name = "scale"
    resampling = Resampling.AFFINE

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, Zooms]:
        lo, hi = params.scale_range
        return d.bernoulli(0, params.p), Zooms(d.uniform(1, lo, hi))

    def at_strength(self, apply: np.ndarray, values: Zooms, strength: np.ndarray, params: Any,
                    heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, Zooms]:
        scaled = np.where(strength == 1.0, values.scale, np.exp(strength * np.log(values.scale)))
        return apply & (strength > 0), Zooms(scaled)

    def matrix(self, values: Zooms, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        linear = np.zeros((h.size, 2, 2))
        linear[:, 0, 0] = values.scale
        linear[:, 1, 1] = values.scale
        return about_centre(linear, h, w)

    def reference_matrix(self, values: Zooms, n: int, shape: tuple[int, int]) -> np.ndarray:
        return affine_reference_matrix(shape, scale=float(values.scale[n]))


TRANSFORM = Scale()
