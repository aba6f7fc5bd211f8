"""`rotate`: turn about the image centre by an angle drawn uniformly from limit_range (degrees,
counter-clockwise positive), with probability p; the output keeps the input size.
Strength s: the angle times s."""

from __future__ import annotations

import numpy as np

from .base import Scalars, UniformAffine, about_centre, affine_reference_matrix


class Rotate(UniformAffine):
    name = "rotate"
    range_field = "limit_range"
    identity = 0.0

    def matrix(self, values: Scalars, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray
               ) -> np.ndarray:
        rad = np.deg2rad(values.value % 360.0)
        cos, sin = np.cos(rad), np.sin(rad)
        linear = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)
        return about_centre(linear, h, w)

    def reference_matrix(self, values: Scalars, n: int, shape: tuple[int, int]) -> np.ndarray:
        return affine_reference_matrix(shape, rotate=float(values.value[n]))


TRANSFORM = Rotate()
