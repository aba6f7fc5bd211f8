"""The GPU hand-off (trainer_client.device.DeviceFeed) on a real CUDA device: the order of copies
and compute, checked through CUDA events and streams (no wall-clock timing).

Needs only torch (and pytest, or not even that): on a GPU machine, from the repository root,
`python -m pytest tests/test_gpu.py -v`, or `python tests/test_gpu.py`. Without CUDA every test
is skipped. `torch.cuda._sleep(cycles)` keeps one stream busy so that what another stream does
meanwhile can be read from events: an event that completes while the busy stream's event has
not proves the two were not ordered behind each other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, uninstalled

from trainer_client.device import DeviceFeed, _pinned  # noqa: E402
from trainer_client.model import RegularizedCNN  # noqa: E402

try:
    import pytest
except ImportError:  # `python tests/test_gpu.py` on a machine without pytest
    pytest = None  # type: ignore[assignment]
else:
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: GPU clock cycles that `_sleep` keeps a stream busy: about 1 s at 2 GHz, far longer than a copy
#: of one batch (~10 MB) and than the host's few calls between queueing and checking.
BUSY_CYCLES = 2_000_000_000
BATCH, SIDE = 64, 224


def host_batches(count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What AugmentedStream yields: uint8 channels_last views of NHWC pixels, labels, ids."""
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        nhwc = torch.randint(0, 256, (BATCH, SIDE, SIDE, 3), dtype=torch.uint8, generator=gen)
        yield nhwc.permute(0, 3, 1, 2), torch.full((BATCH,), i), torch.arange(BATCH) + BATCH * i


def busy(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """Keep `stream` busy for BUSY_CYCLES; the event completes when it is done."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(BUSY_CYCLES)
        done = torch.cuda.Event()
        done.record(stream)
    return done


def test_copies_run_on_a_side_stream_while_the_compute_stream_is_busy() -> None:
    """The copy of batch i + 1, queued after the consumer's work on batch i, completes while
    that work is still running: it is on its own stream and overlaps the compute."""
    feed = DeviceFeed(host_batches(4), "cuda")
    compute = torch.cuda.current_stream()
    assert feed.copy_stream is not None and feed.copy_stream.cuda_stream != compute.cuda_stream
    it = iter(feed)
    next(it)  # batch 0 handed over; batch 1's copy queued
    computing = busy(compute)  # the "training step" on batch 0
    next(it)  # batch 1 handed over (the compute stream waits for its copy); batch 2's copy queued now
    copy2 = feed.ahead_event
    assert copy2 is not None
    copy2.synchronize()  # the host waits for batch 2's copy only
    assert not computing.query(), "batch 2's copy waited for the compute stream"
    torch.cuda.synchronize()


def test_compute_waits_for_its_batchs_copy() -> None:
    """With the copy stream held up, the consumer's kernels on the batch being copied do not
    run: the compute stream waits on the batch's copy event, and reads the right pixels after."""
    batches = list(host_batches(4))
    feed = DeviceFeed(iter(batches), "cuda")
    it = iter(feed)
    next(it)  # batch 0 handed over; batch 1's copy queued
    held_up = busy(feed.copy_stream)  # everything queued on the copy stream from now on waits
    next(it)  # batch 1 handed over; batch 2's copy queued behind the sleep
    copy2 = feed.ahead_event
    images, labels, _ids = next(it)  # batch 2 handed over: the compute stream waits for copy2
    total = images.sum(dtype=torch.int64)
    summed = torch.cuda.Event()
    summed.record(torch.cuda.current_stream())
    assert not held_up.query() and not copy2.query()
    assert not summed.query(), "the compute stream ran on batch 2 before its copy"
    summed.synchronize()
    assert copy2.query() and held_up.query()
    assert int(labels[0]) == 2 and int(total) == int(batches[2][0].sum(dtype=torch.int64))


def test_batches_arrive_in_order_normalised_on_the_device_in_channels_last() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batches = list(host_batches(3))
    for i, (images, labels, ids) in enumerate(DeviceFeed(iter(batches), "cuda", mean=mean, std=std)):
        assert images.is_cuda and labels.is_cuda and ids.is_cuda
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
        assert int(labels[0]) == i
        want = (batches[i][0].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(images.cpu(), want, rtol=1e-5, atol=1e-5)


def test_host_batches_are_staged_in_pinned_memory_with_their_strides() -> None:
    images = next(host_batches(1))[0]
    pinned = _pinned(images)
    assert pinned.is_pinned() and pinned.stride() == images.stride() and torch.equal(pinned, images)
    feed = DeviceFeed(host_batches(1), "cuda")
    assert feed.pin_memory


def test_the_model_trains_on_uint8_batches_normalised_on_the_gpu() -> None:
    """What fit does on CUDA: uint8 batches handed over, the model normalises them on the GPU."""
    model = RegularizedCNN(3, 10, width=8, depth=2, seed=0, stem=RegularizedCNN.stem_for(SIDE, SIDE)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for images, labels, _ids in DeviceFeed(host_batches(3), "cuda"):
        assert images.dtype == torch.uint8 and images.is_cuda
        assert model.normalize(images).is_contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model(images), labels % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def _main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    tests: list[Callable[[], None]] = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    for test in tests:
        test()
        print(f"passed: {test.__name__}")
    print(f"{len(tests)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
