"""`translate`: shift by a fraction of the width (x) and of the height (y), each drawn uniformly
from its range (positive: right and down), with probability p; fused into one warp with rotate
and scale, and composed in the reference as albumentations' Affine translate does.
Strength s: both shifts times s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..rng import Draws
from .base import GeometricTransform, Resampling, affine_reference_matrix, identity_matrices, toward


@dataclass(frozen=True)
class Shifts:
    dx: np.ndarray  # fractions of the width, (N,)
    dy: np.ndarray  # fractions of the height, (N,)


class Translate(GeometricTransform[Shifts]):
    name = "translate"
    resampling = Resampling.AFFINE

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, Shifts]:
        return d.bernoulli(0, params.p), Shifts(d.uniform(1, *params.x_range), d.uniform(2, *params.y_range))

    def at_strength(self, apply: np.ndarray, values: Shifts, strength: np.ndarray, params: Any,
                    heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, Shifts]:
        return apply & (strength > 0), Shifts(toward(values.dx, 0.0, strength), toward(values.dy, 0.0, strength))

    def matrix(self, values: Shifts, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        m = identity_matrices(h.size)
        m[:, 0, 2] = values.dx * w
        m[:, 1, 2] = values.dy * h
        return m

    def reference_matrix(self, values: Shifts, n: int, shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        return affine_reference_matrix(shape, translate=(float(values.dx[n]) * w, float(values.dy[n]) * h))


TRANSFORM = Translate()
