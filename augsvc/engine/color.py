"""Color jitter for the fused backend: few OpenCV passes per image.

Semantics are albumentations' torchvision-style functions on uint8, in the order brightness,
contrast, saturation, hue:
- brightness and contrast fold into ONE lookup table per image (albucore's truncating multiply);
  contrast's gray mean is taken from the image before brightness and scaled by the brightness
  factor, which is exact up to clipping and rounding (the reference measures it after).
- saturation is one `cv2.transform` with the 3x3 matrix s*I + (1-s)*gray_weights (rounded once;
  the reference rounds the gray image first, so they may differ by one level).
- hue is the exact HSV round trip, with an exact integer shift of the hue plane.
"""

from __future__ import annotations

import cv2
import numpy as np

_GRAY = np.array([0.299, 0.587, 0.114])
_LEVELS = np.arange(256, dtype=np.float64)


def _shift_hue(hue: np.ndarray, k: int) -> None:
    """hue = (hue + k) mod 180 in place on a uint8 view holding 0..179, for 0 <= k < 180.
    uint8 arithmetic wraps modulo 256, which makes `+ k - 180` exact for the values that wrap.
    (A 3-channel cv2.LUT on the HSV image costs twice as much as these strided numpy passes.)"""
    if k == 0:
        return
    wraps = hue >= 180 - k
    hue += np.uint8(k)
    np.subtract(hue, np.uint8(180), out=hue, where=wraps)


def _tables(images: list[np.ndarray], b: np.ndarray, c: np.ndarray, s: np.ndarray, h: np.ndarray,
            flags: dict[str, bool]) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Per-image tables for M images, built at once: (M,256) brightness and contrast LUTs,
    (M,3,3) saturation matrices, (M,) hue shifts in OpenCV hue units (None when unused)."""
    m = len(images)
    bc = sat = hue = None
    if flags["use_brightness"] or flags["use_contrast"]:
        lut = np.broadcast_to(_LEVELS, (m, 256))
        if flags["use_brightness"]:
            lut = np.clip(np.floor(lut * b[:, None]), 0, 255)
        if flags["use_contrast"]:
            channels = images[0].shape[2]
            means = np.array([cv2.mean(img)[:channels] for img in images]).reshape(m, channels)
            mean = means @ _GRAY if channels == 3 else means[:, 0]
            if flags["use_brightness"]:
                mean = np.clip(mean * b - 0.5 * (b != 1.0), 0, 255)
            lut = np.clip(np.floor(lut * c[:, None] + (mean * (1.0 - c))[:, None]), 0, 255)
        bc = lut.astype(np.uint8)
    if flags["use_saturation"]:
        sat = s[:, None, None] * np.eye(3) + (1.0 - s)[:, None, None] * np.outer(np.ones(3), _GRAY)
    if flags["use_hue"]:
        # OpenCV's hue is 0..179; the reference shifts by floor(h + 180 * factor) mod 180, which for
        # an integer h is h + floor(180 * factor) mod 180.
        hue = np.mod(np.floor(180.0 * h), 180).astype(np.int64)
    return bc, sat, hue


def jitter_inplace(images: list[np.ndarray], brightness: np.ndarray, contrast: np.ndarray,
                   saturation: np.ndarray, hue: np.ndarray, **flags: bool) -> None:
    """Jitter each (H,W,C) uint8 image of `images` in place (they must be contiguous and owned
    by the caller); factor arrays are aligned with `images`."""
    if not images:
        return
    bc, sat, hue_luts = _tables(images, brightness, contrast, saturation, hue, flags)
    rgb = images[0].shape[2] == 3
    hsv: np.ndarray | None = None  # one HSV buffer for the batch
    for k, img in enumerate(images):
        plane = img if rgb else img.reshape(img.shape[:2])
        if bc is not None:
            cv2.LUT(plane, bc[k], dst=plane)
        if rgb and sat is not None:
            cv2.transform(plane, sat[k], dst=plane)
        if rgb and hue_luts is not None:
            if hsv is None or hsv.shape != plane.shape:
                hsv = np.empty_like(plane)
            cv2.cvtColor(plane, cv2.COLOR_RGB2HSV, dst=hsv)
            _shift_hue(hsv[..., 0], int(hue_luts[k]))
            cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=plane)
