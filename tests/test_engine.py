"""Contract tests for the engine: determinism (DESIGN contract 1), fused == albumentations on the
same draws, the statistics of the draws, one table row per transform kind (STYLE habit 6), and
input validation (contract 4)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from helpers.data import BENCH_SPEC
from scipy import stats

from augsvc import InvalidInputError, LimitExceededError, SpecError, augment_batch, load_spec
from augsvc.samples import sample_images
from augsvc.transforms import draw_steps

BACKENDS = ("fused", "albumentations")

#: Every transform kind, so that determinism covers every kind of draw (flip bits, uniform
#: angles and scales, color factors, crop boxes, per-sample generator seeds of the extras).
ALL_KINDS: dict[str, Any] = {
    "transforms": [
        {"hflip": {"p": 0.5}},
        {"vflip": {"p": 0.5}},
        {"rotate": {"limit_range": [-30, 30], "p": 0.9}},
        {"scale": {"scale_range": [0.8, 1.25], "p": 0.9}},
        {"color": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1, "p": 0.8}},
        {"random_resized_crop": {"height": 28, "width": 24, "scale_range": [0.3, 1.0]}},
        {"coarse_dropout": {"num_holes_range": [1, 3], "fill": 128, "p": 0.5}},
        {"gaussian_blur": {"sigma_range": [0.5, 1.5], "p": 0.5}},
        {"resize": {"height": 20, "width": 22}},
    ]
}


@functools.cache
def _cached_photos(count: int, side: int, channels: int) -> np.ndarray:
    images = sample_images(count, side, channels)
    images.flags.writeable = False
    return images


def photos(count: int, side: int, channels: int = 3) -> np.ndarray:
    """`count` distinct natural-photo crops (a fresh writable copy each call)."""
    return _cached_photos(count, side, channels).copy()


def ids_for(n: int, offset: int = 1000) -> np.ndarray:
    return (offset + 7 * np.arange(n)).astype(np.uint64)


def interior_mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference on the image interior (a margin of 1/8 of each side cropped)."""
    assert a.shape == b.shape
    mh, mw = a.shape[1] // 8, a.shape[2] // 8
    a = a[:, mh:a.shape[1] - mh, mw:a.shape[2] - mw].astype(np.int16)
    b = b[:, mh:b.shape[1] - mh, mw:b.shape[2] - mw].astype(np.int16)
    return float(np.abs(a - b).mean())


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample: do the two batches differ?"""
    return np.array([not np.array_equal(x, y) for x, y in zip(a, b, strict=True)])


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "n", "channels"), [
    ("fused", 256, 3), ("fused", 24, 1), ("albumentations", 24, 3), ("albumentations", 12, 1)])
def test_sample_does_not_depend_on_its_batch(backend: str, n: int, channels: int) -> None:
    images = photos(n, 32, channels)
    ids = ids_for(n)
    kw = {"seed": 42, "epoch": 3, "backend": backend}
    full = augment_batch(images, ALL_KINDS, sample_ids=ids, **kw)
    assert full.shape == (n, 20, 22, channels) and full.dtype == np.uint8

    picks = [0, 1, n // 2, n - 1]
    for i in picks:  # alone
        alone = augment_batch(images[i:i + 1], ALL_KINDS, sample_ids=ids[i:i + 1], **kw)
        np.testing.assert_array_equal(alone[0], full[i])

    order = np.arange(n)[::-1]  # every sample at another position
    np.testing.assert_array_equal(augment_batch(images[order], ALL_KINDS, sample_ids=ids[order], **kw),
                                  full[order])

    sub = np.array([n - 1, 3, 0, n // 2])  # a small batch of other neighbours
    np.testing.assert_array_equal(augment_batch(images[sub], ALL_KINDS, sample_ids=ids[sub], **kw), full[sub])

    # After other batches (another seed, another spec): no state carried over.
    augment_batch(images[:5], ALL_KINDS, sample_ids=ids[:5] + 1, seed=7, epoch=0, backend=backend)
    augment_batch(images[:5], BENCH_SPEC, sample_ids=ids[:5], seed=42, epoch=3, backend=backend)
    i = picks[-1]
    np.testing.assert_array_equal(augment_batch(images[i:i + 1], ALL_KINDS, sample_ids=ids[i:i + 1], **kw)[0],
                                  full[i])

    # Inside a list of images of other sizes (the spec ends with a sizing step).
    rng = np.random.default_rng(1)
    others = [rng.integers(0, 256, (48, 40, channels), dtype=np.uint8),
              rng.integers(0, 256, (20, 26, channels), dtype=np.uint8)]
    mixed = augment_batch([others[0], images[i], others[1]], ALL_KINDS,
                          sample_ids=[5, int(ids[i]), 6], **kw)
    np.testing.assert_array_equal(mixed[1], full[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_epoch_and_sample_id_change_the_output(backend: str) -> None:
    n = 16
    images = photos(n, 32)
    ids = ids_for(n)
    base = augment_batch(images, ALL_KINDS, seed=42, epoch=3, sample_ids=ids, backend=backend)
    variants = {
        "seed": augment_batch(images, ALL_KINDS, seed=43, epoch=3, sample_ids=ids, backend=backend),
        "epoch": augment_batch(images, ALL_KINDS, seed=42, epoch=4, sample_ids=ids, backend=backend),
        "sample_id": augment_batch(images, ALL_KINDS, seed=42, epoch=3, sample_ids=ids + 1, backend=backend),
    }
    for name, out in variants.items():
        assert _changed(base, out).all(), name
    again = augment_batch(images, ALL_KINDS, seed=42, epoch=3, sample_ids=ids, backend=backend)
    np.testing.assert_array_equal(base, again)


def test_sample_id_spellings_agree() -> None:
    images = photos(6, 32)
    ids = [3, 1, 4, 1, 5, 9]
    base = augment_batch(images, ALL_KINDS, seed=1, epoch=2, sample_ids=ids)
    for spelled in (np.array(ids, np.int64), np.array(ids, np.uint64), np.array(ids, np.int32), tuple(ids)):
        out = augment_batch(images, ALL_KINDS, seed=1, epoch=2, sample_ids=spelled)
        np.testing.assert_array_equal(out, base)
    for spec in (load_spec(ALL_KINDS), load_spec(ALL_KINDS).to_yaml(), ALL_KINDS["transforms"]):
        np.testing.assert_array_equal(augment_batch(images, spec, seed=1, epoch=2, sample_ids=ids), base)
    # Equal ids with equal pixels give equal outputs, whatever their positions.
    alone = augment_batch(images[1:2], ALL_KINDS, seed=1, epoch=2, sample_ids=[1])
    np.testing.assert_array_equal(base[1], alone[0])


def test_large_counters_are_accepted() -> None:
    images = photos(2, 32)
    top = 2**64 - 1
    a = augment_batch(images, ALL_KINDS, seed=top, epoch=top, sample_ids=np.array([top, 0], np.uint64))
    b = augment_batch(images[:1], ALL_KINDS, seed=top, epoch=top, sample_ids=np.array([top], np.uint64))
    np.testing.assert_array_equal(a[0], b[0])


NO_MUTATION_SPECS = {
    "all-kinds": ALL_KINDS,
    "color-only": [{"color": {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2, "p": 1}}],
    "extras-only": [{"coarse_dropout": {"p": 1.0}}, {"gaussian_blur": {"p": 1.0}}],
    "extras-then-color": [{"gaussian_blur": {"p": 0.5}}, {"color": {"brightness": 0.5, "p": 1}}],
    "identity": [{"hflip": {"p": 0.0}}],
    "empty": {"transforms": []},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec_name", list(NO_MUTATION_SPECS))
@pytest.mark.parametrize("form", ["array", "list", "non-contiguous", "read-only"])
def test_input_is_never_mutated(backend: str, spec_name: str, form: str) -> None:
    spec = NO_MUTATION_SPECS[spec_name]
    base = photos(6, 32)
    if form == "array":
        images: Any = base
    elif form == "list":
        images = list(base)
    elif form == "non-contiguous":
        images = base[:, ::-1]
    else:  # as decoded from wire bytes
        images = np.frombuffer(base.tobytes(), np.uint8).reshape(base.shape)
        base = images
    before = [im.copy() for im in images]
    out = augment_batch(images, spec, seed=0, epoch=0, sample_ids=np.arange(6), backend=backend)
    for im, old in zip(images, before, strict=True):
        np.testing.assert_array_equal(im, old)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert out is not images
    assert not np.shares_memory(out, base)
    out[...] = 1  # the output belongs to the caller
    np.testing.assert_array_equal(np.asarray(images), np.asarray(before))


# ---------------------------------------------------------------------------------------------
# fused == albumentations on the same draws
# ---------------------------------------------------------------------------------------------

def _one(name: str, **params: Any) -> list[dict[str, Any]]:
    return [{name: params}]



#: (id, spec, input side, channels, bound on the interior mean absolute difference)
EQUIVALENCE = [
    ("bench-32-rgb", BENCH_SPEC, 32, 3, 1.5),
    ("bench-32-gray", BENCH_SPEC, 32, 1, 1.5),
    ("bench-224-rgb", BENCH_SPEC, 224, 3, 1.5),
    ("bench-224-gray", BENCH_SPEC, 224, 1, 1.5),
    ("rotate-32-rgb", _one("rotate", limit_range=[-45, 45]), 32, 3, 1.5),
    ("rotate-224-gray", _one("rotate", limit_range=[-45, 45]), 224, 1, 1.5),
    ("scale-32-gray", _one("scale", scale_range=[0.6, 1.5]), 32, 1, 1.5),
    ("scale-224-rgb", _one("scale", scale_range=[0.6, 1.5]), 224, 3, 1.5),
    ("color-32-rgb", _one("color", brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1), 32, 3, 1.5),
    ("color-224-gray", _one("color", brightness=0.3, contrast=0.3), 224, 1, 1.5),
    ("color-all-32-gray", _one("color", brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1), 32, 1, 1.5),
    ("hflip-32-rgb", _one("hflip", p=0.5), 32, 3, 0.0),
    ("hflip-224-gray", _one("hflip", p=0.5), 224, 1, 0.0),
    ("vflip-32-gray", _one("vflip", p=0.5), 32, 1, 0.0),
    ("vflip-224-rgb", _one("vflip", p=0.5), 224, 3, 0.0),
    ("flips-32-rgb", [{"hflip": {"p": 0.5}}, {"vflip": {"p": 0.5}}], 32, 3, 0.0),
    ("rrc-224-rgb", _one("random_resized_crop", height=64, width=48), 224, 3, 1.5),
    ("rrc-32-gray", _one("random_resized_crop", height=24, width=24), 32, 1, 1.5),
    ("resize-down-224-rgb", _one("resize", height=56, width=64), 224, 3, 1.5),
    ("resize-up-32-gray", _one("resize", height=48, width=40), 32, 1, 1.5),
    ("flip-rotate-then-same-size-resize-64-rgb",
     [{"hflip": {"p": 0.5}}, {"rotate": {"limit_range": [-15, 15]}}, {"resize": {"height": 64, "width": 64}}],
     64, 3, 1.5),
    # A sizing step and a rotation are never fused into one warp (fused.py `_warp_group_end`):
    # one warp would resample once where the reference resamples twice.
    pytest.param(
        [{"random_resized_crop": {"height": 64, "width": 64}}, {"rotate": {"limit_range": [-15, 15]}}],
        224, 3, 1.5, id="rrc-then-rotate-224-to-64-rgb"),
    pytest.param(
        [{"hflip": {"p": 0.5}}, {"rotate": {"limit_range": [-15, 15]}},
         {"resize": {"height": 48, "width": 48}}], 32, 3, 1.5, id="flip-rotate-then-resize-32-to-48-rgb"),
    pytest.param(
        [{"resize": {"height": 32, "width": 32}}, {"rotate": {"limit_range": [-15, 15]}}], 224, 3, 1.5,
        id="resize-224-to-32-then-rotate-rgb"),
]


def _as_param(row: Any) -> Any:
    return pytest.param(*row[1:], id=row[0]) if type(row) is tuple else row


@pytest.mark.parametrize(("spec", "side", "channels", "bound"), [_as_param(row) for row in EQUIVALENCE])
def test_fused_matches_albumentations(spec: Any, side: int, channels: int, bound: float) -> None:
    images = photos(16, side, channels)
    kw = {"seed": 2024, "epoch": 1, "sample_ids": ids_for(16)}
    fused = augment_batch(images, spec, backend="fused", **kw)
    reference = augment_batch(images, spec, backend="albumentations", **kw)
    assert fused.shape == reference.shape and fused.dtype == reference.dtype == np.uint8
    if fused.shape == images.shape:  # the pipeline did something (else both could be no-ops)
        assert _changed(fused, images).sum() >= 4
    mae = interior_mae(fused, reference)
    if bound == 0.0:
        np.testing.assert_array_equal(fused, reference)
    assert mae <= bound, f"interior MAE {mae:.3f} > {bound}"


def _smooth_images(n: int, side: int) -> np.ndarray:
    """Low-frequency synthetic images: resampling order barely matters, geometry does."""
    y, x = np.mgrid[0:side, 0:side] / side
    base = 127 + 60 * np.sin(2 * np.pi * (1.3 * x + 0.4 * y))
    base += 60 * np.cos(2 * np.pi * (0.7 * y - 0.5 * x * x))
    img = base.astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(np.stack([img, img.T, 255 - img], -1), (n, side, side, 3)))


@pytest.mark.parametrize("spec", [
    [{"random_resized_crop": {"height": 64, "width": 64}}, {"hflip": {}},
     {"rotate": {"limit_range": [-45, 45]}}, {"scale": {"scale_range": [0.7, 1.3]}}],
    [{"resize": {"height": 48, "width": 96}}, {"rotate": {"limit_range": [-30, 30]}}, {"vflip": {}}],
    [{"rotate": {"limit_range": [-30, 30]}}, {"scale": {"scale_range": [0.5, 2.0]}}, {"hflip": {}},
     {"rotate": {"limit_range": [-30, 30]}}, {"resize": {"height": 100, "width": 64}}],
], ids=["rrc-flip-rotate-scale", "resize-rotate-vflip", "rotate-scale-flip-rotate-resize"])
def test_fused_warp_composes_like_the_steps_in_order(spec: Any) -> None:
    # One fused warp must put every pixel where the steps applied one by one put it.
    images = _smooth_images(8, 224)
    kw = {"seed": 3, "epoch": 0, "sample_ids": ids_for(8)}
    fused = augment_batch(images, spec, backend="fused", **kw)
    reference = augment_batch(images, spec, backend="albumentations", **kw)
    assert interior_mae(fused, reference) <= 1.5


# ---------------------------------------------------------------------------------------------
# one row per transform kind (STYLE habit 6)
# ---------------------------------------------------------------------------------------------

#: Input size of the table rows; not square, so that a swapped height/width shows.
ROW_H, ROW_W = 24, 36

#: (name, params that do something, params that must be the identity on ROW_H x ROW_W,
#:  output size or None, whether the step draws random values)
ROWS = [
    ("hflip", {"p": 0.5}, {"p": 0.0}, None, True),
    ("vflip", {"p": 0.5}, {"p": 0.0}, None, True),
    ("rotate", {"limit_range": [-40, 40]}, {"limit_range": [-40, 40], "p": 0.0}, None, True),
    ("scale", {"scale_range": [0.6, 1.5]}, {"scale_range": [0.6, 1.5], "p": 0.0}, None, True),
    ("color", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
     {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.0}, None, True),
    ("resize", {"height": 20, "width": 28}, {"height": ROW_H, "width": ROW_W}, (20, 28), False),
    ("random_resized_crop", {"height": 16, "width": 20},
     {"height": ROW_H, "width": ROW_W, "scale_range": [1, 1], "ratio_range": [ROW_W / ROW_H, ROW_W / ROW_H]},
     (16, 20), True),
    ("coarse_dropout", {"num_holes_range": [2, 4], "fill": 255, "p": 1.0},
     {"num_holes_range": [2, 4], "p": 0.0}, None, True),
    ("gaussian_blur", {"sigma_range": [1, 2], "p": 1.0}, {"sigma_range": [1, 2], "p": 0.0}, None, True),
    ("center_crop", {"height": 16, "width": 20}, {"height": ROW_H, "width": ROW_W}, (16, 20), False),
    ("translate", {"x_range": [-0.2, 0.2], "y_range": [-0.1, 0.3]}, {"x_range": [-0.2, 0.2], "p": 0.0}, None, True),
    ("resize_shorter", {"side": 20}, {"side": ROW_H}, (20, 30), False),
]
ROW_IDS = [row[0] for row in ROWS]


def test_rows_cover_every_transform_kind() -> None:
    from augsvc.spec import TRANSFORM_NAMES

    assert sorted(ROW_IDS) == sorted(TRANSFORM_NAMES)


def _row_images(channels: int) -> np.ndarray:
    return photos(8, 40, channels)[:, :ROW_H, :ROW_W].copy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("name", "params", "identity", "size", "random"), ROWS, ids=ROW_IDS)
def test_transform_row(name: str, params: dict[str, Any], identity: dict[str, Any],
                       size: tuple[int, int] | None, random: bool, channels: int, backend: str) -> None:
    images = _row_images(channels)
    n = len(images)
    spec = [{name: params}]
    kw = {"epoch": 0, "sample_ids": ids_for(n), "backend": backend}
    out = augment_batch(images, spec, seed=5, **kw)
    oh, ow = size or (ROW_H, ROW_W)
    assert out.dtype == np.uint8
    assert out.shape == (n, oh, ow, channels)

    # identity
    same = augment_batch(images, [{name: identity}], seed=5, **kw)
    np.testing.assert_array_equal(same, images)

    # fixed seed determinism; the seed matters only to steps that draw something
    np.testing.assert_array_equal(augment_batch(images, spec, seed=5, **kw), out)
    other = augment_batch(images, spec, seed=6, **kw)
    if random:
        assert _changed(out, other).any()
    else:
        np.testing.assert_array_equal(other, out)

    # the step does something
    if size is None:
        assert _changed(out, images).sum() >= 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "params", "identity", "size", "random"),
                         [row for row in ROWS if row[0] != "color"], ids=[i for i in ROW_IDS if i != "color"])
def test_transform_row_treats_channels_alike(name: str, params: dict[str, Any], identity: dict[str, Any],
                                            size: Any, random: bool, backend: str) -> None:
    # Geometry, cutout and blur act on each channel the same way: channel k of an RGB result is
    # the result for channel k alone.
    images = _row_images(3)
    kw = {"seed": 9, "epoch": 2, "sample_ids": ids_for(len(images)), "backend": backend}
    rgb = augment_batch(images, [{name: params}], **kw)
    for k in range(3):
        gray = augment_batch(np.ascontiguousarray(images[..., k:k + 1]), [{name: params}], **kw)
        np.testing.assert_array_equal(rgb[..., k:k + 1], gray)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_square_sizing_identity(backend: str, channels: int) -> None:
    images = photos(4, 32, channels)
    kw = {"seed": 1, "epoch": 0, "sample_ids": np.arange(4), "backend": backend}
    whole = {"height": 32, "width": 32, "scale_range": [1, 1], "ratio_range": [1, 1]}
    for spec in ([{"resize": {"height": 32, "width": 32}}],
                 [{"random_resized_crop": whole}],
                 [{"rotate": {"limit_range": [0, 0]}}, {"scale": {"scale_range": [1, 1]}}],
                 [{"color": {"p": 1.0}}]):
        np.testing.assert_array_equal(augment_batch(images, spec, **kw), images)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flips_compose(backend: str) -> None:
    images = photos(4, 32)
    kw = {"seed": 1, "epoch": 0, "sample_ids": np.arange(4), "backend": backend}
    out = augment_batch(images, [{"hflip": {"p": 1}}, {"vflip": {"p": 1}}], **kw)
    np.testing.assert_array_equal(out, images[:, ::-1, ::-1])
    out = augment_batch(images, [{"hflip": {"p": 1}}, {"hflip": {"p": 1}}], **kw)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(augment_batch(images, [{"rotate": {"limit_range": [180, 180]}}], **kw),
                                  images[:, ::-1, ::-1])


# ---------------------------------------------------------------------------------------------
# statistics of the draws
# ---------------------------------------------------------------------------------------------

N_STATS = 2000
STAT_IDS = np.arange(N_STATS, dtype=np.uint64)


def _draw(transforms: list[dict[str, Any]], heights: Any = 64, widths: Any = 64, seed: int = 123,
          epoch: int = 4) -> list[Any]:
    h = np.broadcast_to(np.asarray(heights, np.int64), (N_STATS,)).copy()
    w = np.broadcast_to(np.asarray(widths, np.int64), (N_STATS,)).copy()
    spec = load_spec(transforms)
    return draw_steps(spec, seed=seed, epoch=epoch, sample_ids=STAT_IDS, heights=h, widths=w)


def _within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("name", ["hflip", "vflip", "rotate", "color", "coarse_dropout"])
@pytest.mark.parametrize("p", [0.5, 0.2])
def test_apply_rate_is_p(name: str, p: float) -> None:
    params: dict[str, Any] = {"p": p}
    if name == "rotate":
        params["limit_range"] = [-10, 10]
    (step,) = _draw([{name: params}])
    assert step.apply.dtype == bool and step.apply.shape == (N_STATS,)
    assert _within_binomial(int(step.apply.sum()), N_STATS, p), step.apply.mean()


def test_apply_rate_extremes_and_independence() -> None:
    steps = _draw([{"hflip": {"p": 0.0}}, {"vflip": {"p": 1.0}},
                   {"hflip": {"p": 0.5}}, {"vflip": {"p": 0.5}}])
    assert not steps[0].apply.any()
    assert steps[1].apply.all()
    a, b = steps[2].apply, steps[3].apply
    # Two steps with the same p are independent, not copies of one draw.
    assert _within_binomial(int((a & b).sum()), N_STATS, 0.25)
    # Other seeds and epochs give other draws.
    again = _draw([{"hflip": {"p": 0.5}}], seed=124)[0].apply
    assert 0.4 < np.mean(again == _draw([{"hflip": {"p": 0.5}}])[0].apply) < 0.6


def _check_uniform(values: np.ndarray, lo: float, hi: float) -> None:
    assert values.shape == (N_STATS,)
    assert values.min() >= lo and values.max() <= hi
    span = hi - lo
    assert values.min() < lo + 0.01 * span and values.max() > hi - 0.01 * span
    assert stats.kstest(values, "uniform", args=(lo, span)).pvalue > 1e-3
    sd_mean = span / np.sqrt(12 * N_STATS)
    assert abs(values.mean() - (lo + hi) / 2) < 5 * sd_mean
    assert values.var() == pytest.approx(span**2 / 12, rel=0.1)


@pytest.mark.parametrize("limit_range", [[-15, 15], [-30, 10], [90, 180]])
def test_angles_are_uniform_on_limit_range(limit_range: list[float]) -> None:
    (step,) = _draw([{"rotate": {"limit_range": limit_range}}])
    assert step.apply.all()  # rotate's default p is 1
    _check_uniform(step.values.value, *limit_range)


@pytest.mark.parametrize("scale_range", [[0.9, 1.1], [0.5, 2.0]])
def test_scales_are_uniform_on_scale_range(scale_range: list[float]) -> None:
    (step,) = _draw([{"scale": {"scale_range": scale_range}}])
    _check_uniform(step.values.value, *scale_range)


def test_draws_of_different_steps_are_independent() -> None:
    rot, sca = _draw([{"rotate": {"limit_range": [-15, 15]}}, {"scale": {"scale_range": [0.9, 1.1]}}])
    r = np.corrcoef(rot.values.value, sca.values.value)[0, 1]
    assert abs(r) < 5 / np.sqrt(N_STATS)
    r = np.corrcoef(rot.values.value, rot.apply)[0, 1] if not rot.apply.all() else 0.0
    assert abs(r) < 5 / np.sqrt(N_STATS)


@pytest.mark.parametrize(("brightness", "contrast", "saturation", "hue"),
                         [(0.2, 0.2, 0.2, 0.05), (1.0, 0.5, 0.0, 0.5)])
def test_color_factors(brightness: float, contrast: float, saturation: float, hue: float) -> None:
    (step,) = _draw([{"color": {"brightness": brightness, "contrast": contrast, "saturation": saturation,
                                "hue": hue}}])
    for key, x in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        lo, hi = max(0.0, 1.0 - x), 1.0 + x
        values = getattr(step.values, key)
        if x == 0:
            np.testing.assert_array_equal(values, 1.0)
        else:
            _check_uniform(values, lo, hi)
    if hue:
        _check_uniform(step.values.hue, -hue, hue)


@pytest.mark.parametrize("channels", [3, 1])
def test_contrast_after_a_brightness_that_clips_uses_the_clipped_mean(channels: int) -> None:
    """Bright images whose brightness factor pushes levels past 255: contrast blends toward the
    gray mean of the clipped image, as the reference (and torchvision) measure it. Before, the
    fused backend scaled the mean taken before brightness, and whole images came out up to 10
    levels off at brightness = contrast = 0.8."""
    x = np.random.default_rng(0).integers(120, 256, (1, 48, 40, channels), np.uint8)
    images, ids = np.repeat(x, 32, 0), np.arange(32, dtype=np.uint64)
    spec = {"transforms": [{"color": {"brightness": 0.8, "contrast": 0.8}}]}
    (step,) = draw_steps(load_spec(spec), seed=0, epoch=0, sample_ids=ids, heights=np.full(32, 48),
                         widths=np.full(32, 40))
    assert (step.values.brightness * 255 >= 256).sum() >= 8  # enough of the batch clips
    fused = augment_batch(images, spec, seed=0, epoch=0, sample_ids=ids).astype(int)
    reference = augment_batch(images, spec, seed=0, epoch=0, sample_ids=ids, backend="albumentations").astype(int)
    per_image = np.abs(fused - reference).reshape(32, -1).mean(axis=1)
    assert per_image.max() < 0.05 and np.abs(fused - reference).max() <= 1


@pytest.mark.parametrize("border", ["constant", "reflect_101", "replicate"])
@pytest.mark.parametrize("step", [{"resize": {"height": 40, "width": 36}}, {"resize_shorter": {"side": 40}},
                                  {"random_resized_crop": {"height": 40, "width": 36, "scale_range": [0.1, 0.3]}}])
def test_sizing_steps_read_past_the_edge_as_cv2_resize_does(step: dict[str, Any], border: str) -> None:
    """An enlarging resize samples up to half a pixel past the image (or the crop's box): the
    edge pixel, as cv2.resize and the reference read it, whatever the spec's border (which is for
    rotate/scale/translate). Before, the fused warp used the border there: a dark frame with
    constant fill 0, the second row blended in with reflect_101, and a random_resized_crop read
    its box's neighbours."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (8, 13, 11, 3), np.uint8)
    spec = {"transforms": [step], "border": border, "fill": 0}
    ids = np.arange(8)
    fused = augment_batch(images, spec, seed=1, epoch=0, sample_ids=ids).astype(int)
    reference = augment_batch(images, spec, seed=1, epoch=0, sample_ids=ids, backend="albumentations").astype(int)
    assert np.abs(fused - reference).max() <= 1  # edges included (fixed-point warp vs cv2.resize: 1 level)
    white = np.full((2, 9, 7, 1), 255, np.uint8)
    assert (augment_batch(white, spec, seed=1, epoch=0, sample_ids=[0, 1]) == 255).all()


def test_a_crop_then_a_rotation_never_shows_what_the_crop_left_out() -> None:
    """center_crop then rotate: the rotation's corners are the border's (here the fill), as the
    reference crops first; before, the fused warp composed the two and showed the uncropped image
    there."""
    image = np.full((1, 40, 40, 3), 255, np.uint8)
    image[0, 10:30, 10:30] = 0  # the crop is all black
    spec = {"transforms": [{"center_crop": {"height": 20, "width": 20}}, {"rotate": {"limit_range": [45, 45]}}],
            "border": "constant", "fill": 0}
    for backend in ("fused", "albumentations"):
        out = augment_batch(image, spec, seed=0, epoch=0, sample_ids=[0], backend=backend)
        assert out.shape == (1, 20, 20, 3) and out.max() == 0, backend
    spec["transforms"].insert(0, {"hflip": {"p": 1.0}})  # a crop inside a warp run ends it before the rotation
    assert augment_batch(image, spec, seed=0, epoch=0, sample_ids=[0]).max() == 0


def _fallback_box(h: int, w: int, r_lo: float, r_hi: float) -> tuple[int, int, int, int]:
    """torchvision's centre-crop fallback of RandomResizedCrop: (x0, y0, w, h)."""
    ratio = w / h
    if ratio < r_lo:
        cw, ch = w, int(round(w / r_lo))
    elif ratio > r_hi:
        ch, cw = h, int(round(h * r_hi))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _fallback_probability(heights: np.ndarray, widths: np.ndarray, scale_range: tuple[float, float],
                          ratio_range: tuple[float, float], attempts: int = 10) -> np.ndarray:
    """Per sample: the chance that all attempts of torchvision's recipe miss (Monte Carlo)."""
    rng = np.random.default_rng(99)
    area_draw = rng.uniform(*scale_range, 20_000)
    ratio_draw = np.exp(rng.uniform(np.log(ratio_range[0]), np.log(ratio_range[1]), 20_000))
    out = np.empty(heights.size)
    for hh, ww in {(int(a), int(b)) for a, b in zip(heights, widths, strict=True)}:
        target = area_draw * hh * ww
        w = np.rint(np.sqrt(target * ratio_draw))
        h = np.rint(np.sqrt(target / ratio_draw))
        hit = ((w >= 1) & (h >= 1) & (w <= ww) & (h <= hh)).mean()
        out[(heights == hh) & (widths == ww)] = (1 - hit) ** attempts
    return out


@pytest.mark.parametrize(("scale_range", "ratio_range"),
                         [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.6), (1.0, 2.0)), ((0.2, 0.3), (0.5, 0.6))])
def test_random_resized_crop_boxes(scale_range: tuple[float, float],
                                   ratio_range: tuple[float, float]) -> None:
    rng = np.random.default_rng(0)
    heights = rng.choice([32, 64, 100, 224], size=N_STATS)
    widths = rng.choice([32, 48, 80, 300], size=N_STATS)
    params = {"height": 16, "width": 16, "scale_range": list(scale_range), "ratio_range": list(ratio_range)}
    (step,) = _draw([{"random_resized_crop": params}], heights=heights, widths=widths)
    assert step.apply.all()
    assert (step.out_size[0] == 16).all() and (step.out_size[1] == 16).all()
    x0, y0, w, h = (getattr(step.values, k).astype(np.int64) for k in ("x0", "y0", "w", "h"))
    # inside the image, never empty
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= widths).all() and (y0 + h <= heights).all()

    fallback = np.array([(a, b, c, d) == _fallback_box(int(hh), int(ww), *ratio_range)
                         for a, b, c, d, hh, ww in zip(x0, y0, w, h, heights, widths, strict=True)])
    drawn = ~fallback
    # The fallback is taken as often as torchvision's recipe (10 attempts) predicts for these sizes.
    p_fallback = _fallback_probability(heights, widths, scale_range, ratio_range)
    expected = p_fallback.sum()
    assert abs(fallback.sum() - expected) <= 5 * np.sqrt((p_fallback * (1 - p_fallback)).sum()) + 5, \
        (fallback.sum(), expected)
    # Sides are whole pixels: the area fraction and the aspect ratio hold up to rounding by 0.5.
    area = (heights * widths).astype(np.float64)
    s_lo, s_hi = scale_range
    r_lo, r_hi = ratio_range
    wd, hd = w[drawn].astype(np.float64), h[drawn].astype(np.float64)
    assert ((wd + 0.5) * (hd + 0.5) >= s_lo * area[drawn]).all()
    assert ((wd - 0.5) * (hd - 0.5) <= s_hi * area[drawn]).all()
    assert ((wd + 0.5) / (hd - 0.5) >= r_lo).all()
    assert ((wd - 0.5) / np.maximum(hd + 0.5, 1e-9) <= r_hi).all()
    # The area fractions spread over the range, and the boxes move around the image.
    fraction = wd * hd / area[drawn]
    assert fraction.min() < s_lo + 0.15 * (s_hi - s_lo) and fraction.max() > s_hi - 0.15 * (s_hi - s_lo)
    slack_x = (widths - w)[drawn]
    moved = slack_x > 4
    assert np.mean(x0[drawn][moved] == slack_x[moved] // 2) < 0.2


def test_random_resized_crop_falls_back_to_a_centre_crop() -> None:
    # A 10x100 strip cannot hold a square of 90% of its area: every attempt fails.
    (step,) = _draw([{"random_resized_crop": {"height": 8, "width": 8, "scale_range": [0.9, 1.0],
                                              "ratio_range": [1.0, 1.0]}}], heights=10, widths=100)
    for key, want in (("x0", 45), ("y0", 0), ("w", 10), ("h", 10)):
        np.testing.assert_array_equal(getattr(step.values, key), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "p"), [("hflip", 0.5), ("hflip", 0.2), ("vflip", 0.3)])
def test_flip_rate_from_pixels(backend: str, name: str, p: float) -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    mirrored = image[:, ::-1] if name == "hflip" else image[::-1]
    assert not np.array_equal(image, mirrored)
    batch = np.broadcast_to(image, (N_STATS, *image.shape)).copy()
    out = augment_batch(batch, [{name: {"p": p}}], seed=5, epoch=0, sample_ids=STAT_IDS, backend=backend)
    flipped = (out == mirrored).all(axis=(1, 2, 3))
    kept = (out == image).all(axis=(1, 2, 3))
    assert (flipped | kept).all(), "a flip step must output the image or its mirror"
    assert _within_binomial(int(flipped.sum()), N_STATS, p), flipped.mean()
    # The pixels follow the drawn parameters.
    (step,) = _draw([{name: {"p": p}}], seed=5, epoch=0)
    np.testing.assert_array_equal(flipped, step.apply)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

def _imgs(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    return np.zeros(shape, dtype)


BAD_INPUTS = [
    ("float32", _imgs((2, 8, 8, 3), np.float32), InvalidInputError),
    ("uint16", _imgs((2, 8, 8, 3), np.uint16), InvalidInputError),
    ("ndim-3", _imgs((8, 8, 3)), InvalidInputError),
    ("ndim-5", _imgs((1, 2, 8, 8, 3)), InvalidInputError),
    ("channels-2", _imgs((2, 8, 8, 2)), InvalidInputError),
    ("channels-4", _imgs((2, 8, 8, 4)), InvalidInputError),
    ("height-0", _imgs((2, 0, 8, 3)), InvalidInputError),
    ("width-0", _imgs((2, 8, 0, 1)), InvalidInputError),
    ("side-over-max", _imgs((2, 65, 8, 3)), LimitExceededError),
    ("list-float", [_imgs((8, 8, 3), np.float32)] * 2, InvalidInputError),
    ("list-channels-2", [_imgs((8, 8, 2))] * 2, InvalidInputError),
    ("list-mixed-channels", [_imgs((8, 8, 3)), _imgs((8, 8, 1))], InvalidInputError),
    ("list-not-array", [_imgs((8, 8, 3)), [[0]]], InvalidInputError),
    ("list-side-over-max", [_imgs((8, 8, 3)), _imgs((8, 70, 3))], LimitExceededError),
    ("list-mixed-size-without-sizing", [_imgs((8, 8, 3)), _imgs((9, 8, 3))], InvalidInputError),
]


@pytest.mark.parametrize(("images", "error"), [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_images_raise(images: Any, error: type[Exception], backend: str) -> None:
    with pytest.raises(error, match="images"):
        augment_batch(images, [{"hflip": {}}], seed=0, epoch=0, sample_ids=[0, 1], backend=backend,
                      max_side=64)


@pytest.mark.parametrize(("kwargs", "error", "field"), [
    ({"sample_ids": [0, 1, 2]}, InvalidInputError, "sample_ids"),
    ({"sample_ids": [0]}, InvalidInputError, "sample_ids"),
    ({"sample_ids": [0.5, 1.5]}, InvalidInputError, "sample_ids"),
    ({"seed": -1}, InvalidInputError, "seed"),
    ({"seed": 2**64}, InvalidInputError, "seed"),
    ({"seed": 1.5}, InvalidInputError, "seed"),
    ({"epoch": True}, InvalidInputError, "epoch"),
    ({"backend": "torchvision"}, InvalidInputError, "backend"),
    ({"spec": [{"hflip": {"p": 2}}]}, SpecError, "transforms"),
    ({"spec": [{"resize": {"height": 100, "width": 8}}]}, LimitExceededError, "spec"),
])
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], field: str) -> None:
    call: dict[str, Any] = {"spec": [{"hflip": {}}], "seed": 0, "epoch": 0, "sample_ids": [0, 1],
                            "max_side": 64}
    call.update(kwargs)
    spec = call.pop("spec")
    with pytest.raises(error, match=field):
        augment_batch(_imgs((2, 8, 8, 3)), spec, **call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_size_list_with_sizing_step(backend: str, channels: int) -> None:
    rng = np.random.default_rng(3)
    sizes = ((20, 30), (32, 32), (50, 17))
    images = [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in sizes]
    for spec in ([{"hflip": {}}, {"resize": {"height": 16, "width": 24}}],
                 [{"random_resized_crop": {"height": 16, "width": 24}}, {"color": {"brightness": 0.2}}]):
        out = augment_batch(images, spec, seed=0, epoch=0, sample_ids=[1, 2, 3], backend=backend)
        assert out.shape == (3, 16, 24, channels) and out.dtype == np.uint8
        for k, image in enumerate(images):  # each one as if alone
            alone = augment_batch(image[None], spec, seed=0, epoch=0, sample_ids=[k + 1], backend=backend)
            np.testing.assert_array_equal(out[k], alone[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("spec", "shape", "want"), [
    ([{"hflip": {}}], (0, 5, 6, 1), (0, 5, 6, 1)),
    ([{"hflip": {}}, {"color": {"brightness": 0.2}}], (0, 8, 8, 3), (0, 8, 8, 3)),
    ([{"resize": {"height": 3, "width": 4}}], (0, 5, 6, 1), (0, 3, 4, 1)),
    (ALL_KINDS, (0, 32, 32, 3), (0, 20, 22, 3)),
])
def test_empty_batch(backend: str, spec: Any, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    ids = np.zeros(0, np.uint64)
    out = augment_batch(_imgs(shape), spec, seed=0, epoch=0, sample_ids=ids, backend=backend)
    assert out.shape == want and out.dtype == np.uint8


def test_max_side_is_inclusive() -> None:
    out = augment_batch(_imgs((1, 64, 64, 3)), [{"hflip": {}}], seed=0, epoch=0, sample_ids=[0], max_side=64)
    assert out.shape == (1, 64, 64, 3)


def test_read_only_mixed_size_inputs_are_never_written() -> None:
    # A keep-size step before color on a list of mixed sizes: the fused warp's exact path must copy
    # (the decoded dataset layout hands workers read-only views of the shared pixels).
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((10, 12), (14, 9))]
    before = [im.copy() for im in images]
    for im in images:
        im.flags.writeable = False
    spec = [{"hflip": {"p": 0.0}}, {"color": {"brightness": 0.5, "p": 1.0}}, {"resize": {"height": 8, "width": 8}}]
    for backend in BACKENDS:
        out = augment_batch(images, spec, seed=0, epoch=0, sample_ids=[0, 1], backend=backend)
        assert out.shape == (2, 8, 8, 3)
    for im, was in zip(images, before, strict=True):
        np.testing.assert_array_equal(im, was)


def test_a_batch_over_max_bytes_is_refused_before_the_work() -> None:
    x = np.zeros((64, 2, 2, 1), np.uint8)
    with pytest.raises(LimitExceededError, match="augmented batch would be 67108864 bytes"):
        augment_batch(x, [{"resize_shorter": {"side": 1024}}], seed=0, epoch=0, sample_ids=np.arange(64),
                      max_bytes=1 << 20)
    # A step before the last may hold more than the batch limit (a crop of large images), up to
    # Limits.WORK_FACTOR times it; the output is held to the limit itself.
    grow_then_crop = [{"resize_shorter": {"side": 128}}, {"center_crop": {"height": 8, "width": 8}}]
    out = augment_batch(x, grow_then_crop, seed=0, epoch=0, sample_ids=np.arange(64), max_bytes=1 << 20)
    assert out.shape == (64, 8, 8, 1)  # the first step holds 64 x 128 x 128 = 1 MiB: within 16 MiB
    too_big = [{"resize_shorter": {"side": 600}}, {"center_crop": {"height": 8, "width": 8}}]
    with pytest.raises(LimitExceededError, match=r"step 0: its images would be 23040000 bytes, over a worker's limit"):
        augment_batch(x, too_big, seed=0, epoch=0, sample_ids=np.arange(64), max_bytes=1 << 20)
    empty = augment_batch(np.zeros((0, 8, 8, 1), np.uint8), [{"rotate": {"limit_range": [-5, 5]}}], seed=0,
                          epoch=0, sample_ids=[], strength=0.5)
    assert empty.shape == (0, 8, 8, 1)


def test_hue_tables_shift_every_hue_by_every_amount_mod_180() -> None:
    from augsvc.transforms.color import _shift_hue

    rng = np.random.default_rng(3)
    hsv = rng.integers(0, 256, (180, 180, 3), dtype=np.uint8)
    hsv[..., 0] = np.arange(180, dtype=np.uint8)[None, :]  # every hue on every row
    plane = np.empty(hsv.shape[:2], np.uint8)
    for k in range(180):
        got = hsv.copy()
        _shift_hue(got, k, plane)
        np.testing.assert_array_equal(got[..., 0], (hsv[..., 0].astype(np.int64) + k) % 180)
        np.testing.assert_array_equal(got[..., 1:], hsv[..., 1:])  # saturation and value untouched


def test_rgb_views_of_rgbx_pixels_warp_like_contiguous_images() -> None:
    # What a worker hands the engine from an encoded or files dataset: RGB views of RGBX buffers
    # (`augsvc.datasets.decode.decode`). The warp reads the 4-byte pixels as they are; the output
    # must be the bytes of the same images held as contiguous RGB, whatever the 4th byte holds.
    from augsvc.engine.fused import _rgbx_of

    rng = np.random.default_rng(5)
    rgb = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((90, 120), (131, 77), (64, 64))]
    flat = np.empty(sum(im.shape[0] * im.shape[1] * 4 for im in rgb), np.uint8)
    views, start = [], 0
    for im in rgb:
        h, w, _ = im.shape
        rgbx = flat[start:start + h * w * 4].reshape(h, w, 4)
        rgbx[..., :3], rgbx[..., 3] = im, rng.integers(0, 256, (h, w), dtype=np.uint8)
        views.append(rgbx[..., :3])
        start += h * w * 4
    assert all(_rgbx_of(v) is not None for v in views)
    spec = [{"rotate": {"limit_range": [-30, 30]}}, {"random_resized_crop": {"height": 56, "width": 64}},
            {"hflip": {"p": 0.5}}, {"color": {"brightness": 0.3, "saturation": 0.3, "hue": 0.2, "p": 1.0}}]
    for backend in BACKENDS:
        want = augment_batch(rgb, spec, seed=2, epoch=1, sample_ids=[4, 5, 6], backend=backend)
        got = augment_batch(views, spec, seed=2, epoch=1, sample_ids=[4, 5, 6], backend=backend)
        np.testing.assert_array_equal(got, want)
    # Only views whose 4th bytes are their owner's memory are read as RGBX: not the last three
    # channels of an RGBA image (the last pixel's 4th byte would lie past the end), nor RGB itself.
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    assert _rgbx_of(rgba[:, :, 1:]) is None
    assert _rgbx_of(rgb[0]) is None
    rows = _rgbx_of(rgba[2:5, :, :3])
    assert rows is not None and not rows.flags.writeable
    np.testing.assert_array_equal(rows, rgba[2:5])
