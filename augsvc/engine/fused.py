"""The fused backend: one warp per image for each run of consecutive geometric steps, and color
math over the whole batch at once. Applies exactly the draws of `transforms.draw_steps`.

A warp run reads its input as the reference's steps would: where a run's crop (center_crop,
random_resized_crop) has only flips and crops before it, the warp reads a view of that crop's
box (mapped back through them to the input), so that what lies outside the box is never read
(the border mode applies at the box's edges, as the reference crops first); a crop after a
resampling step ends the run before any later resampling step (which would read past the crop);
and a run without rotate/scale/translate — crops, flips and one sizing step — reads past the
image's edge as cv2.resize does (the edge pixel), whatever the spec's border, which is for the
affine steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import cv2
import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]

from ..spec import Spec
from ..transforms import ColorTransform, CropBoxes, Draw, GeometricTransform, PixelTransform, Resampling
from .images import BORDERS, Images, as_list, stack_if_uniform

# OpenCV 5's bilinear warp moves 4-channel pixels much faster than 3-channel ones (measured:
# 224x224, 366 -> 243 us), so RGB images of this many pixels or more are warped as RGBA and the
# channels come out bit-identical. Converting a ~400x370 source to RGBA costs ~30 us (skipped when
# it is already RGBX: `_rgbx_of`), the 224x224 result back to RGB ~3 us.
_RGBA_MIN_PIXELS = 48 * 48


class _Scratch:
    """Reused RGBA buffers for one batch's warps: each a view of a flat buffer that only grows, so
    that images of many sizes cost a few allocations (and their page faults), not one each."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def rgba(self, key: str, hw: tuple[int, int]) -> np.ndarray:
        n = hw[0] * hw[1] * 4
        flat = self._flat.get(key)
        if flat is None or flat.size < n:
            flat = self._flat[key] = np.empty(n, np.uint8)
        return flat[:n].reshape(hw[0], hw[1], 4)


def _rgbx_of(src: np.ndarray) -> np.ndarray | None:
    """The (H, W, 4) array whose first three channels are `src`, when `src` is such a view of
    4-byte pixels (what a decoder writing RGBX gives, `augsvc.datasets.decode.decode`): the warp
    then reads it as it is, without converting RGB to RGBA first. None otherwise. The fourth
    byte's value never matters: the warp treats each channel alone."""
    h, w, c = src.shape
    row = src.strides[0]
    if c != 3 or src.strides[1:] != (4, 1) or row < 4 * w:  # rows of 4-byte pixels (a box of them too)
        return None
    owner = src
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    low, high = byte_bounds(owner)
    start = src.__array_interface__["data"][0]
    if not low <= start <= start + row * (h - 1) + 4 * w <= high:  # the 4th bytes are the owner's memory
        return None
    return np.lib.stride_tricks.as_strided(src, (h, w, 4), (row, 4, 1), writeable=False)


def _axis_slice(scale: float, shift: float, out: int, size: int) -> slice | None:
    """The source slice that dst = scale * src + shift maps onto [0, out) along one axis, when
    that moves whole pixels (scale +-1, an integer shift) inside the image; else None."""
    if abs(scale) != 1.0 or shift != int(shift):
        return None
    t = int(shift)
    if scale > 0:
        first, last = -t, out - 1 - t                 # src = dst - t
        return slice(first, last + 1) if 0 <= first and last < size else None
    first, last = t, t - (out - 1)                     # src = t - dst, walking backwards
    if not (last >= 0 and first < size):
        return None
    return slice(first, last - 1 if last > 0 else None, -1)


def _exact_view(src: np.ndarray, m: np.ndarray, oh: int, ow: int) -> np.ndarray | None:
    """`src` moved by `m` as a view, when `m` only flips and shifts by whole pixels within the
    image (identity, flips, crops): exact, and no interpolation to pay for."""
    if m[0, 1] != 0 or m[1, 0] != 0:
        return None
    xs = _axis_slice(float(m[0, 0]), float(m[0, 2]), ow, src.shape[1])
    ys = _axis_slice(float(m[1, 1]), float(m[1, 2]), oh, src.shape[0])
    return None if xs is None or ys is None else src[ys, xs]


def _warp_one(src: np.ndarray, m: np.ndarray, oh: int, ow: int, dst: np.ndarray | None,
              border: int, fill: float, scratch: _Scratch) -> np.ndarray:
    """Warp one (H,W,C) image by the 3x3 matrix `m` into an oh x ow image."""
    view = _exact_view(src, m, oh, ow)
    if view is not None:
        if dst is None:  # a copy even when the view is the whole image: later steps write in place
            return np.array(view, order="C")
        dst[...] = view.reshape(dst.shape)
        return dst
    h, w, channels = src.shape
    if dst is None:
        dst = np.empty((oh, ow, channels), np.uint8)
    fills = (fill, fill, fill, fill)
    if channels == 3 and oh * ow >= _RGBA_MIN_PIXELS:
        dst4, src4 = scratch.rgba("dst", (oh, ow)), _rgbx_of(src)
        if src4 is None:
            src4 = scratch.rgba("src", (h, w))
            cv2.cvtColor(src, cv2.COLOR_RGB2RGBA, dst=src4)
        cv2.warpAffine(src4, m[:2], (ow, oh), dst=dst4, flags=cv2.INTER_LINEAR, borderMode=border,
                       borderValue=fills)
        cv2.cvtColor(dst4, cv2.COLOR_RGBA2RGB, dst=dst)
        return dst
    target = dst if channels == 3 else dst.reshape(oh, ow)
    cv2.warpAffine(src, m[:2], (ow, oh), dst=target, flags=cv2.INTER_LINEAR, borderMode=border, borderValue=fills)
    return dst


def _run_matrices(run: list[Draw[Any]]) -> np.ndarray:
    """The composite (N,3,3) matrix of consecutive geometric steps (first step applied first)."""
    total: np.ndarray | None = None
    for draw in run:
        transform = draw.transform
        assert isinstance(transform, GeometricTransform)
        m = transform.matrices(draw)
        total = m if total is None else m @ total
    assert total is not None
    return total


def reads_in_warp(draws: list[Draw[Any]]) -> bool:
    """Whether `run_fused` reads its input images only in its first warp, one image at a time (a
    spec that starts with a geometric step): it can then take `read`."""
    return bool(draws) and isinstance(draws[0].transform, GeometricTransform)


def _run_border(run: list[Draw[Any]], spec: Spec) -> str:
    """The border mode a run's warp reads past its input's edge with: the spec's where the run
    rotates, scales or translates; else the edge pixel, as cv2.resize (and the reference) read."""
    affine = any(cast(GeometricTransform[Any], d.transform).resampling is Resampling.AFFINE for d in run)
    return spec.border if affine else "replicate"


def _leading_box(run: list[Draw[Any]]) -> CropBoxes | None:
    """The box, in the run's input, of the last crop that only whole-pixel steps (flips, crops)
    precede: the warp reads a view of it. None when the run has no such crop."""
    k = None
    for j, d in enumerate(run):
        if isinstance(d.values, CropBoxes):
            k = j
        if cast(GeometricTransform[Any], d.transform).resampling is not Resampling.EXACT:
            break
    if k is None:
        return None
    box = cast(CropBoxes, run[k].values)
    if k == 0:
        return box
    inverse = np.linalg.inv(_run_matrices(run[:k]))  # whole-pixel maps: exact integers
    xs = inverse[:, 0, 0, None] * np.stack([box.x0, box.x0 + box.w - 1], 1) + inverse[:, 0, 1, None] * \
        np.stack([box.y0, box.y0 + box.h - 1], 1) + inverse[:, 0, 2, None]
    ys = inverse[:, 1, 0, None] * np.stack([box.x0, box.x0 + box.w - 1], 1) + inverse[:, 1, 1, None] * \
        np.stack([box.y0, box.y0 + box.h - 1], 1) + inverse[:, 1, 2, None]
    return CropBoxes(np.rint(xs.min(1)).astype(np.int64), np.rint(ys.min(1)).astype(np.int64), box.w, box.h)


def _from_box(m: np.ndarray, box: CropBoxes) -> np.ndarray:
    """The matrices `m` (of the whole input) for inputs that are views of the boxes."""
    shift = np.broadcast_to(np.eye(3), m.shape).copy()
    shift[:, 0, 2], shift[:, 1, 2] = box.x0, box.y0
    result: np.ndarray = m @ shift
    return result


def _warp(work: Images, run: list[Draw[Any]], spec: Spec, into: np.ndarray | None = None,
          read: Callable[[int], None] | None = None) -> Images:
    m = _run_matrices(run)
    oh, ow = run[-1].out_size
    border = BORDERS[_run_border(run, spec)]
    box = _leading_box(run)
    if box is not None:
        m = _from_box(m, box)

    def source(i: int) -> np.ndarray:
        if box is None:
            return work[i]
        x0, y0 = int(box.x0[i]), int(box.y0[i])
        return work[i][y0:y0 + int(box.h[i]), x0:x0 + int(box.w[i])]

    n = m.shape[0]
    channels = work[0].shape[-1] if n else 1
    scratch = _Scratch()
    if n and (oh == oh[0]).all() and (ow == ow[0]).all():
        shape = (n, int(oh[0]), int(ow[0]), channels)
        sources = work if isinstance(work, list) else [work]
        usable = into is not None and into.shape == shape and not any(np.shares_memory(into, w) for w in sources)
        out = into if usable and into is not None else np.empty(shape, np.uint8)
        for i in range(n):
            if read is not None:
                read(i)
            _warp_one(source(i), m[i], int(oh[0]), int(ow[0]), out[i], border, spec.fill, scratch)
        return out
    warped = []
    for i in range(n):
        if read is not None:
            read(i)
        warped.append(_warp_one(source(i), m[i], int(oh[i]), int(ow[i]), None, border, spec.fill, scratch))
    return warped


def read_boxes(draws: list[Draw[Any]], spec: Spec, heights: np.ndarray, widths: np.ndarray) -> np.ndarray | None:
    """(N, 4) int64 rows x0, y0, x1, y1: the rectangle of each input image that `run_fused` reads
    when it applies `draws`; None when it reads whole images. Pixels outside it never reach the
    output, so a decoder may leave them undecoded (`augsvc.datasets.decode_region`).

    Only a spec that starts with geometric steps reads less than the whole image (a color step
    first would read every pixel). The first warp's output corners map back to a box in the
    source; the bilinear warp reads the pixel at the floor of each coordinate and the next one,
    so the box grows by 2 pixels each way (floating-point slack included). Where it leaves the
    image, the border mode says what is read instead: nothing (constant), the edge (replicate,
    inside the clamped box) or a mirror image (reflect_101: the box takes in the mirrored part)."""
    if not reads_in_warp(draws):
        return None
    run = draws[:_warp_run_end(draws, 0)]
    m = _run_matrices(run)
    oh, ow = (a.astype(np.float64) for a in run[-1].out_size)
    box = _leading_box(run)
    if box is not None:  # the warp reads a view of the box: work in its coordinates, then shift back
        m = _from_box(m, box)
        heights, widths = box.h, box.w
    try:
        inverse = np.linalg.inv(m)
    except np.linalg.LinAlgError:
        return None
    corners = np.stack([np.zeros_like(ow), ow - 1, np.zeros_like(ow), ow - 1], axis=1), \
        np.stack([np.zeros_like(oh), np.zeros_like(oh), oh - 1, oh - 1], axis=1)
    xs = inverse[:, 0, 0, None] * corners[0] + inverse[:, 0, 1, None] * corners[1] + inverse[:, 0, 2, None]
    ys = inverse[:, 1, 0, None] * corners[0] + inverse[:, 1, 1, None] * corners[1] + inverse[:, 1, 2, None]
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None
    h, w = heights.astype(np.int64), widths.astype(np.int64)
    border = _run_border(run, spec)
    x0, x1 = _axis_reads(np.floor(xs.min(axis=1)), np.floor(xs.max(axis=1)), w, border)
    y0, y1 = _axis_reads(np.floor(ys.min(axis=1)), np.floor(ys.max(axis=1)), h, border)
    if box is not None:
        x0, x1, y0, y1 = x0 + box.x0, x1 + box.x0, y0 + box.y0, y1 + box.y0
    return np.stack([x0, y0, x1, y1], axis=1)


def _axis_reads(low: np.ndarray, high: np.ndarray, size: np.ndarray, border: str) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) of the pixels along one axis a bilinear warp reads for coordinates whose
    floors span [low, high], in an image of `size` pixels with this border mode."""
    big = np.float64(2.0**40)
    start = np.clip(low - 2, -big, big).astype(np.int64)
    stop = np.clip(high + 3, -big, big).astype(np.int64)
    if border == "reflect_101":  # pixel -k reads k, pixel size-1+k reads size-1-k
        mirrored_stop = np.where(start < 0, -start + 1, stop)
        mirrored_start = np.where(stop > size, 2 * (size - 1) - (stop - 1), start)
        start, stop = np.minimum(start, mirrored_start), np.maximum(stop, mirrored_stop)
    start, stop = np.clip(start, 0, size), np.clip(stop, 0, size)
    whole = stop <= start  # nothing inside the image is read (all border): any valid box will do
    return np.where(whole, 0, start), np.where(whole, size, stop)


def _warp_run_end(draws: list[Draw[Any]], i: int) -> int:
    """End of the run of geometric steps from i that one warp applies (see `Resampling`)."""
    kinds: set[Resampling] = set()
    cropped = False  # a crop after a resampling step: no resampling may follow it
    exact = True     # only flips and crops so far: a crop here is the box the warp views
    j = i
    while j < len(draws) and isinstance(transform := draws[j].transform, GeometricTransform):
        kind = transform.resampling
        crops = isinstance(draws[j].values, CropBoxes)
        if kind is not Resampling.EXACT:
            if cropped or Resampling.SIZE in kinds or (kind is Resampling.SIZE and kinds):
                break
            if crops and not exact:  # a resampling crop reads at its box's edges
                break
            kinds.add(kind)
        cropped = cropped or (crops and not exact)
        exact = exact and kind is Resampling.EXACT
        j += 1
    return j


def _color(work: Images, draw: Draw[Any], transform: ColorTransform[Any], owned: bool) -> Images:
    index = np.flatnonzero(draw.apply)
    if index.size == 0 or not transform.acts(draw.params):
        return work
    if not owned:  # never write into the caller's images
        work = work.copy() if isinstance(work, np.ndarray) else [im.copy() for im in work]
    transform.apply_inplace([work[i] for i in index], draw.values, index, draw.params)
    return work


def run_fused(work: Images, draws: list[Draw[Any]], spec: Spec, out: np.ndarray | None = None,
              read: Callable[[int], None] | None = None) -> Images:
    """Apply `draws` to `work` ((N,H,W,C) array or list of (H,W,C) arrays); warps write into
    `out` when it has their shape (later in-place color steps then work there too). read(i), when
    given (only where `reads_in_warp`), fills work[i] just before the first warp reads it."""
    if read is not None and not reads_in_warp(draws):
        raise ValueError("read: this spec reads its images before its first warp")
    i = 0
    owned = False  # True once `work` is an array this function allocated
    while i < len(draws):
        transform = draws[i].transform
        if isinstance(transform, GeometricTransform):
            j = _warp_run_end(draws, i)
            work = _warp(work, draws[i:j], spec, out, read if i == 0 else None)
            owned = True
            i = j
            continue
        if isinstance(transform, ColorTransform):
            work = _color(work, draws[i], transform, owned)
        elif isinstance(transform, PixelTransform):
            work = stack_if_uniform(transform.apply(as_list(work), draws[i]))
            owned = isinstance(work, np.ndarray)  # a list may still hold the caller's images
        i += 1
    return work
