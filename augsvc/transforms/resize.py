"""`resize`: every image becomes height x width (bilinear, pixel centres as cv2.resize). No magnitude."""

from __future__ import annotations

from .base import WholeImageResize


class Resize(WholeImageResize):
    name = "resize"


TRANSFORM = Resize()
