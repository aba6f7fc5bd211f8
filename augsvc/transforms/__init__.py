"""The transform registry: one definition per transform, found by its spec key.

Every key of the spec's `Transform` oneof (augsvc/spec.py `TRANSFORM_NAMES`) has a module of
that name here whose `TRANSFORM` is its definition (`base.Transform`): the draws, the output
size, the matrix or pixel function and the reference function. Adding a transform is its proto
message, one module here, and its tests.

`draw_steps` turns a spec into one `Draw` per step for a batch: which samples each step applies
to and the values drawn for each. Both backends apply exactly these draws, which is what makes
them comparable, and what keeps a sample's pixels independent of its batch (DESIGN contract 1).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from ..rng import Draws
from ..spec import TRANSFORM_NAMES, Spec
from .base import ColorTransform, CropBoxes, Draw, GeometricTransform, PixelTransform, Resampling, Transform

__all__ = ["TRANSFORMS", "ColorTransform", "CropBoxes", "Draw", "GeometricTransform", "PixelTransform",
           "Resampling", "Transform", "draw_steps"]


def _definition(name: str) -> Transform[Any]:
    definition: Transform[Any] = importlib.import_module(f"{__name__}.{name}").TRANSFORM
    if definition.name != name:  # pragma: no cover - a developer's slip, caught by any test run
        raise ImportError(f"augsvc.transforms.{name} defines {definition.name!r}")
    return definition


#: The definition of every transform, by spec key, in the schema's order.
TRANSFORMS: dict[str, Transform[Any]] = {name: _definition(name) for name in TRANSFORM_NAMES}


def draw_steps(spec: Spec, *, seed: int, epoch: int, sample_ids: np.ndarray, heights: np.ndarray,
               widths: np.ndarray, strength: np.ndarray | None = None) -> list[Draw[Any]]:
    """Every random draw of `spec` for a batch, with the image size before and after each step.
    Each sample's magnitude is the spec's strength times its entry of `strength` (per sample)."""
    draws: list[Draw[Any]] = []
    h = heights.astype(np.int64)
    w = widths.astype(np.int64)
    s = None
    if spec.strength != 1.0 or strength is not None:
        s = np.broadcast_to(spec.strength * (1.0 if strength is None else strength), sample_ids.shape)
    for index, (name, params) in enumerate(spec.steps):
        draw = TRANSFORMS[name].draw(params, Draws(seed, epoch, sample_ids, index), h, w, s)
        draws.append(draw)
        h, w = draw.out_size
    return draws
