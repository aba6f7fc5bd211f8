"""TensorBoard logging for `fit` (`augsvc-train --tensorboard DIR`; needs the optional
`tensorboard` package: `pip install augsvc[tensorboard]`).

Per epoch, the scalars the run prints: loss/{train,val}, accuracy/{train,val}, gap/{loss,acc},
weights/{l1_norm,l2_norm,near_zero_frac}, speed/images_per_s, lr — and any column a callback
added, under extra/. Every `images_every` epochs (and the first), a grid of the augmented
training images of that epoch's first batch, as the model received them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .train import Callback, History, StepEvent

#: Row column -> TensorBoard tag.
SCALAR_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
               "val_acc": "accuracy/val", "gap_loss": "gap/loss", "gap_acc": "gap/acc",
               "l1_norm": "weights/l1_norm", "l2_norm": "weights/l2_norm",
               "near_zero_frac": "weights/near_zero_frac", "images_per_s": "speed/images_per_s", "lr": "lr"}
_NOT_SCALARS = {"epoch", "seconds"}


class TensorBoardCallback(Callback):
    """Writes a run's scalars and sample grids to `log_dir` (rank 0 only: give it to rank 0's fit).
    A resumed run drops what a killed one wrote from its first epoch on (SummaryWriter's
    purge_step, from `on_train_begin`); purge_step: that epoch, given here instead."""

    def __init__(self, log_dir: Path | str, *, images_every: int = 5, max_images: int = 32,
                 purge_step: int | None = None) -> None:
        if images_every < 1:
            raise ValueError(f"images_every: {images_every} is not allowed; expected >= 1")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'augsvc[tensorboard]'") \
                from exc
        self._summary_writer: Any = SummaryWriter
        self._log_dir = str(log_dir)
        self._purge_step = purge_step
        self._writer: Any = None
        self.images_every, self.max_images = images_every, max_images
        self._grid: torch.Tensor | None = None

    @property
    def writer(self) -> Any:
        """The SummaryWriter, opened on first use (after `on_train_begin`, which may set its purge step)."""
        if self._writer is None:
            self._writer = self._summary_writer(self._log_dir, purge_step=self._purge_step)
        return self._writer

    def on_train_begin(self, first_epoch: int, resumed: bool) -> None:
        if resumed and self._purge_step is None and self._writer is None:
            self._purge_step = first_epoch

    def on_batch(self, event: StepEvent) -> None:
        if event.position == 1 and event.epoch % self.images_every == 0:
            images = event.batch[0][:self.max_images]
            self._grid = images.detach().to("cpu", torch.uint8) if images.dtype == torch.uint8 else None

    def on_epoch_end(self, row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key not in _NOT_SCALARS:
                self.writer.add_scalar(SCALAR_TAGS.get(key, f"extra/{key}"), value, epoch)
        if self._grid is not None:
            self.writer.add_images("augmented_train_batch", self._grid, epoch, dataformats="NCHW")
            self._grid = None
        self.writer.flush()

    def on_train_end(self, history: History) -> None:
        if self._writer is not None:
            self._writer.close()
