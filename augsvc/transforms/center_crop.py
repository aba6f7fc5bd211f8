"""`center_crop`: a deterministic crop of height x width about the image centre (offsets rounded
down, as albumentations' CenterCrop). Exact: whole pixels move, so it joins any warp. An image
smaller than the crop is refused."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._albumentations import fcrops
from ..errors import InvalidInputError
from ..rng import Draws
from .base import CropBoxes, GeometricTransform, Resampling, identity_matrices


class CenterCrop(GeometricTransform[CropBoxes]):
    name = "center_crop"
    resampling = Resampling.EXACT

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, CropBoxes]:
        ch, cw = int(params.height), int(params.width)
        small = (heights < ch) | (widths < cw)
        if small.any():
            i = int(np.flatnonzero(small)[0])
            raise InvalidInputError(f"center_crop: an image of {heights[i]}x{widths[i]} is smaller than the "
                                    f"{ch}x{cw} crop; resize it first (e.g. a shorter-side resize) or crop less")
        n = heights.size
        return self.always(d), CropBoxes((widths - cw) // 2, (heights - ch) // 2, np.full(n, cw, np.int64),
                                         np.full(n, ch, np.int64))

    def matrix(self, values: CropBoxes, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray
               ) -> np.ndarray:
        m = identity_matrices(h.size)
        m[:, 0, 2] = -values.x0
        m[:, 1, 2] = -values.y0
        return m

    def reference(self, image: np.ndarray, values: CropBoxes, n: int, params: Any) -> Any:
        x0, y0 = int(values.x0[n]), int(values.y0[n])
        return fcrops.crop(image, x0, y0, x0 + int(values.w[n]), y0 + int(values.h[n]))


TRANSFORM = CenterCrop()
