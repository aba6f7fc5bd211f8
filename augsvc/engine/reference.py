"""The reference backend: each step in the written order, one image at a time, with
albumentations' own functions, on the same draws as the fused backend.

A run of consecutive affine steps (rotate, scale) is applied as one albumentations affine matrix,
the product of the steps' own matrices in the written order — what `A.Affine(rotate=...,
scale=...)` does for a user writing the same pipeline — so the image is resampled once, not once
per step."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .._albumentations import fgeometric
from ..spec import Spec
from ..transforms import ColorTransform, Draw, GeometricTransform, PixelTransform, Resampling
from .images import BORDERS, Images, as_list, stack_if_uniform


def _is_affine(draw: Draw[Any]) -> bool:
    transform = draw.transform
    return isinstance(transform, GeometricTransform) and transform.resampling is Resampling.AFFINE


def _affine_run(images: list[np.ndarray], run: list[Draw[Any]], spec: Spec) -> list[np.ndarray]:
    out = list(images)
    for n, image in enumerate(images):
        shape = image.shape[:2]
        matrix = np.eye(3)
        for draw in run:
            transform = draw.transform
            if draw.apply[n] and isinstance(transform, GeometricTransform):
                matrix = transform.reference_matrix(draw.values, n, shape) @ matrix
        if not np.array_equal(matrix, np.eye(3)):
            res = fgeometric.warp_affine(image, matrix, cv2.INTER_LINEAR, spec.fill, BORDERS[spec.border], shape)
            out[n] = np.ascontiguousarray(res.reshape(*res.shape[:2], image.shape[2]))
    return out


def _one_by_one(images: list[np.ndarray], draw: Draw[Any]) -> list[np.ndarray]:
    transform = draw.transform
    assert isinstance(transform, (GeometricTransform, ColorTransform))
    out = list(images)
    for n in np.flatnonzero(draw.apply):
        image = images[n]
        res = np.asarray(transform.reference(image, draw.values, int(n), draw.params), dtype=np.uint8)
        out[n] = np.ascontiguousarray(res.reshape(*res.shape[:2], image.shape[2]))
    return out


def run_reference(work: Images, draws: list[Draw[Any]], spec: Spec, out: np.ndarray | None = None) -> Images:
    images = [np.ascontiguousarray(im) for im in as_list(work)]
    i = 0
    while i < len(draws):
        draw = draws[i]
        if _is_affine(draw):
            j = i + 1
            while j < len(draws) and _is_affine(draws[j]):
                j += 1
            images = _affine_run(images, draws[i:j], spec)
            i = j
            continue
        transform = draw.transform
        images = transform.apply(images, draw) if isinstance(transform, PixelTransform) else _one_by_one(images, draw)
        i += 1
    return stack_if_uniform(images)
