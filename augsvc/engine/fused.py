"""The fused backend: one warp per image for each run of consecutive geometric steps, and color
math over the whole batch at once. Applies exactly the draws of `params.draw_params`."""

from __future__ import annotations

import cv2
import numpy as np

from ..spec import GEOMETRIC, Spec
from .color import jitter_inplace
from .extras import apply_extra
from .geometry import group_matrices
from .params import StepDraw

BORDERS = {"reflect_101": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT,
           "replicate": cv2.BORDER_REPLICATE}

Images = np.ndarray | list[np.ndarray]


def _as_list(work: Images) -> list[np.ndarray]:
    return list(work) if isinstance(work, np.ndarray) else work


def _stack_if_uniform(images: list[np.ndarray]) -> Images:
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


# OpenCV 5's bilinear warp moves 4-channel pixels much faster than 3-channel ones (measured:
# 224x224, 366 -> 243 us), so RGB images of this many pixels or more are warped as RGBA; the two
# conversions cost ~13 us each and the channels come out bit-identical.
_RGBA_MIN_PIXELS = 48 * 48


class _Scratch:
    """Reused RGBA buffers for one batch's warps (one shape at a time)."""

    def __init__(self) -> None:
        self.src: np.ndarray | None = None
        self.dst: np.ndarray | None = None

    def get(self, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if self.src is None or self.src.shape[:2] != src_hw:
            self.src = np.empty((*src_hw, 4), np.uint8)
        if self.dst is None or self.dst.shape[:2] != dst_hw:
            self.dst = np.empty((*dst_hw, 4), np.uint8)
        return self.src, self.dst


def _warp_one(src: np.ndarray, m: np.ndarray, oh: int, ow: int, dst: np.ndarray | None,
              border: int, fill: float, scratch: _Scratch) -> np.ndarray:
    """Warp one (H,W,C) image by the 3x3 matrix `m`; exact slicing for identity and flips."""
    h, w = src.shape[:2]
    if (oh, ow) == (h, w) and m[0, 1] == 0 and m[1, 0] == 0 and abs(m[0, 0]) == 1 and abs(m[1, 1]) == 1:
        fx, fy = m[0, 0] < 0, m[1, 1] < 0
        if m[0, 2] == (w - 1 if fx else 0) and m[1, 2] == (h - 1 if fy else 0):
            view = src[::-1 if fy else 1, ::-1 if fx else 1]
            if dst is None:
                return np.ascontiguousarray(view)
            dst[...] = view.reshape(dst.shape)
            return dst
    channels = src.shape[2]
    if dst is None:
        dst = np.empty((oh, ow, channels), np.uint8)
    fills = (fill, fill, fill, fill)
    if channels == 3 and oh * ow >= _RGBA_MIN_PIXELS:
        src4, dst4 = scratch.get((h, w), (oh, ow))
        cv2.cvtColor(src, cv2.COLOR_RGB2RGBA, dst=src4)
        cv2.warpAffine(src4, m[:2], (ow, oh), dst=dst4, flags=cv2.INTER_LINEAR, borderMode=border,
                       borderValue=fills)
        cv2.cvtColor(dst4, cv2.COLOR_RGBA2RGB, dst=dst)
        return dst
    target = dst if channels == 3 else dst.reshape(oh, ow)
    cv2.warpAffine(src, m[:2], (ow, oh), dst=target, flags=cv2.INTER_LINEAR, borderMode=border, borderValue=fills)
    return dst


def _warp(work: Images, group: list[StepDraw], spec: Spec, into: np.ndarray | None = None) -> Images:
    m = group_matrices(group)
    oh, ow = group[-1].out_size
    border = BORDERS[spec.border]
    n = m.shape[0]
    channels = work[0].shape[-1] if n else 1
    scratch = _Scratch()
    if n and (oh == oh[0]).all() and (ow == ow[0]).all():
        shape = (n, int(oh[0]), int(ow[0]), channels)
        sources = work if isinstance(work, list) else [work]
        usable = into is not None and into.shape == shape and not any(np.shares_memory(into, w) for w in sources)
        out = into if usable and into is not None else np.empty(shape, np.uint8)
        for i in range(n):
            _warp_one(work[i], m[i], int(oh[0]), int(ow[0]), out[i], border, spec.fill, scratch)
        return out
    return [_warp_one(work[i], m[i], int(oh[i]), int(ow[i]), None, border, spec.fill, scratch) for i in range(n)]


def _color(work: Images, step: StepDraw, owned: bool) -> Images:
    idx = np.flatnonzero(step.apply)
    p = step.params
    flags = {"use_brightness": p.brightness > 0, "use_contrast": p.contrast > 0,
             "use_saturation": p.saturation > 0, "use_hue": p.hue > 0}
    if idx.size == 0 or not any(flags.values()):
        return work
    if not owned:  # never write into the caller's images
        work = work.copy() if isinstance(work, np.ndarray) else [im.copy() for im in work]
    v = step.values
    jitter_inplace([work[i] for i in idx], v["brightness"][idx], v["contrast"][idx],
                   v["saturation"][idx], v["hue"][idx], **flags)
    return work


_RESAMPLING = {"rotate": "turn", "scale": "turn", "resize": "size", "random_resized_crop": "size"}


def _warp_group_end(steps: list[StepDraw], i: int) -> int:
    """End of the run of geometric steps from i that one warp applies. Flips are exact and join
    any run; a run resamples once: rotate/scale steps together (as albumentations' Affine), or
    one sizing step — never a sizing step with another resampling step, whose two interpolations
    the reference backend keeps apart (fusing them changes pixels by several levels)."""
    kinds: set[str] = set()
    j = i
    while j < len(steps) and steps[j].name in GEOMETRIC:
        kind = _RESAMPLING.get(steps[j].name)
        if kind is not None:
            if "size" in kinds or (kind == "size" and kinds):
                break
            kinds.add(kind)
        j += 1
    return j


def run_fused(work: Images, steps: list[StepDraw], spec: Spec, out: np.ndarray | None = None) -> Images:
    """Apply `steps` to `work` ((N,H,W,C) array or list of (H,W,C) arrays); warps write into
    `out` when it has their shape (later in-place color steps then work there too)."""
    i = 0
    owned = False  # True once `work` is an array this function allocated
    while i < len(steps):
        step = steps[i]
        if step.name in GEOMETRIC:
            j = _warp_group_end(steps, i)
            work = _warp(work, steps[i:j], spec, out)
            owned = True
            i = j
            continue
        if step.name == "color":
            work = _color(work, step, owned)
        else:
            work = _stack_if_uniform(apply_extra(step, _as_list(work)))
            owned = isinstance(work, np.ndarray)  # a list may still hold the caller's images
        i += 1
    return work
