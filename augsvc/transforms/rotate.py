"""`rotate`: turn about the image centre by an angle drawn uniformly from limit_range (degrees,
counter-clockwise positive), with probability p; the output keeps the input size.
Strength s: the angle times s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..rng import Draws
from .base import GeometricTransform, Resampling, about_centre, affine_reference_matrix, toward


@dataclass(frozen=True)
class Angles:
    angle: np.ndarray  # degrees, (N,)


class Rotate(GeometricTransform[Angles]):
    name = "rotate"
    resampling = Resampling.AFFINE

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, Angles]:
        lo, hi = params.limit_range
        return d.bernoulli(0, params.p), Angles(d.uniform(1, lo, hi))

    def at_strength(self, apply: np.ndarray, values: Angles, strength: np.ndarray, params: Any,
                    heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, Angles]:
        return apply & (strength > 0), Angles(toward(values.angle, 0.0, strength))

    def matrix(self, values: Angles, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray
               ) -> np.ndarray:
        rad = np.deg2rad(values.angle % 360.0)
        cos, sin = np.cos(rad), np.sin(rad)
        linear = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)
        return about_centre(linear, h, w)

    def reference_matrix(self, values: Angles, n: int, shape: tuple[int, int]) -> np.ndarray:
        return affine_reference_matrix(shape, rotate=float(values.angle[n]))


TRANSFORM = Rotate()
