"""What a transform definition is, and what it produces: one `Draw` per step and batch.

A definition (one module per transform, named like the spec key) holds everything about its
transform: the random values it draws (typed, vectorized over the batch, from counter-based
`Draws`), its output size, and how each backend applies it —

- `GeometricTransform`: a forward 3x3 matrix per sample (source -> destination pixel
  coordinates). The fused backend composes the matrices of consecutive geometric steps into one
  warp; `resampling` says which steps may share that warp. The reference backend applies it
  with albumentations' own functions (`reference`), or, for affine steps, composes their
  albumentations matrices (`reference_matrix`) and warps once, as `A.Affine` does.
- `ColorTransform`: per-pixel value changes over the whole batch (`apply_inplace`) and one
  image at a time with albumentations' functions (`reference`).
- `PixelTransform`: an allow-listed albumentations transform, run with a per-sample generator;
  both backends apply it the same way.

A definition also says how a magnitude `strength` s in [0, 1] scales it (`at_strength`): a
sample's draw at strength s is its draw at strength 1 scaled, from the same underlying uniforms,
so two strengths differ only in magnitude. s = 1 leaves every value exactly as drawn; a
magnitude-bearing step is skipped (not applied at zero) where s = 0; sizing steps still size.

Conventions (albumentations 2.0.8, so one fused warp matches the reference): pixel centres at
integer coordinates, the image centre at (w/2 - 0.5, h/2 - 0.5), positive angles
counter-clockwise, resizing that maps pixel centres like cv2.resize.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import cv2
import numpy as np

from .._albumentations import fgeometric
from ..rng import Draws
from ..v1 import augment_pb2 as pb

__all__ = ["ColorTransform", "CropBoxes", "Draw", "GeometricTransform", "Mirror", "PixelTransform", "Resampling",
           "Scalars", "Transform", "UniformAffine", "WholeImageResize", "about_centre", "affine_reference_matrix",
           "crop_resize_matrices", "identity_matrices", "toward"]

V = TypeVar("V")


class Resampling(enum.Enum):
    """How a geometric step moves pixels, which decides what the fused backend may warp at once.

    EXACT steps (flips, crops) move whole pixels and join any warp. A warp resamples once: either a
    run of AFFINE steps together (rotate, scale, translate: as albumentations' Affine does), or one
    SIZE step (resize, random_resized_crop) — never a sizing step with another resampling step,
    whose two interpolations the reference backend keeps apart (fusing them would change pixels
    by several levels)."""

    EXACT = "exact"
    AFFINE = "affine"
    SIZE = "size"


@dataclass(frozen=True)
class Draw(Generic[V]):
    """One step's draws for a batch; arrays are indexed by position in the batch."""

    transform: Transform[V]
    params: Any                                   # the step's proto message, defaults filled
    apply: np.ndarray                             # bool (N,): the step acts on this sample
    values: V                                     # the transform's typed values, (N,) arrays
    in_size: tuple[np.ndarray, np.ndarray]        # (heights, widths) before the step
    out_size: tuple[np.ndarray, np.ndarray]       # (heights, widths) after it

    @property
    def name(self) -> str:
        return self.transform.name


class Transform(Generic[V]):
    """Base of every definition. Subclasses set `name` (the spec key) and implement `draw_values`."""

    name: str

    def draw(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray,
             strength: np.ndarray | None = None) -> Draw[V]:
        """Every random value of this step for a batch of images of the given sizes, at the
        per-sample `strength` (None: 1 for every sample)."""
        apply, values = self.draw_values(params, d, heights, widths)
        if strength is not None and not (strength == 1.0).all():
            apply, values = self.at_strength(apply, values, strength, params, heights, widths)
        return Draw(self, params, apply, values, (heights, widths), self.output_size(params, heights, widths))

    def at_strength(self, apply: np.ndarray, values: V, strength: np.ndarray, params: Any, heights: np.ndarray,
                    widths: np.ndarray) -> tuple[np.ndarray, V]:
        """The draws at per-sample strength (values exactly as drawn where it is 1). By default a
        step has no magnitude and strength leaves it alone (flips, resize, center_crop)."""
        return apply, values

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, V]:
        """(apply mask, typed values) for the batch; slot k of `d` is this step's draw k."""
        raise NotImplementedError

    def output_size(self, params: Any, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Image sizes after this step: the input's, unless the schema says the step sets them
        (`output_size = SETS_SIZE` on its proto message: params.height x params.width)."""
        if params.DESCRIPTOR.GetOptions().Extensions[pb.output_size] == pb.SETS_SIZE:
            n = heights.size
            return np.full(n, params.height, np.int64), np.full(n, params.width, np.int64)
        return heights, widths

    @staticmethod
    def always(d: Draws) -> np.ndarray:
        """The apply mask of a step without a probability."""
        return np.ones(d.sample_ids.size, bool)


class GeometricTransform(Transform[V]):
    """A step that moves pixels by a matrix."""

    resampling: ClassVar[Resampling]

    def matrices(self, draw: Draw[V]) -> np.ndarray:
        """(N, 3, 3) forward matrices; the identity where the step does not apply."""
        h, w = (a.astype(np.float64) for a in draw.in_size)
        oh, ow = (a.astype(np.float64) for a in draw.out_size)
        m = self.matrix(draw.values, h, w, oh, ow)
        m[~draw.apply] = np.eye(3)
        return m

    def matrix(self, values: V, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        """(N, 3, 3) matrices of the drawn values for images of h x w becoming oh x ow."""
        raise NotImplementedError

    def reference(self, image: np.ndarray, values: V, n: int, params: Any) -> Any:
        """The reference backend's application to sample n (EXACT and SIZE steps)."""
        raise NotImplementedError

    def reference_matrix(self, values: V, n: int, shape: tuple[int, int]) -> np.ndarray:
        """Sample n's albumentations affine matrix (AFFINE steps), for an image of `shape`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Scalars:
    """One drawn value per sample."""

    value: np.ndarray


class Mirror(GeometricTransform[None]):
    """A flip along one axis with probability p: whole pixels move (hflip: axis 1, vflip: axis 0)."""

    resampling = Resampling.EXACT

    def __init__(self, name: str, axis: int) -> None:
        self.name, self.axis = name, axis

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, None]:
        return d.bernoulli(0, params.p), None

    def matrix(self, values: None, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        m = identity_matrices(h.size)
        row = 1 - self.axis  # x is the matrix's row 0, y its row 1
        m[:, row, row] = -1.0
        m[:, row, 2] = (w if self.axis == 1 else h) - 1.0
        return m

    def reference(self, image: np.ndarray, values: None, n: int, params: Any) -> Any:
        return fgeometric.hflip(image) if self.axis == 1 else fgeometric.vflip(image)


class UniformAffine(GeometricTransform[Scalars]):
    """An affine step drawing one value per sample, uniform on the params field `range_field`, with
    probability p; strength moves the value linearly toward `identity` (subclasses may override)."""

    resampling = Resampling.AFFINE
    range_field: ClassVar[str]
    identity: ClassVar[float]

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, Scalars]:
        lo, hi = getattr(params, self.range_field)
        return d.bernoulli(0, params.p), Scalars(d.uniform(1, lo, hi))

    def at_strength(self, apply: np.ndarray, values: Scalars, strength: np.ndarray, params: Any,
                    heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, Scalars]:
        return apply & (strength > 0), Scalars(self.scaled(values.value, strength))

    def scaled(self, drawn: np.ndarray, strength: np.ndarray) -> np.ndarray:
        return toward(drawn, self.identity, strength)


class WholeImageResize(GeometricTransform[None]):
    """A deterministic resize of the whole image to `output_size` (bilinear, pixel centres as
    cv2.resize); the reference resizes with albumentations to the same size."""

    resampling = Resampling.SIZE

    def draw_values(self, params: Any, d: Draws, heights: np.ndarray, widths: np.ndarray
                    ) -> tuple[np.ndarray, None]:
        return self.always(d), None

    def matrix(self, values: None, h: np.ndarray, w: np.ndarray, oh: np.ndarray, ow: np.ndarray) -> np.ndarray:
        zero = np.zeros(h.size)
        return crop_resize_matrices(zero, zero, w, h, oh, ow)

    def reference(self, image: np.ndarray, values: None, n: int, params: Any) -> Any:
        oh, ow = self.output_size(params, np.array([image.shape[0]]), np.array([image.shape[1]]))
        return fgeometric.resize(image, (int(oh[0]), int(ow[0])), cv2.INTER_LINEAR)


class ColorTransform(Transform[V]):
    """A step that changes pixel values in place, over the whole batch at once."""

    def acts(self, params: Any) -> bool:
        """False when the parameters make the step the identity (nothing to copy or compute)."""
        return True

    def apply_inplace(self, images: list[np.ndarray], values: V, index: np.ndarray, params: Any) -> None:
        """Change `images` (contiguous, owned (H, W, C) arrays of the samples `index`) in place."""
        raise NotImplementedError

    def reference(self, image: np.ndarray, values: V, n: int, params: Any) -> Any:
        """The reference backend's application to sample n."""
        raise NotImplementedError


class PixelTransform(Transform[V]):
    """A step that maps each image to a new one of the same size; both backends share it."""

    def apply(self, images: list[np.ndarray], draw: Draw[V]) -> list[np.ndarray]:
        """New images for the samples the step applies to; the others pass through."""
        raise NotImplementedError


def identity_matrices(n: int) -> np.ndarray:
    """(n, 3, 3) identity matrices (a fresh array)."""
    return np.broadcast_to(np.eye(3), (n, 3, 3)).copy()


def about_centre(linear: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """T(c) @ L @ T(-c) for 2x2 linear parts `linear` (N, 2, 2) and the centres of h x w images."""
    m = identity_matrices(linear.shape[0])
    m[:, :2, :2] = linear
    c = np.stack([w / 2.0 - 0.5, h / 2.0 - 0.5], axis=1)           # (N, 2)
    m[:, :2, 2] = c - np.einsum("nij,nj->ni", linear, c)
    return m


@dataclass(frozen=True)
class CropBoxes:
    """Integer crop boxes, (N,) each: left, top, width, height."""

    x0: np.ndarray
    y0: np.ndarray
    w: np.ndarray
    h: np.ndarray


def crop_resize_matrices(x0: np.ndarray, y0: np.ndarray, cw: np.ndarray, ch: np.ndarray, oh: np.ndarray,
                         ow: np.ndarray) -> np.ndarray:
    """Matrices that map the box (x0, y0, cw, ch) onto an oh x ow image, pixel centres as cv2.resize."""
    m = identity_matrices(x0.shape[0])
    sx, sy = ow / cw, oh / ch
    m[:, 0, 0] = sx
    m[:, 1, 1] = sy
    m[:, 0, 2] = (0.5 - x0) * sx - 0.5
    m[:, 1, 2] = (0.5 - y0) * sy - 0.5
    return m


_NO_SHIFT = {"x": 0.0, "y": 0.0}


def affine_reference_matrix(shape: tuple[int, int], *, rotate: float = 0.0, scale: float = 1.0,
                            translate: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """albumentations' own affine matrix (what `A.Affine` builds) about the centre of `shape`;
    `translate` is (x, y) in pixels."""
    m: np.ndarray = fgeometric.create_affine_transformation_matrix(
        translate={"x": translate[0], "y": translate[1]}, shear=_NO_SHIFT, scale={"x": scale, "y": scale},
        rotate=rotate, shift=fgeometric.center(shape))
    return m


def toward(drawn: np.ndarray, identity: float, strength: np.ndarray) -> np.ndarray:
    """`drawn` moved toward `identity` linearly: identity + s * (drawn - identity), exactly `drawn`
    where s is 1."""
    return np.where(strength == 1.0, drawn, identity + strength * (drawn - identity))
