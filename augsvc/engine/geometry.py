"""Affine matrices (forward, source -> destination pixel coordinates, 3x3) for geometric steps.

Conventions follow albumentations 2.0.8 so that one fused warp matches the reference backend:
pixel centres at integer coordinates, the image centre at (w/2 - 0.5, h/2 - 0.5), positive
angles counter-clockwise, and resizing that maps pixel centres like cv2.resize.
"""

from __future__ import annotations

import numpy as np

from .params import StepDraw


def _eye(n: int) -> np.ndarray:
    return np.broadcast_to(np.eye(3), (n, 3, 3)).copy()


def _about_centre(linear: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """T(c) @ L @ T(-c) for 2x2 linear parts `linear` (N,2,2) and centres of (h, w) images."""
    n = linear.shape[0]
    m = _eye(n)
    m[:, :2, :2] = linear
    c = np.stack([w / 2.0 - 0.5, h / 2.0 - 0.5], axis=1)           # (N, 2)
    m[:, :2, 2] = c - np.einsum("nij,nj->ni", linear, c)
    return m


def step_matrices(step: StepDraw) -> np.ndarray:
    """(N,3,3) matrices of one geometric step; identity where the step does not apply."""
    h, w = (a.astype(np.float64) for a in step.in_size)
    n = h.size
    m = _eye(n)
    if step.name == "hflip":
        m[:, 0, 0] = -1.0
        m[:, 0, 2] = w - 1.0
    elif step.name == "vflip":
        m[:, 1, 1] = -1.0
        m[:, 1, 2] = h - 1.0
    elif step.name == "rotate":
        rad = np.deg2rad(step.values["angle"] % 360.0)
        cos, sin = np.cos(rad), np.sin(rad)
        linear = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)
        m = _about_centre(linear, h, w)
    elif step.name == "scale":
        s = step.values["scale"]
        linear = np.zeros((n, 2, 2))
        linear[:, 0, 0] = s
        linear[:, 1, 1] = s
        m = _about_centre(linear, h, w)
    elif step.name in ("resize", "random_resized_crop"):
        oh, ow = (a.astype(np.float64) for a in step.out_size)
        if step.name == "resize":
            x0, y0, cw, ch = np.zeros(n), np.zeros(n), w, h
        else:
            x0, y0 = step.values["x0"].astype(np.float64), step.values["y0"].astype(np.float64)
            cw, ch = step.values["w"].astype(np.float64), step.values["h"].astype(np.float64)
        sx, sy = ow / cw, oh / ch
        m[:, 0, 0] = sx
        m[:, 1, 1] = sy
        m[:, 0, 2] = (0.5 - x0) * sx - 0.5
        m[:, 1, 2] = (0.5 - y0) * sy - 0.5
    else:  # pragma: no cover - only geometric steps reach here
        raise ValueError(f"{step.name} is not a geometric step")
    m[~step.apply] = np.eye(3)
    return m


def group_matrices(steps: list[StepDraw]) -> np.ndarray:
    """The composite (N,3,3) matrix of consecutive geometric steps (first step applied first)."""
    total = step_matrices(steps[0])
    for step in steps[1:]:
        total = step_matrices(step) @ total
    return total
