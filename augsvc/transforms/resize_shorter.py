"""`resize_shorter`: a deterministic resize that keeps the aspect ratio, the shorter side becoming
`side` and the other rounded (half to even), as albumentations' SmallestMaxSize; bilinear, pixel
centres as cv2.resize. With center_crop it is the standard eval pipeline (side 256, crop 224)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .._albumentations import fgeometric
from ..rng import Draws
from .base import GeometricTransform, Resampling, crop_resize_matrices


def _sizes(side: int, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = side / np.minimum(heights, widths)
    return (np.maximum(1, np.rint(heights * scale)).astype(np.int64),
            np.maximum(1, np.rint(widths * scale)).astype(np.int64))


class ResizeShorter(GeometricTransform[None]):
    name = "resize_shorter"
    resampling = Resampling.SIZE

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, None]:
        return self.always(d), None

    def output_size(self, params: Any, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        return _sizes(int(params.side), heights, widths)

    def matrix(self, values: None, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        zero = np.zeros(h.size)
        return crop_resize_matrices(zero, zero, w, h, oh, ow)

    def reference(self, image: np.ndarray, values: None, n: int, params: Any) -> Any:
        oh, ow = _sizes(int(params.side), np.array([image.shape[0]]), np.array([image.shape[1]]))
        return fgeometric.resize(image, (int(oh[0]), int(ow[0])), cv2.INTER_LINEAR)


TRANSFORM = ResizeShorter()
