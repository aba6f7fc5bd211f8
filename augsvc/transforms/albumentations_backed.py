"""Allow-listed albumentations transforms (regularizers), run with a per-sample generator.

Only the transforms that have a definition here can be built — never an arbitrary class name
from a request. Their parameters are capped by the schema. Each applied sample gets its own
generator seeded from (seed, epoch, sample_id, slot), so results do not depend on the batch.
These transforms draw inside albumentations, so strength scales their parameter ranges
(`build(params, strength)`) rather than their draws; a sample at strength 0 is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._albumentations import albumentations as A
from ..rng import Draws
from .base import Draw, PixelTransform


@dataclass(frozen=True)
class GeneratorSeeds:
    seed: np.ndarray                   # uint64 (N,): each applied sample's generator seed
    strength: np.ndarray | None = None  # (N,) float: the ranges' scale; None is 1 for every sample


class AlbumentationsTransform(PixelTransform[GeneratorSeeds]):
    """Base of an allow-listed transform: `build` makes the albumentations object from params,
    its magnitude ranges scaled by `strength` (in (0, 1])."""

    def build(self, params: Any, strength: float) -> A.BasicTransform:
        raise NotImplementedError

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, GeneratorSeeds]:
        return d.bernoulli(0, params.p), GeneratorSeeds(d.bits(1))

    def at_strength(self, apply: np.ndarray, values: GeneratorSeeds, strength: np.ndarray, params: Any,
                    heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, GeneratorSeeds]:
        return apply & (strength > 0), GeneratorSeeds(values.seed, strength)

    def apply(self, images: list[np.ndarray], draw: Draw[GeneratorSeeds]) -> list[np.ndarray]:
        # Built per call and strength (cheap next to the per-sample work): transforms hold
        # generator state, so a shared instance would not be thread-safe.
        built: dict[float, A.BasicTransform] = {}
        out = list(images)
        for n in np.flatnonzero(draw.apply):
            img = images[n]
            s = 1.0 if draw.values.strength is None else float(draw.values.strength[n])
            transform = built.get(s)
            if transform is None:
                transform = built[s] = self.build(draw.params, s)
            transform.set_random_seed(int(draw.values.seed[n]))
            res = np.asarray(transform(image=img)["image"])
            out[n] = np.ascontiguousarray(res.reshape(img.shape))
        return out
