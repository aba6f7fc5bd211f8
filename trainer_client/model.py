"""RegularizedCNN: conv-batchnorm-ReLU blocks, dropout, global average pooling.

The model takes what the data stream yields, uint8 [N, C, H, W], and does its own input
normalization (float, /255, (x - mean) / std with registered buffers), so callers never
preprocess and a checkpoint carries its normalization with it. `batch_norm=False, dropout=0`
gives the unregularized baseline the regularization experiment calls "nothing".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .device import channel_stats, normalize_uint8


class RegularizedCNN(nn.Module):
    """A small CNN whose regularizers (batch norm, dropout) can each be switched off.

    Block i is conv3x3 -> [BatchNorm] -> ReLU -> maxpool 2x2 (ceil mode, so odd and tiny sizes
    work) with `width * 2**min(i, 2)` channels. Then global average pooling, dropout and a
    linear classifier, so any H, W works. `stem` stride-2 conv3x3 -> [BatchNorm] -> ReLU layers
    before the blocks halve large images cheaply (`stem_for` picks how many for a size).

    mean, std: per-channel statistics in [0, 1] units (one value broadcasts to all channels).
    dropout: probability before the classifier (spatial dropout in the conv blocks cost more
    accuracy than it bought on small digits subsets, so there is none).
    seed: if given, weights are initialized from a private generator, so the init is
    reproducible without touching torch's global RNG.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 3,
                 dropout: float = 0.3, batch_norm: bool = True, mean: Sequence[float] = (0.5,),
                 std: Sequence[float] = (0.5,), seed: int | None = None, stem: int = 0) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels: {in_channels} is not allowed; expected >= 1")
        if num_classes < 2:
            raise ValueError(f"num_classes: {num_classes} is not allowed; expected >= 2")
        if width < 1:
            raise ValueError(f"width: {width} is not allowed; expected >= 1")
        if depth < 1:
            raise ValueError(f"depth: {depth} is not allowed; expected >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: {dropout} is outside [0, 1)")
        if stem < 0:
            raise ValueError(f"stem: {stem} is not allowed; expected >= 0")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.register_buffer("mean", channel_stats("mean", mean, in_channels))
        self.register_buffer("std", channel_stats("std", std, in_channels))

        # nn.Conv2d/nn.Linear draw a default init from the global RNG when built; with a seed that
        # init is overwritten below anyway, so build inside a forked RNG and leave the caller's alone.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            layers: list[nn.Module] = []
            channels = in_channels
            for _ in range(stem):
                layers.append(nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                channels = width
            for i in range(depth):
                out = width * 2 ** min(i, 2)
                # With batch norm right after, a conv bias would be cancelled by the BN shift.
                layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU(inplace=True))
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                channels = out
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                nn.Linear(channels, num_classes),
            )
        self.reset_parameters(seed)
        # channels_last: oneDNN convs run ~30% faster with it on CPU; it suits GPUs too.
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @staticmethod
    def stem_for(height: int, width: int, side: int = 64) -> int:
        """Stride-2 stem layers that bring the shorter side of height x width down to `side` or less."""
        shorter, layers = min(height, width), 0
        while shorter > side:
            shorter, layers = (shorter + 1) // 2, layers + 1
        return layers

    def reset_parameters(self, seed: int | None = None) -> None:
        """Kaiming init for convs, default-scale init for the classifier, identity batch norm."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = m.in_features ** -0.5
                nn.init.uniform_(m.weight, -bound, bound, generator=gen)
                nn.init.zeros_(m.bias)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> normalized float32 (float input is taken as already in [0, 255]),
        computed wherever the images are (on the GPU after a DeviceFeed hand-off)."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images: expected [N, {self.in_channels}, H, W], got {tuple(images.shape)}")
        return normalize_uint8(images, self.mean, self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(self.normalize(images)))
        return logits
