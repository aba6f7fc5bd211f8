"""DeviceFeed on the CPU: the same code path as on CUDA (one batch ahead, state as of the batch
handed over, rewind after an interrupted pass, normalisation, channels_last), without streams."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from trainer_client.device import DeviceFeed, normalize_uint8
from trainer_client.model import RegularizedCNN


class Source:
    """Batches 0..n-1 of channels_last uint8 images; counts what was pulled; keeps a position."""

    def __init__(self, n: int, channels: int = 3) -> None:
        self.n, self.channels = n, channels
        self.position = 0
        self.pulled: list[int] = []

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        nhwc = torch.randint(0, 256, (4, 6, 5, self.channels), dtype=torch.uint8, generator=gen)
        return nhwc.permute(0, 3, 1, 2), torch.full((4,), i), torch.arange(4) + 4 * i

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while self.position < self.n:
            i = self.position
            self.position += 1
            self.pulled.append(i)
            yield self.batch(i)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def test_batches_are_handed_over_one_ahead_with_the_state_of_what_was_received() -> None:
    source = Source(4)
    feed = DeviceFeed(source, "cpu")
    assert feed.copy_stream is None and feed.pin_memory is False
    seen = []
    for images, labels, _ids in feed:
        i = int(labels[0])
        seen.append(i)
        # the next batch was taken (and its copy queued) before this one was handed over
        assert source.pulled == list(range(min(i + 2, 4)))
        assert feed.state_dict() == {"position": i + 1}, "the state counts what the consumer received"
        assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, source.batch(i)[0])
    assert seen == [0, 1, 2, 3]


def test_a_pass_interrupted_with_a_batch_held_ahead_rewinds_the_source() -> None:
    source = Source(5)
    feed = DeviceFeed(source, "cpu")
    for _images, labels, _ids in feed:
        if int(labels[0]) == 1:
            break
    assert source.position == 3 and feed.state_dict() == {"position": 2}  # batch 2 was held, never received
    assert [int(labels[0]) for _, labels, _ in feed] == [2, 3, 4]


def test_normalisation_on_the_device_matches_the_models_and_keeps_channels_last() -> None:
    source = Source(2)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    feed = DeviceFeed(source, "cpu", mean=mean, std=std)
    model = RegularizedCNN(3, 2, mean=mean, std=std)
    for images, labels, _ids in feed:
        raw = source.batch(int(labels[0]))[0]
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, model.normalize(raw))
        assert torch.equal(images, normalize_uint8(raw, model.mean, model.std))
        by_hand = (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(images, by_hand)  # the formula itself, not the shared helper


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="mean/std"):
        DeviceFeed([], "cpu", mean=(0.5,))
    with pytest.raises(ValueError, match="pin_memory"):
        DeviceFeed([], "cpu", pin_memory=True)
    with pytest.raises(ValueError, match="mean"):
        list(DeviceFeed(Source(1), "cpu", mean=(0.1, 0.2), std=(1.0, 1.0)))
    assert list(DeviceFeed([], "cpu")) == []
