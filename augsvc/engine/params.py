"""Parameter draws for a whole batch, vectorized, from (seed, epoch, sample_id, slot).

`draw_params` turns a spec into one `StepDraw` per step: which samples the step applies to and
the values drawn for each. Both backends apply exactly these draws, which is what makes them
comparable, and what keeps a sample's pixels independent of its batch (DESIGN contract 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..rng import Draws
from ..spec import Spec

# random_resized_crop tries this many (area, ratio) draws before its centre-crop fallback, like
# torchvision and albumentations.
RRC_ATTEMPTS = 10


@dataclass
class StepDraw:
    """Draws of one step for a batch. Arrays are indexed by position in the batch."""

    name: str
    params: Any                      # the step's proto message, defaults filled
    apply: np.ndarray                # bool (N,)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    in_size: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))   # (heights, widths)
    out_size: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))


def _range(values: Any) -> tuple[float, float]:
    lo, hi = values
    return float(lo), float(hi)


def _random_resized_crop(d: Draws, params: Any, heights: np.ndarray, widths: np.ndarray
                         ) -> dict[str, np.ndarray]:
    """Crop boxes (x0, y0, w, h) with torchvision's recipe, all attempts drawn at once."""
    n = heights.size
    area = (heights * widths).astype(np.float64)
    s_lo, s_hi = _range(params.scale_range)
    r_lo, r_hi = _range(params.ratio_range)
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    x0 = np.zeros(n, np.int64)
    y0 = np.zeros(n, np.int64)
    cw = np.zeros(n, np.int64)
    ch = np.zeros(n, np.int64)
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
    return {"x0": x0, "y0": y0, "w": cw, "h": ch}


def draw_params(spec: Spec, *, seed: int, epoch: int, sample_ids: np.ndarray, heights: np.ndarray,
                widths: np.ndarray) -> list[StepDraw]:
    """Every random draw of `spec` for a batch, with the image size before and after each step."""
    n = sample_ids.size
    steps: list[StepDraw] = []
    h = heights.astype(np.int64)
    w = widths.astype(np.int64)
    for index, (name, params) in enumerate(spec.steps):
        d = Draws(seed, epoch, sample_ids, index)
        values: dict[str, np.ndarray] = {}
        out_h, out_w = h, w
        if name in ("hflip", "vflip"):
            apply = d.bernoulli(0, params.p)
        elif name == "rotate":
            apply = d.bernoulli(0, params.p)
            values["angle"] = d.uniform(1, *_range(params.limit_range))
        elif name == "scale":
            apply = d.bernoulli(0, params.p)
            values["scale"] = d.uniform(1, *_range(params.scale_range))
        elif name == "color":
            apply = d.bernoulli(0, params.p)
            for k, key in enumerate(("brightness", "contrast", "saturation"), start=1):
                x = float(getattr(params, key))
                values[key] = d.uniform(k, max(0.0, 1.0 - x), 1.0 + x)
            values["hue"] = d.uniform(4, -params.hue, params.hue)
        elif name == "resize":
            apply = np.ones(n, bool)
            out_h = np.full(n, params.height, np.int64)
            out_w = np.full(n, params.width, np.int64)
        elif name == "random_resized_crop":
            apply = np.ones(n, bool)
            values = _random_resized_crop(d, params, h, w)
            out_h = np.full(n, params.height, np.int64)
            out_w = np.full(n, params.width, np.int64)
        else:  # allow-listed albumentations transforms: a per-sample generator seed
            apply = d.bernoulli(0, params.p)
            values["seed"] = d.bits(1)
        steps.append(StepDraw(name, params, apply, values, (h, w), (out_h, out_w)))
        h, w = out_h, out_w
    return steps
