"""`color`: color jitter with torchvision/albumentations semantics, applied in the order
brightness, contrast, saturation, hue, with probability p. Factors are drawn from
[max(0, 1 - x), 1 + x]; the hue shift from [-hue, hue] (a fraction of the hue circle).
Saturation and hue do nothing to grayscale images.
Strength s: each factor moves toward 1 (1 + s * (factor - 1)), the hue shift times s.

The fused application takes few OpenCV passes per image:
- brightness and contrast fold into ONE lookup table per image (albucore's truncating multiply);
  contrast's gray mean is taken from the image before brightness and scaled by the brightness
  factor, which is exact up to rounding while nothing clips; an image whose brightness clips (its
  brightest level times the factor passes 255) gets two passes instead, brightness's table then
  contrast's, with the mean measured between them, as the reference measures it.
- saturation is one `cv2.transform` with the 3x3 matrix s*I + (1-s)*gray_weights (rounded once;
  the reference rounds the gray image first, so they may differ by one level).
- hue is the exact HSV round trip, with an exact integer shift of the hue plane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .._albumentations import fpixel
from ..rng import Draws
from .base import ColorTransform, toward

_GRAY = np.array([0.299, 0.587, 0.114])
_LEVELS = np.arange(256, dtype=np.float64)


@dataclass(frozen=True)
class ColorFactors:
    brightness: np.ndarray  # multiplicative factors, (N,)
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray         # shift, a fraction of the hue circle


@dataclass(frozen=True)
class _Uses:
    brightness: bool
    contrast: bool
    saturation: bool
    hue: bool

    @classmethod
    def of(cls, params: Any) -> _Uses:
        return cls(params.brightness > 0, params.contrast > 0, params.saturation > 0, params.hue > 0)


def _hue_tables() -> np.ndarray:
    """(180, 256): row k is the lookup table of hue = (hue + k) mod 180 on OpenCV's 0..179 hue
    (values of 180 and over, which OpenCV's RGB->HSV never gives, map to themselves)."""
    tables = np.tile(np.arange(256, dtype=np.int64), (180, 1))
    tables[:, :180] = (tables[:, :180] + np.arange(180)[:, None]) % 180
    return tables.astype(np.uint8)


_HUE_TABLES = _hue_tables()


def _shift_hue(hsv: np.ndarray, k: int, plane: np.ndarray) -> None:
    """Shift the hue channel of an (H, W, 3) HSV image in place by `k` (0 <= k < 180, mod 180): the
    channel goes through `plane` (an (H, W) buffer) and one 1-channel LUT — exact, and about twice
    as fast as numpy's strided passes or a 3-channel LUT on the whole image."""
    if k == 0:
        return
    cv2.extractChannel(hsv, 0, plane)
    cv2.LUT(plane, _HUE_TABLES[k], dst=plane)
    cv2.insertChannel(plane, hsv, 0)


def _tables(images: list[np.ndarray], f: ColorFactors, uses: _Uses
            ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, dict[int, tuple[np.ndarray, float]]]:
    """Per-image tables for M images, built at once: (M,256) brightness and contrast LUTs,
    (M,3,3) saturation matrices, (M,) hue shifts in OpenCV hue units (None when unused), and the
    images whose brightness clips: k -> (their brightness table, their contrast factor), to be
    applied in two passes with the mean measured between them (their row of the LUTs is unused)."""
    m = len(images)
    b, c, s = f.brightness, f.contrast, f.saturation
    bc = sat = hue = None
    staged: dict[int, tuple[np.ndarray, float]] = {}
    if uses.brightness or uses.contrast:
        lut = np.broadcast_to(_LEVELS, (m, 256))
        if uses.brightness:
            lut = np.clip(np.floor(lut * b[:, None]), 0, 255)
        if uses.contrast:
            channels = images[0].shape[2]
            means = np.array([cv2.mean(img)[:channels] for img in images]).reshape(m, channels)
            mean = means @ _GRAY if channels == 3 else means[:, 0]
            if uses.brightness:
                mean = np.clip(mean * b - 0.5 * (b != 1.0), 0, 255)
                for k in np.flatnonzero(b > 1.0):  # floor(v * b) > 255 from v >= 256 / b: clipped
                    if cv2.minMaxLoc(images[k].reshape(-1))[1] * b[k] >= 256.0:
                        staged[int(k)] = (lut[k].astype(np.uint8), float(c[k]))
            lut = np.clip(np.floor(lut * c[:, None] + (mean * (1.0 - c))[:, None]), 0, 255)
        bc = lut.astype(np.uint8)
    if uses.saturation:
        sat = s[:, None, None] * np.eye(3) + (1.0 - s)[:, None, None] * np.outer(np.ones(3), _GRAY)
    if uses.hue:
        # OpenCV's hue is 0..179; the reference shifts by floor(h + 180 * factor) mod 180, which for
        # an integer h is h + floor(180 * factor) mod 180.
        hue = np.mod(np.floor(180.0 * f.hue), 180).astype(np.int64)
    return bc, sat, hue, staged


def _brightness_then_contrast(plane: np.ndarray, brightness: np.ndarray, c: float) -> None:
    """Brightness's table, then contrast toward the gray mean of the brightened (clipped) image,
    measured between the two passes: exact, as the reference measures it."""
    cv2.LUT(plane, brightness, dst=plane)
    means = cv2.mean(plane)
    mean = float(np.dot(means[:3], _GRAY)) if plane.ndim == 3 else float(means[0])
    cv2.LUT(plane, np.clip(np.floor(_LEVELS * c + mean * (1.0 - c)), 0, 255).astype(np.uint8), dst=plane)


class Color(ColorTransform[ColorFactors]):
    name = "color"

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, ColorFactors]:
        def factor(k: int, x: float) -> np.ndarray:
            return d.uniform(k, max(0.0, 1.0 - x), 1.0 + x)

        return d.bernoulli(0, params.p), ColorFactors(
            factor(1, float(params.brightness)), factor(2, float(params.contrast)),
            factor(3, float(params.saturation)), d.uniform(4, -params.hue, params.hue))

    def at_strength(self, apply: np.ndarray, values: ColorFactors, strength: np.ndarray, params: Any,
                    heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, ColorFactors]:
        return apply & (strength > 0), ColorFactors(
            toward(values.brightness, 1.0, strength), toward(values.contrast, 1.0, strength),
            toward(values.saturation, 1.0, strength), toward(values.hue, 0.0, strength))

    def acts(self, params: Any) -> bool:
        uses = _Uses.of(params)
        return uses.brightness or uses.contrast or uses.saturation or uses.hue

    def apply_inplace(self, images: list[np.ndarray], values: ColorFactors, index: np.ndarray, params: Any) -> None:
        if not images:
            return
        f = ColorFactors(values.brightness[index], values.contrast[index], values.saturation[index],
                         values.hue[index])
        bc, sat, hue_shifts, staged = _tables(images, f, _Uses.of(params))
        rgb = images[0].shape[2] == 3
        hsv: np.ndarray | None = None  # one HSV buffer (and hue plane) for the batch
        hue_plane: np.ndarray | None = None
        for k, img in enumerate(images):
            plane = img if rgb else img.reshape(img.shape[:2])
            if k in staged:
                _brightness_then_contrast(plane, *staged[k])
            elif bc is not None:
                cv2.LUT(plane, bc[k], dst=plane)
            if rgb and sat is not None:
                cv2.transform(plane, sat[k], dst=plane)
            if rgb and hue_shifts is not None:
                if hsv is None or hue_plane is None or hsv.shape != plane.shape:
                    hsv, hue_plane = np.empty_like(plane), np.empty(plane.shape[:2], np.uint8)
                cv2.cvtColor(plane, cv2.COLOR_RGB2HSV, dst=hsv)
                _shift_hue(hsv, int(hue_shifts[k]), hue_plane)
                cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=plane)

    def reference(self, image: np.ndarray, values: ColorFactors, n: int, params: Any) -> Any:
        uses = _Uses.of(params)
        if uses.brightness:
            image = fpixel.adjust_brightness_torchvision(image, float(values.brightness[n]))
        if uses.contrast:
            image = fpixel.adjust_contrast_torchvision(image, float(values.contrast[n]))
        if uses.saturation:
            image = fpixel.adjust_saturation_torchvision(image, float(values.saturation[n]))
        if uses.hue:
            image = fpixel.adjust_hue_torchvision(image, float(values.hue[n]))
        return image


TRANSFORM = Color()
