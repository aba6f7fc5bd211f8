"""`resize`: every image becomes height x width (bilinear, pixel centres as cv2.resize)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .._albumentations import fgeometric
from ..rng import Draws
from .base import GeometricTransform, Resampling, crop_resize_matrices


class Resize(GeometricTransform[None]):
    name = "resize"
    resampling = Resampling.SIZE

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, None]:
        return self.always(d), None

    def matrix(self, values: None, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        zero = np.zeros(h.size)
        return crop_resize_matrices(zero, zero, w, h, oh, ow)

    def reference(self, image: np.ndarray, values: None, n: int, params: Any) -> Any:
        return fgeometric.resize(image, (int(params.height), int(params.width)), cv2.INTER_LINEAR)


TRANSFORM = Resize()
