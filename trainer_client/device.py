"""DeviceFeed: batches handed to a device one ahead, from pinned memory, with the uint8 -> float
conversion and normalisation done on the device.

On CUDA, each host batch is copied into page-locked (pinned) memory and sent to the GPU with a
non-blocking copy on a side stream (`copy_stream`); the copy of batch i + 1 is queued before
batch i is handed over, so it runs while the GPU computes on batch i. Before a batch is handed
over, the consumer's current stream waits on that batch's copy event (a GPU-side wait: the host
does not block), and its tensors are recorded on that stream so that the caching allocator never
reuses their memory too early. Images keep their memory format (channels_last stays
channels_last). With mean/std the images arrive as normalised float32, computed on the device;
without, they stay uint8 (a model that normalises itself, such as RegularizedCNN, then does it
on the device).

On any other device (device="cpu" in CI) the same path runs without streams and pinning: the
one-ahead order, the state tracking and the normalisation are the same code.

Only torch is imported here, so this module (and tests/test_gpu.py) needs nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["DeviceFeed", "normalize_uint8"]


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (or float in [0, 255]) -> float32 (x / 255 - mean) / std on the images'
    device, in channels_last; mean and std broadcast as [1, C, 1, 1] in [0, 1] units."""
    x = images.to(dtype=torch.float32).div_(255.0) if images.dtype == torch.uint8 else images.float() / 255.0
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def channel_stats(name: str, values: Sequence[float], channels: int) -> torch.Tensor:
    """Per-channel statistics as a float32 [1, channels, 1, 1] tensor; one value broadcasts."""
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{name}: expected 1 or {channels} values (one per channel), got {len(vals)}")
    if name == "std" and any(v <= 0 for v in vals):
        raise ValueError(f"std: every value must be > 0, got {vals}")
    return torch.tensor(vals, dtype=torch.float32).view(1, channels, 1, 1)


class _Pending:
    """A batch whose copy to the device has been queued, and the source's state once it was taken."""

    __slots__ = ("tensors", "event", "state")

    def __init__(self, tensors: list[torch.Tensor], event: Any, state: dict[str, Any] | None) -> None:
        self.tensors, self.event, self.state = tensors, event, state


class DeviceFeed:
    """Iterates `batches` (sequences of tensors, images first: what AugmentedStream yields) with
    every tensor on `device`, one batch ahead (see the module docstring).

    mean, std: per-channel statistics in [0, 1] units (one value broadcasts); when given, images
    become normalised float32 on the device, else they stay uint8. pin_memory: stage host batches
    in pinned memory (default: on CUDA). `state_dict()` is the source's state as of the last
    batch handed over (not the one held ahead), and a new pass after an interrupted one rewinds
    the source to it (`load_state_dict`), so nothing the consumer never received is skipped.
    state_of: the object whose state_dict() / load_state_dict() stand for the source's position
    (default: `batches` itself, when it has them) — say, the stream behind a generator.
    """

    def __init__(self, batches: Iterable[Sequence[torch.Tensor]], device: str | torch.device, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 pin_memory: bool | None = None, state_of: Any = None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("mean/std: give both or neither")
        self.batches = batches
        self.state_of: Any = batches if state_of is None else state_of
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.pin_memory = cuda if pin_memory is None else pin_memory
        if self.pin_memory and not cuda:
            raise ValueError(f"pin_memory: pinned memory serves copies to a CUDA device, not {self.device}")
        #: The side stream the copies are queued on (None off CUDA).
        self.copy_stream: Any = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        self._mean, self._std = mean, std
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handed: dict[str, Any] | None = None  # the source's state after the last batch handed over
        self._held: _Pending | None = None  # a batch copied ahead and not handed over
        self._staging = _PinnedRing()

    @property
    def ahead_event(self) -> Any:
        """The CUDA event recorded after the copy of the batch held ahead (None: no batch held, or
        not on CUDA) — for checking the order of copies and compute."""
        return self._held.event if self._held is not None else None

    def _source_state(self) -> dict[str, Any] | None:
        state_dict = getattr(self.state_of, "state_dict", None)
        return state_dict() if callable(state_dict) else None

    def state_dict(self) -> dict[str, Any] | None:
        """The source's state as of the last batch handed over (None: the source keeps none)."""
        return self._handed if self._handed is not None else self._source_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the source (its `load_state_dict`) at `state`; nothing is held ahead after it."""
        self.state_of.load_state_dict(state)
        self._handed, self._held = None, None

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self._mean is None or self._std is None:
            return images
        if self._stats is None or self._stats[0].shape[1] != images.shape[1]:
            self._stats = (channel_stats("mean", self._mean, images.shape[1]).to(self.device),
                           channel_stats("std", self._std, images.shape[1]).to(self.device))
        return normalize_uint8(images, *self._stats)

    def _start(self, batch: Sequence[torch.Tensor]) -> _Pending:
        """Queue the copy of `batch` (pinned first, on CUDA) and note the source's state."""
        state = self._source_state()
        if self.copy_stream is None:
            return _Pending([t.to(self.device) for t in batch], None, state)
        host = [self._staging.stage(k, t) if self.pin_memory else t for k, t in enumerate(batch)]
        with torch.cuda.stream(self.copy_stream):
            tensors = [t.to(self.device, non_blocking=True) for t in host]
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.copy_stream)
        if self.pin_memory:
            self._staging.read_by(host, event)
        return _Pending(tensors, event, state)

    def _hand_over(self, pending: _Pending) -> tuple[torch.Tensor, ...]:
        """Make the consumer's stream wait for the copy, then convert the images there."""
        if pending.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(pending.event)
            for t in pending.tensors:
                t.record_stream(current)
        self._handed = pending.state
        images, *rest = pending.tensors
        return (self._normalize(images), *rest)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self._held is not None and self._handed is not None and hasattr(self.state_of, "load_state_dict"):
            self.load_state_dict(self._handed)  # the last pass stopped with a batch held ahead: rewind
        self._held = None
        source = iter(self.batches)
        try:
            first = next(source)
        except StopIteration:
            return
        self._held = self._start(first)
        for batch in source:
            ahead = self._start(batch)  # queued before the held batch is handed over
            current, self._held = self._held, ahead
            yield self._hand_over(current)
        current, self._held = self._held, None
        yield self._hand_over(current)


class _PinnedRing:
    """Page-locked staging buffers, a few per tensor layout, reused round-robin: allocating pinned
    memory (cudaHostAlloc) synchronises the whole device, so after a layout's first batch staging
    never allocates. A buffer is refilled only once the copy that last read it has finished (long
    done in steady state: it is `SLOTS` batches old, and one batch is held ahead). A new feed (the
    trainer makes one per pass) allocates again, but torch's caching host allocator hands back the
    pinned blocks the last feed freed, so only the first pass calls cudaHostAlloc."""

    SLOTS = 3

    def __init__(self) -> None:
        self._rings: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._turn: dict[tuple[Any, ...], int] = {}
        self._readers: dict[int, Any] = {}  # id(buffer) -> the event of the copy that last read it

    def stage(self, position: int, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (the batch's `position`-th) copied into a pinned buffer of its shape, strides and
        dtype; each position has rings of its own, so a batch's tensors never share one."""
        key = (position, tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = [torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                                           pin_memory=True) for _ in range(self.SLOTS)]
            self._turn[key] = 0
        turn = self._turn[key]
        self._turn[key] = (turn + 1) % self.SLOTS
        buffer = ring[turn]
        reader = self._readers.pop(id(buffer), None)
        if reader is not None:
            reader.synchronize()
        buffer.copy_(tensor)
        return buffer

    def read_by(self, buffers: Sequence[torch.Tensor], event: Any) -> None:
        """The copy recorded by `event` reads `buffers`: they are not refilled before it is done."""
        for buffer in buffers:
            self._readers[id(buffer)] = event
