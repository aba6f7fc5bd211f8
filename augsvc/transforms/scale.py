"""`scale`: isotropic zoom about the image centre by a factor drawn uniformly from scale_range,
with probability p; the output keeps the input size.
Strength s: the factor moves toward 1 in log space (factor ** s), so zooming in and out scale alike."""

from __future__ import annotations

import numpy as np

from .base import Scalars, UniformAffine, about_centre, affine_reference_matrix


class Scale(UniformAffine):
    name = "scale"
    range_field = "scale_range"
    identity = 1.0

    def scaled(self, drawn: np.ndarray, strength: np.ndarray) -> np.ndarray:
        return np.where(strength == 1.0, drawn, np.exp(strength * np.log(drawn)))

    def matrix(self, values: Scalars, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        linear = np.zeros((h.size, 2, 2))
        linear[:, 0, 0] = values.value
        linear[:, 1, 1] = values.value
        return about_centre(linear, h, w)

    def reference_matrix(self, values: Scalars, n: int, shape: tuple[int, int]) -> np.ndarray:
        return affine_reference_matrix(shape, scale=float(values.value[n]))


TRANSFORM = Scale()
