"""`resize_shorter`: a deterministic resize that keeps the aspect ratio, the shorter side becoming
`side` and the other rounded (half to even), as albumentations' SmallestMaxSize; bilinear, pixel
centres as cv2.resize. With center_crop it is the standard eval pipeline (side 256, crop 224)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import WholeImageResize


class ResizeShorter(WholeImageResize):
    name = "resize_shorter"

    def output_size(self, params: Any, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        scale = int(params.side) / np.minimum(heights, widths)
        return (np.maximum(1, np.rint(heights * scale)).astype(np.int64),
                np.maximum(1, np.rint(widths * scale)).astype(np.int64))


TRANSFORM = ResizeShorter()
