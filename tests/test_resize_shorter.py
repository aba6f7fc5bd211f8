"""resize_shorter: the shorter side to `side`, aspect kept — albumentations' SmallestMaxSize on the
reference backend, and with center_crop the standard eval pipeline in one warp."""

from __future__ import annotations

import numpy as np
import pytest

from augsvc import augment_batch, load_spec
from augsvc._albumentations import albumentations as A

SIZES = [(300, 451), (500, 333), (257, 256), (64, 64), (31, 97)]


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(8, 0).repeat(8, 1)[:h, :w])


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_reference_is_albumentations_smallest_max_size(h: int, w: int) -> None:
    x = photo(h, w)
    want = A.SmallestMaxSize(max_size=224, p=1.0)(image=x)["image"]
    got = augment_batch(x[None], [{"resize_shorter": {"side": 224}}], seed=0, epoch=0, sample_ids=[0],
                        backend="albumentations")[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_fused_matches_the_reference_inside_the_image(h: int, w: int) -> None:
    x = photo(h, w)
    kw = {"seed": 0, "epoch": 0, "sample_ids": [0]}
    fused = augment_batch(x[None], [{"resize_shorter": {"side": 48}}], backend="fused", **kw)[0].astype(int)
    ref = augment_batch(x[None], [{"resize_shorter": {"side": 48}}], backend="albumentations", **kw)[0].astype(int)
    assert fused.shape == ref.shape and min(fused.shape[:2]) == 48
    assert np.abs(fused - ref)[2:-2, 2:-2].max() <= 1  # edges: the warp's border vs cv2.resize's clamp


def test_eval_pipeline_gives_one_shape_from_mixed_sizes() -> None:
    spec = load_spec([{"resize_shorter": {"side": 64}}, {"center_crop": {"height": 56, "width": 56}}])
    assert spec.output_size == (56, 56)
    assert load_spec([{"resize": {"height": 8, "width": 8}}, {"resize_shorter": {"side": 4}}]).output_size is None
    batch = [photo(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ids = np.arange(len(batch))
    fused = augment_batch(batch, spec, seed=0, epoch=0, sample_ids=ids).astype(int)
    ref = augment_batch(batch, spec, seed=0, epoch=0, sample_ids=ids, backend="albumentations").astype(int)
    assert fused.shape == ref.shape == (len(SIZES), 56, 56, 3)
    assert np.abs(fused - ref).max() <= 1


def test_served_batches_and_streams_of_a_fixed_size_dataset() -> None:
    """A size that depends on the input (not fixed by the spec) reaches every path: StreamBatches
    of a fixed-size dataset (pixels inline and through shared memory) and AugmentStream."""
    from helpers.data import served_digits
    from helpers.servers import serve

    from augsvc.server import ServerSettings
    from trainer_client import AugmentClient, AugmentedStream

    pixels, _ = served_digits()
    spec = [{"resize_shorter": {"side": 20}}, {"rotate": {"limit_range": [-10, 10]}}]
    with serve(ServerSettings(workers=2, datasets={"digits": "builtin:digits"})) as s, \
            AugmentClient(s.target) as client:
        for shared in (False, True):
            stream = AugmentedStream(client, "digits", spec, batch_size=100, seed=3, shared_memory=shared,
                                     sample_ids=np.arange(300))
            for images, _labels, ids in stream:
                want = augment_batch(pixels[ids.numpy()], spec, seed=3, epoch=0, sample_ids=ids.numpy())
                assert want.shape[1:] == (20, 20, 1)
                np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), want)
        own = AugmentedStream.from_arrays(client, pixels[:64], np.zeros(64), spec, batch_size=32, seed=1)
        for images, _labels, ids in own:
            want = augment_batch(pixels[ids.numpy()], spec, seed=1, epoch=0, sample_ids=ids.numpy())
            np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), want)


def test_a_request_cannot_make_a_worker_allocate_past_the_batch_limit() -> None:
    """Sizes the spec alone does not fix are checked once drawn, and a batch's input once its ids
    are known (against 16 x max_batch_bytes: a worker may read more than it returns):
    RESOURCE_EXHAUSTED before the pixels, and the server serves on."""
    import grpc
    from helpers.servers import serve

    from augsvc.server import ServerSettings
    from augsvc.v1 import augment_pb2 as pb

    one_by_one = [{"resize": {"height": 1, "width": 1}}]
    with serve(ServerSettings(workers=1, datasets={"digits": "builtin:digits"}, max_batch_bytes=1 << 18)) as s:
        for spec, ids, size in (([{"resize_shorter": {"side": 1024}}], [], 64),  # 64 x 1024 x 1024 out
                                (one_by_one, list(range(1797)) * 3, 5391)):  # 5.5 MB in > 4 MiB
            request = pb.StreamBatchesRequest(dataset="digits", spec=load_spec(spec).to_proto(), batch_size=size,
                                              sample_ids=ids, end=1)
            with pytest.raises(grpc.RpcError) as info:
                list(s.stub.StreamBatches(request, timeout=60))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        # 3.7 MB read (over the 256 KiB batch limit, within the worker's 4 MiB) for 3.6 KB returned
        request = pb.StreamBatchesRequest(dataset="digits", spec=load_spec(one_by_one).to_proto(), batch_size=3594,
                                          sample_ids=list(range(1797)) * 2, end=1)
        (reply,) = list(s.stub.StreamBatches(request, timeout=60))
        assert len(reply.sample_ids) == 3594
        assert s.health() == "SERVING"
        assert s.server.pool.stats()["restarts"] == 0
