"""center_crop: the deterministic crop of validation pipelines, on both backends, fused with other
geometric steps, and refused (INVALID_ARGUMENT) for an image smaller than the crop."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from helpers.servers import serve

from augsvc import InvalidInputError, SpecError, augment_batch, load_spec
from augsvc.server import ServerSettings
from augsvc.tensors import encode_tensor
from augsvc.v1 import augment_pb2 as pb

BACKENDS = ("fused", "albumentations")


def images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("h", "w", "ch", "cw"), [(30, 41, 20, 25), (31, 40, 20, 25), (8, 8, 8, 8), (9, 7, 1, 1),
                                                  (64, 48, 48, 48)])
def test_crop_is_the_centre_slice(backend: str, h: int, w: int, ch: int, cw: int) -> None:
    x = images(3, h, w)
    out = augment_batch(x, [{"center_crop": {"height": ch, "width": cw}}], seed=0, epoch=0, sample_ids=[0, 1, 2],
                        backend=backend)
    y0, x0 = (h - ch) // 2, (w - cw) // 2  # rounded down, as albumentations' CenterCrop
    np.testing.assert_array_equal(out, x[:, y0:y0 + ch, x0:x0 + cw])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_sizes_become_one_shape(backend: str) -> None:
    batch = [images(1, h, w, seed=k)[0] for k, (h, w) in enumerate([(40, 30), (33, 57), (24, 24)])]
    out = augment_batch(batch, [{"center_crop": {"height": 24, "width": 24}}], seed=0, epoch=0,
                        sample_ids=[0, 1, 2], backend=backend)
    assert out.shape == (3, 24, 24, 3)
    np.testing.assert_array_equal(out[1], batch[1][4:28, 16:40])


@pytest.mark.parametrize("before", [
    [{"resize": {"height": 40, "width": 50}}],
    [{"rotate": {"limit_range": [-30, 30]}}, {"scale": {"scale_range": [0.8, 1.2]}}],
    [{"hflip": {"p": 0.5}}, {"random_resized_crop": {"height": 36, "width": 36}}],
])
def test_fused_into_the_warp_matches_crop_after_the_step(before: list[dict[str, object]]) -> None:
    # One warp in the fused backend; the reference applies the step, then slices.
    spec = [*before, {"center_crop": {"height": 28, "width": 24}}]
    x = images(8, 48, 52)
    kw = {"seed": 4, "epoch": 1, "sample_ids": np.arange(8)}
    fused = augment_batch(x, spec, backend="fused", **kw).astype(np.int16)
    reference = augment_batch(x, spec, backend="albumentations", **kw).astype(np.int16)
    assert fused.shape == reference.shape == (8, 28, 24, 3)
    assert np.abs(fused - reference).max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_smaller_than_the_crop_is_refused(backend: str) -> None:
    with pytest.raises(InvalidInputError, match=r"center_crop: an image of 30x41 is smaller than the 32x32 crop"):
        augment_batch(images(2, 30, 41), [{"center_crop": {"height": 32, "width": 32}}], seed=0, epoch=0,
                      sample_ids=[0, 1], backend=backend)


def test_spec_fields() -> None:
    spec = load_spec([{"hflip": {}}, {"center_crop": {"height": 224, "width": 200}}])
    assert spec.output_size == (224, 200)
    with pytest.raises(SpecError, match=r"transforms\[0\]\.center_crop\.width: required"):
        load_spec([{"center_crop": {"height": 8}}])
    with pytest.raises(SpecError, match=r"transforms\[0\]\.center_crop\.height: 0 is outside \[1, 4096\]"):
        load_spec([{"center_crop": {"height": 0, "width": 8}}])


def test_server_refuses_a_too_small_image_and_keeps_serving() -> None:
    crop = load_spec([{"center_crop": {"height": 40, "width": 40}}]).to_proto()
    with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"})) as s:
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Augment(pb.AugmentRequest(spec=crop, images=encode_tensor(images(2, 32, 32)), sample_ids=[0, 1]),
                           timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "center_crop: an image of 32x32 is smaller than the 40x40 crop" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            list(s.stub.StreamBatches(pb.StreamBatchesRequest(dataset="digits", spec=crop, batch_size=16, end=1),
                                      timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fits = load_spec([{"center_crop": {"height": 24, "width": 20}}]).to_proto()
        (batch,) = list(s.stub.StreamBatches(pb.StreamBatchesRequest(dataset="digits", spec=fits, batch_size=16,
                                                                    end=1), timeout=30))
        assert list(batch.images.shape) == [16, 24, 20, 1]
