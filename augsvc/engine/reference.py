"""The reference backend: each step in the written order, one image at a time, with
albumentations' own functions, on the same draws as the fused backend.

A run of consecutive rotate/scale steps is applied as one albumentations affine matrix, which is
what `A.Affine(rotate=..., scale=...)` does for a user writing the same pipeline; rotations about
the centre add up and isotropic zooms about the centre multiply and commute with them, so this
changes no parameter, only avoids resampling the image twice."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from albumentations.augmentations.crops import functional as fcrops  # noqa: E402
from albumentations.augmentations.geometric import functional as fgeometric  # noqa: E402
from albumentations.augmentations.pixel import functional as fpixel  # noqa: E402

from .. import _albumentations  # noqa: F401,E402 - first: keeps torch out (see that module)
from ..spec import Spec  # noqa: E402
from .extras import apply_extra  # noqa: E402
from .fused import BORDERS, Images, _as_list, _stack_if_uniform  # noqa: E402
from .params import StepDraw  # noqa: E402

_ZERO = {"x": 0.0, "y": 0.0}


def _affine(img: np.ndarray, rotate: float, scale: float, spec: Spec) -> Any:  # albumentations is untyped
    matrix = fgeometric.create_affine_transformation_matrix(
        translate=_ZERO, shear=_ZERO, scale={"x": scale, "y": scale}, rotate=rotate,
        shift=fgeometric.center(img.shape[:2]))
    return fgeometric.warp_affine(img, matrix, cv2.INTER_LINEAR, spec.fill, BORDERS[spec.border],
                                  img.shape[:2])


def _apply(img: np.ndarray, step: StepDraw, n: int, spec: Spec) -> Any:
    v = {k: a[n] for k, a in step.values.items()}
    p = step.params
    if step.name == "hflip":
        return fgeometric.hflip(img)
    if step.name == "vflip":
        return fgeometric.vflip(img)
    if step.name == "resize":
        return fgeometric.resize(img, (int(p.height), int(p.width)), cv2.INTER_LINEAR)
    if step.name == "random_resized_crop":
        x0, y0 = int(v["x0"]), int(v["y0"])
        crop = fcrops.crop(img, x0, y0, x0 + int(v["w"]), y0 + int(v["h"]))
        return fgeometric.resize(crop, (int(p.height), int(p.width)), cv2.INTER_LINEAR)
    if step.name == "color":
        if p.brightness > 0:
            img = fpixel.adjust_brightness_torchvision(img, float(v["brightness"]))
        if p.contrast > 0:
            img = fpixel.adjust_contrast_torchvision(img, float(v["contrast"]))
        if p.saturation > 0:
            img = fpixel.adjust_saturation_torchvision(img, float(v["saturation"]))
        if p.hue > 0:
            img = fpixel.adjust_hue_torchvision(img, float(v["hue"]))
        return img
    raise ValueError(f"no reference for step {step.name}")  # pragma: no cover


def _affine_run(images: list[np.ndarray], run: list[StepDraw], spec: Spec) -> list[np.ndarray]:
    out = list(images)
    for n in range(len(images)):
        angle, zoom = 0.0, 1.0
        for step in run:
            if step.apply[n]:
                if step.name == "rotate":
                    angle += float(step.values["angle"][n])
                else:
                    zoom *= float(step.values["scale"][n])
        if angle != 0.0 or zoom != 1.0:
            c = images[n].shape[2]
            res = _affine(images[n], angle, zoom, spec)
            out[n] = np.ascontiguousarray(res.reshape(*res.shape[:2], c))
    return out


def run_reference(work: Images, steps: list[StepDraw], spec: Spec, out: np.ndarray | None = None) -> Images:
    images = [np.ascontiguousarray(im) for im in _as_list(work)]
    i = 0
    while i < len(steps):
        step = steps[i]
        i += 1
        if step.name in ("rotate", "scale"):
            run = [step]
            while i < len(steps) and steps[i].name in ("rotate", "scale"):
                run.append(steps[i])
                i += 1
            images = _affine_run(images, run, spec)
            continue
        if step.name in ("coarse_dropout", "gaussian_blur"):
            images = apply_extra(step, images)
            continue
        for n in np.flatnonzero(step.apply):
            c = images[n].shape[2]
            out = _apply(images[n], step, int(n), spec)
            images[n] = np.ascontiguousarray(np.asarray(out, dtype=np.uint8).reshape(*out.shape[:2], c))
    return _stack_if_uniform(images)
