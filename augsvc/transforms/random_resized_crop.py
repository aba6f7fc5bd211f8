"""`random_resized_crop`: the ImageNet recipe — a crop of random area fraction (scale_range) and
aspect ratio (ratio_range, log-uniform), resized to height x width; after RRC_ATTEMPTS failed
draws it falls back to a centre crop, like torchvision and albumentations.
Strength s: the box moves toward the whole image (offsets times s, sides toward the image's), so
s = 0 is a plain resize of the whole image — the step still sizes, with no magnitude left."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from .._albumentations import fcrops, fgeometric
from ..rng import Draws
from .base import CropBoxes, GeometricTransform, Resampling, crop_resize_matrices, toward

#: (area, ratio) draws tried before the centre-crop fallback.
RRC_ATTEMPTS = 10


class RandomResizedCrop(GeometricTransform[CropBoxes]):
    name = "random_resized_crop"
    resampling = Resampling.SIZE

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, CropBoxes]:
        """Crop boxes with torchvision's recipe, all attempts drawn at once."""
        n = heights.size
        area = (heights * widths).astype(np.float64)
        s_lo, s_hi = (float(v) for v in params.scale_range)
        r_lo, r_hi = (float(v) for v in params.ratio_range)
        log_lo, log_hi = math.log(r_lo), math.log(r_hi)
        x0, y0, cw, ch = (np.zeros(n, np.int64) for _ in range(4))
        done = np.zeros(n, bool)
        for a in range(RRC_ATTEMPTS):
            target = d.uniform(a, s_lo, s_hi) * area
            ratio = np.exp(d.uniform(RRC_ATTEMPTS + a, log_lo, log_hi))
            w = np.rint(np.sqrt(target * ratio)).astype(np.int64)
            h = np.rint(np.sqrt(target / ratio)).astype(np.int64)
            ok = ~done & (w > 0) & (h > 0) & (w <= widths) & (h <= heights)
            if ok.any():
                # Integer offsets uniform over [0, H - h] and [0, W - w].
                uy = d.uniform(2 * RRC_ATTEMPTS + a)
                ux = d.uniform(3 * RRC_ATTEMPTS + a)
                y0[ok] = np.minimum((uy[ok] * (heights[ok] - h[ok] + 1)).astype(np.int64), heights[ok] - h[ok])
                x0[ok] = np.minimum((ux[ok] * (widths[ok] - w[ok] + 1)).astype(np.int64), widths[ok] - w[ok])
                cw[ok], ch[ok] = w[ok], h[ok]
                done |= ok
        if not done.all():
            rest = ~done
            hh, ww = heights[rest], widths[rest]
            in_ratio = ww / hh
            fw = np.where(in_ratio < r_lo, ww, np.where(in_ratio > r_hi, np.rint(hh * r_hi), ww)).astype(np.int64)
            fh = np.where(in_ratio < r_lo, np.rint(ww / r_lo), hh).astype(np.int64)
            fw, fh = np.clip(fw, 1, ww), np.clip(fh, 1, hh)
            cw[rest], ch[rest] = fw, fh
            x0[rest], y0[rest] = (ww - fw) // 2, (hh - fh) // 2
        return self.always(d), CropBoxes(x0, y0, cw, ch)

    def at_strength(self, apply: np.ndarray, values: CropBoxes, strength: np.ndarray, params: Any,
                    heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, CropBoxes]:
        def side(drawn: np.ndarray, whole: np.ndarray) -> np.ndarray:
            mixed: np.ndarray = toward(drawn.astype(np.float64), 0.0, strength) + (1.0 - strength) * whole
            rounded: np.ndarray = np.rint(mixed).astype(np.int64)
            return rounded

        x0 = np.rint(strength * values.x0).astype(np.int64)
        y0 = np.rint(strength * values.y0).astype(np.int64)
        w = np.minimum(side(values.w, widths), widths - x0)
        h = np.minimum(side(values.h, heights), heights - y0)
        return apply, CropBoxes(x0, y0, w, h)

    def matrix(self, values: CropBoxes, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray
               ) -> np.ndarray:
        return crop_resize_matrices(values.x0.astype(np.float64), values.y0.astype(np.float64),
                                    values.w.astype(np.float64), values.h.astype(np.float64), oh, ow)

    def reference(self, image: np.ndarray, values: CropBoxes, n: int, params: Any) -> Any:
        x0, y0 = int(values.x0[n]), int(values.y0[n])
        crop = fcrops.crop(image, x0, y0, x0 + int(values.w[n]), y0 + int(values.h[n]))
        return fgeometric.resize(crop, (int(params.height), int(params.width)), cv2.INTER_LINEAR)


TRANSFORM = RandomResizedCrop()
