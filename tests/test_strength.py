"""Augmentation strength (the magnitude knob the adaptive controller turns): each transform's
scaling rule on its draws (table-driven), strength 0 as the identity of every magnitude step,
per-class vectors applied by label on the server, determinism across workers at every strength,
and a stream that takes a new strength at an epoch boundary."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.data import served_digits
from helpers.servers import serve

from augsvc import SpecError, augment_batch, load_spec
from augsvc.server import ServerSettings
from augsvc.transforms import TRANSFORMS, draw_steps
from augsvc.transforms.albumentations_backed import AlbumentationsTransform
from augsvc.v1 import augment_pb2 as pb
from trainer_client import AugmentClient, AugmentedStream

BACKENDS = ("fused", "albumentations")
N = 400
IDS = np.arange(N, dtype=np.uint64)
H, W = 40, 56
LEVELS = np.array([0.0, 0.25, 0.5, 0.9, 1.0])

#: A spec with every magnitude-bearing step, strong enough that each one shows.
STRONG: list[dict[str, Any]] = [
    {"hflip": {"p": 0.5}},
    {"rotate": {"limit_range": [-40, 40], "p": 0.9}},
    {"scale": {"scale_range": [0.6, 1.5], "p": 0.9}},
    {"translate": {"x_range": [-0.2, 0.2], "y_range": [-0.25, 0.15], "p": 0.9}},
    {"color": {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2, "p": 0.9}},
    {"coarse_dropout": {"num_holes_range": [1, 3], "hole_height_range": [0.2, 0.4], "p": 0.8}},
    {"gaussian_blur": {"sigma_range": [0.8, 2.0], "p": 0.6}},
    {"vflip": {"p": 0.3}},
    {"random_resized_crop": {"height": 32, "width": 36, "scale_range": [0.3, 1.0]}},
]
#: STRONG with every magnitude step made the identity in place (draws are keyed by a step's
#: position, so "removed" keeps the positions) and the crop a plain resize: what strength 0 gives.
STRIPPED: list[dict[str, Any]] = [
    {"hflip": {"p": 0.5}},
    {"rotate": {"limit_range": [-40, 40], "p": 0.0}},
    {"scale": {"scale_range": [0.6, 1.5], "p": 0.0}},
    {"translate": {"p": 0.0}},
    {"color": {"p": 0.0}},
    {"coarse_dropout": {"p": 0.0}},
    {"gaussian_blur": {"p": 0.0}},
    {"vflip": {"p": 0.3}},
    {"resize": {"height": 32, "width": 36}},
]


def photos(n: int = 16, h: int = H, w: int = W, c: int = 3) -> np.ndarray:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (n, h // 4, w // 4, c), dtype=np.uint8)
    return np.ascontiguousarray(base.repeat(4, axis=1).repeat(4, axis=2))  # blocky, so warps show


def draws_at(step: dict[str, Any], strength: float | np.ndarray) -> Any:
    (draw,) = draw_steps(load_spec([step]), seed=3, epoch=1, sample_ids=IDS, heights=np.full(N, H),
                         widths=np.full(N, W), strength=np.broadcast_to(np.asarray(strength, float), (N,)))
    return draw


# -- the rule of each transform, on its draws -----------------------------------------------------------

def _rotate(one: Any, s: np.ndarray, at: Any) -> None:
    np.testing.assert_allclose(at.values.value, s * one.values.value)


def _scale(one: Any, s: np.ndarray, at: Any) -> None:
    np.testing.assert_allclose(np.log(at.values.value), s * np.log(one.values.value), atol=1e-12)


def _translate(one: Any, s: np.ndarray, at: Any) -> None:
    np.testing.assert_allclose(at.values.dx, s * one.values.dx)
    np.testing.assert_allclose(at.values.dy, s * one.values.dy)


def _color(one: Any, s: np.ndarray, at: Any) -> None:
    for key in ("brightness", "contrast", "saturation"):
        np.testing.assert_allclose(getattr(at.values, key) - 1, s * (getattr(one.values, key) - 1), atol=1e-12)
    np.testing.assert_allclose(at.values.hue, s * one.values.hue)


def _crop(one: Any, s: np.ndarray, at: Any) -> None:
    b1, bs = one.values, at.values
    np.testing.assert_array_equal(bs.x0, np.rint(s * b1.x0))
    np.testing.assert_array_equal(bs.y0, np.rint(s * b1.y0))
    assert (np.abs(bs.w - (s * b1.w + (1 - s) * W)) <= 1).all() and (np.abs(bs.h - (s * b1.h + (1 - s) * H)) <= 1).all()
    assert (bs.x0 + bs.w <= W).all() and (bs.y0 + bs.h <= H).all() and (bs.w >= 1).all() and (bs.h >= 1).all()


def _seeds(one: Any, s: np.ndarray, at: Any) -> None:
    np.testing.assert_array_equal(at.values.seed, one.values.seed)  # same generators, ranges scaled
    np.testing.assert_array_equal(at.values.strength, s)


def _unchanged(one: Any, s: np.ndarray, at: Any) -> None:
    assert repr(at.values) == repr(one.values)
    np.testing.assert_array_equal(at.apply, one.apply)


#: (step, its rule on the draws, whether it bears a magnitude: skipped at strength 0)
RULES = [
    ({"rotate": {"limit_range": [-30, 45], "p": 0.7}}, _rotate, True),
    ({"scale": {"scale_range": [0.5, 1.8], "p": 0.7}}, _scale, True),
    ({"translate": {"x_range": [-0.3, 0.2], "y_range": [0.1, 0.4], "p": 0.7}}, _translate, True),
    ({"color": {"brightness": 0.4, "contrast": 0.3, "saturation": 0.6, "hue": 0.1, "p": 0.7}}, _color, True),
    ({"random_resized_crop": {"height": 16, "width": 16, "scale_range": [0.1, 0.9]}}, _crop, False),
    ({"coarse_dropout": {"p": 0.7}}, _seeds, True),
    ({"gaussian_blur": {"p": 0.7}}, _seeds, True),
    ({"hflip": {"p": 0.5}}, _unchanged, False),
    ({"vflip": {"p": 0.5}}, _unchanged, False),
    ({"resize": {"height": 20, "width": 30}}, _unchanged, False),
    ({"center_crop": {"height": 20, "width": 30}}, _unchanged, False),
    ({"resize_shorter": {"side": 20}}, _unchanged, False),
]


def test_rules_cover_every_transform() -> None:
    assert sorted(next(iter(step)) for step, _, _ in RULES) == sorted(TRANSFORMS)


@pytest.mark.parametrize(("step", "rule", "magnitude"), RULES, ids=[next(iter(r[0])) for r in RULES])
def test_strength_scales_each_draw_by_its_rule(step: dict[str, Any], rule: Any, magnitude: bool) -> None:
    one = draws_at(step, 1.0)
    mixed = np.resize(LEVELS, N)  # every level, on samples of the same batch
    at = draws_at(step, mixed)
    (plain,) = draw_steps(load_spec([step]), seed=3, epoch=1, sample_ids=IDS, heights=np.full(N, H),
                          widths=np.full(N, W), strength=None)
    assert repr(plain.values) == repr(one.values)  # strength 1 is the draw without a strength, exactly
    kept = mixed > 0 if magnitude else np.ones(N, bool)
    np.testing.assert_array_equal(at.apply[kept], one.apply[kept])  # the same samples, the same uniforms...
    if magnitude:
        assert one.apply[~kept].any() and not at.apply[~kept].any()  # ...but with no magnitude left: skipped
    rule(one, mixed, at)


def test_albumentations_ranges_scale_with_strength() -> None:
    blur = TRANSFORMS["gaussian_blur"]
    dropout = TRANSFORMS["coarse_dropout"]
    assert isinstance(blur, AlbumentationsTransform) and isinstance(dropout, AlbumentationsTransform)
    params = load_spec([{"gaussian_blur": {"sigma_range": [0.8, 2.0]}}]).steps[0][1]
    assert blur.build(params, 0.5).sigma_limit == pytest.approx((0.4, 1.0))
    params = load_spec([{"coarse_dropout": {"hole_height_range": [0.2, 0.4], "hole_width_range": [0.1, 0.3]}}]
                       ).steps[0][1]
    built = dropout.build(params, 0.5)
    assert built.hole_height_range == pytest.approx((0.1, 0.2))
    assert built.hole_width_range == pytest.approx((0.05, 0.15))


# -- strength 0 and 1 on pixels -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("step", "rule", "magnitude"), [r for r in RULES if r[2]], ids=[next(iter(r[0]))
                                                                                       for r in RULES if r[2]])
def test_strength_zero_is_the_identity_of_each_magnitude_step(step: dict[str, Any], rule: Any, magnitude: bool,
                                                              backend: str) -> None:
    x = photos()
    kw = {"seed": 2, "epoch": 0, "sample_ids": np.arange(len(x)), "backend": backend}
    np.testing.assert_array_equal(augment_batch(x, {"transforms": [step], "strength": 0.0}, **kw), x)
    assert not np.array_equal(augment_batch(x, [step], **kw), x)  # and at strength 1 it does something


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_strength_zero_is_the_spec_without_its_magnitude_steps(backend: str, channels: int) -> None:
    x = photos(c=channels)
    kw = {"seed": 11, "epoch": 3, "sample_ids": np.arange(100, 100 + len(x)), "backend": backend}
    zero = augment_batch(x, {"transforms": STRONG, "strength": 0.0}, **kw)
    np.testing.assert_array_equal(zero, augment_batch(x, STRIPPED, **kw))
    # the same through the per-sample multiplier, and strength 1 is the spec as written, bit for bit
    np.testing.assert_array_equal(augment_batch(x, STRONG, strength=0.0, **kw), zero)
    np.testing.assert_array_equal(augment_batch(x, {"transforms": STRONG, "strength": 1.0}, **kw),
                                  augment_batch(x, STRONG, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_strength_is_each_sample_alone(backend: str) -> None:
    x = photos()
    s = np.resize(LEVELS, len(x))
    kw = {"seed": 4, "epoch": 2, "backend": backend}
    together = augment_batch(x, STRONG, sample_ids=np.arange(len(x)), strength=s, **kw)
    for i in (0, 1, 2, 7):
        alone = augment_batch(x[i:i + 1], {"transforms": STRONG, "strength": float(s[i])}, sample_ids=[i], **kw)
        np.testing.assert_array_equal(together[i], alone[0])


def test_strength_is_validated_and_not_part_of_the_spec_identity() -> None:
    with pytest.raises(SpecError, match=r"strength: 1.5 is outside \[0, 1\]"):
        load_spec({"transforms": STRONG, "strength": 1.5})
    spec = load_spec(STRONG)
    half = spec.with_strength(0.5)
    assert (spec.strength, half.strength) == (1.0, 0.5)
    assert half.identity == spec.identity and half.fingerprint != spec.fingerprint
    with pytest.raises(ValueError, match="strength"):
        augment_batch(photos(2), STRONG, seed=0, epoch=0, sample_ids=[0, 1], strength=[0.5, 2.0])


# -- on the server: per-class vectors, determinism across workers --------------------------------------

DIGITS_SPEC = [{"rotate": {"limit_range": [-30, 30]}}, {"translate": {"x_range": [-0.15, 0.15]}},
               {"color": {"brightness": 0.4, "contrast": 0.4}}]
CLASS_STRENGTH = [0.0, 1.0, 0.5, 0.0, 0.25, 1.0, 0.75, 0.1, 0.0, 0.6]


def stream_request(spec: Any, **kw: Any) -> pb.StreamBatchesRequest:
    return pb.StreamBatchesRequest(dataset="digits", spec=load_spec(spec).to_proto(), seed=5, epoch=2,
                                   batch_size=200, **kw)


def epoch_pixels(stub: Any, request: pb.StreamBatchesRequest) -> tuple[np.ndarray, np.ndarray]:
    batches = list(stub.StreamBatches(request, timeout=60))
    images = np.concatenate([np.frombuffer(b.images.data, np.uint8).reshape(tuple(b.images.shape)) for b in batches])
    return images, np.concatenate([np.array(b.sample_ids, np.int64) for b in batches])


@pytest.fixture(scope="module")
def digits() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield served_digits()


@pytest.mark.parametrize("strength", [0.0, 0.35, 1.0])
def test_per_class_strength_applies_by_label_and_any_worker_count_agrees(
        strength: float, digits: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, labels = digits
    spec = {"transforms": DIGITS_SPEC, "strength": strength}
    request = stream_request(spec, class_strength=CLASS_STRENGTH)
    results = []
    for workers in (1, 2):
        with serve(ServerSettings(workers=workers, datasets={"digits": "builtin:digits"},
                                  shared_memory=False)) as s:
            results.append(epoch_pixels(s.stub, request))
    (one, ids), (two, ids2) = results
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(one, two)
    per_sample = np.asarray(CLASS_STRENGTH)[labels[ids]]
    expected = augment_batch(pixels[ids], spec, seed=5, epoch=2, sample_ids=ids, strength=per_sample)
    np.testing.assert_array_equal(one, expected)
    zero = per_sample * strength == 0
    np.testing.assert_array_equal(one[zero], pixels[ids][zero])  # classes at 0: untouched


def test_bad_class_strength_vectors_are_invalid_argument() -> None:
    with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as s:
        for vector, message in (([0.5] * 3, "class_strength: 3 values for the 10 classes of dataset 'digits'"),
                                ([0.5] * 9 + [1.5], r"class_strength[9]: 1.5 is outside [0, 1]")):
            with pytest.raises(grpc.RpcError) as info:
                epoch_pixels(s.stub, stream_request(DIGITS_SPEC, class_strength=vector))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (info.value.details() or "")
        assert s.health() == "SERVING"


def test_a_stream_takes_a_new_strength_at_the_epoch_boundary(digits: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, _labels = digits
    with serve(ServerSettings(workers=2, datasets={"digits": "builtin:digits"})) as s, \
            AugmentClient(s.target) as client:
        stream = AugmentedStream(client, "digits", DIGITS_SPEC, batch_size=256, seed=1, prefetch=8)
        for epoch, strength in ((0, 1.0), (1, 0.0), (2, 0.5)):
            if epoch:
                stream.set_epoch(epoch, strength=strength)
            for images, _labels_t, ids in stream:
                x = pixels[ids.numpy()]
                want = augment_batch(x, {"transforms": DIGITS_SPEC, "strength": strength}, seed=1, epoch=epoch,
                                     sample_ids=ids.numpy())
                np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), want)
        state = stream.state_dict()
        assert state["strength"] == 0.5
        resumed = AugmentedStream(client, "digits", DIGITS_SPEC, batch_size=256, seed=1)
        resumed.load_state_dict(state)  # the spec matches: strength is state, not identity
        assert resumed.strength == 0.5
        stream.set_epoch(3, class_strength=CLASS_STRENGTH)
        assert stream.state_dict()["class_strength"] == CLASS_STRENGTH
