"""Training loop: regularizers, early stopping, an overfitting monitor, checkpoints and curves,
in one process or as one rank of a DistributedDataParallel run.

`fit` trains any classifier that takes uint8 [N, C, H, W] batches (RegularizedCNN does its own
normalization). Regularizers: L2 as decoupled weight decay (AdamW, or SGD's weight decay), an
optional L1 penalty added to the loss, label smoothing, and whatever dropout/batch norm the model
has. Validation runs on un-augmented data after every epoch; early stopping watches the
validation loss and the best weights are restored at the end. The L1/L2 norms of the weights and
their near-zero fraction are logged every epoch, so the effect of L1/L2 can be seen in the logs.

Batches reach the model through a `DeviceFeed` (one ahead; pinned memory and a side stream on
CUDA). Under an initialised process group of several ranks (torchrun), the model is wrapped in
DistributedDataParallel, each rank trains on its shard of every epoch, the running train sums
and the validation sums are all-reduced (so every rank sees the same metrics and takes the same
early-stopping decision), and rank 0 alone logs and writes files. A checkpoint (see
`trainer_client.checkpoint`) resumes a run exactly, mid-epoch included: `fit(..., resume=path)`.
Hooks: `train_epoch(e)` is called at the start of every epoch; `Callback`s see every batch and
every epoch's row, to which they may add columns.
"""

from __future__ import annotations

import gc
import itertools
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import (
    ResumeMismatch,
    RunState,
    Stateful,
    all_reduce_sum,
    gather_objects,
    load_checkpoint,
    rank_state,
    restore_rank_state,
    save_checkpoint,
)
from .device import DeviceFeed
from .overfit import GapReport, OverfitMonitor
from .reporting import METRIC_KEYS, format_row, plot_curves, write_metrics
from .stream import FETCH_THREAD_PREFIX
from .world import World

__all__ = ["METRIC_KEYS", "Batch", "Callback", "GapReport", "History", "OverfitMonitor", "StepEvent", "TrainConfig",
           "TrainEpoch", "ValData", "class_sums", "evaluate", "fit", "loss_and_accuracy", "make_optimizer",
           "penalized_weights", "resolve_device", "settle_before_exit", "training_loss", "weight_stats"]

Batch = Sequence[torch.Tensor]
"""(images uint8 [N, C, H, W], labels int64 [N], *extra): extra items (sample ids) are ignored,
except a fourth one of dtype bool, `real` (AugmentedStream(with_mask=True)): samples where it is
False (padding) are trained on, like DistributedSampler's repeats, but not counted in metrics."""
TrainEpoch = Callable[[int], Iterable[Batch]]
ValData = tuple[torch.Tensor, torch.Tensor] | Callable[[], Iterable[Batch]]

_OPTIMIZERS = ("adamw", "sgd")
_SCHEDULES = ("cosine", "constant")
#: TrainConfig fields that define a run: a resume with other values is refused. The others (early
#: stopping's patience and min_delta, reporting, device, output, progress, checkpoint interval)
#: may change on resume.
RESUME_FIXED = ("epochs", "lr", "weight_decay", "l1", "label_smoothing", "optimizer", "momentum", "lr_schedule",
                "seed")


@dataclass
class TrainConfig:
    """Hyper-parameters of `fit`; validated when built.

    weight_decay: L2 strength, applied as weight decay to conv/linear weights only (biases and
    batch-norm parameters are not decayed); AdamW's decay is decoupled and scaled by lr, hence
    values like 5e-2 rather than SGD's 5e-4. l1: coefficient of sum|w| over the same
    weights, added to the loss. patience/min_delta: early stopping on the validation loss.
    gap_warn_epochs: the monitor warns when the train-val gap widened this many epochs in a row.
    near_zero: |w| below this counts as a near-zero weight in the logs.
    device: "auto" picks CUDA when available. out_dir: where metrics, checkpoints and curves go
    (None writes nothing). seed: seeds torch's RNG inside `fit` (dropout masks; rank r of a
    distributed run uses seed + r). checkpoint_every: also write `checkpoint.pt` after every
    this many steps inside an epoch (0: at epoch ends only; see trainer_client.checkpoint).
    """

    epochs: int = 20
    lr: float = 3e-3
    weight_decay: float = 5e-2
    l1: float = 0.0
    label_smoothing: float = 0.0
    patience: int = 5
    min_delta: float = 1e-4
    gap_warn_epochs: int = 3
    optimizer: str = "adamw"
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    near_zero: float = 1e-3
    device: str = "auto"
    out_dir: Path | None = None
    progress: bool = True
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a value > 0"),
            ("weight_decay", self.weight_decay >= 0, "a value >= 0"),
            ("l1", self.l1 >= 0, "a value >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "a value in [0, 1)"),
            ("patience", self.patience >= 1, "an integer >= 1"),
            ("min_delta", self.min_delta >= 0, "a value >= 0"),
            ("gap_warn_epochs", self.gap_warn_epochs >= 1, "an integer >= 1"),
            ("optimizer", self.optimizer in _OPTIMIZERS, f"one of {_OPTIMIZERS}"),
            ("momentum", 0 <= self.momentum < 1, "a value in [0, 1)"),
            ("lr_schedule", self.lr_schedule in _SCHEDULES, f"one of {_SCHEDULES}"),
            ("near_zero", self.near_zero > 0, "a value > 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, "an integer >= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; expected {allowed}")
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)


@dataclass(frozen=True)
class StepEvent:
    """A batch the training loop received. epoch: 0-based (as train_epoch counts); position:
    batches of this epoch received so far, this one included (a resumed epoch goes on counting);
    batch: as the model gets it (on the device)."""

    epoch: int
    position: int
    batch: tuple[torch.Tensor, ...]


class Callback:
    """Hooks into `fit`; each does nothing unless overridden. Called on every rank."""

    def on_train_begin(self, first_epoch: int, resumed: bool) -> None:
        """Training starts, at epoch `first_epoch` (1-based): 1 for a new run; for a resumed one,
        the epoch its checkpoint was written in, or the next when that epoch was done."""

    def on_batch(self, event: StepEvent) -> None:
        """A batch was received; the step on it follows."""

    def on_validation(self, sums: np.ndarray) -> None:
        """The epoch's validation pass, before on_epoch_end: `class_sums` of the validation set,
        per class when `fit` was given num_classes (else one column), summed over the ranks."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        """An epoch's row, before it is logged and written: keys added here become columns."""

    def on_train_end(self, history: History) -> None:
        """Training is over (the best weights are back in the model)."""


@dataclass
class History:
    """What `fit` did: one metrics row per epoch (keys: METRIC_KEYS, then any a callback added),
    the best epoch (1-based, by validation loss; its weights are the ones left in the model), and
    the monitor's warnings."""

    rows: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def best(self) -> dict[str, float]:
        return self.rows[self.best_epoch - 1]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def penalized_weights(model: nn.Module) -> list[torch.Tensor]:
    """Conv and linear weights: what L1 and weight decay act on and what the norms are logged over."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [m.weight for m in model.modules() if isinstance(m, kinds)]


@torch.no_grad()
def weight_stats(model: nn.Module, near_zero: float = 1e-3) -> dict[str, float]:
    """L1 norm, L2 norm and fraction of |w| < near_zero over the penalized weights."""
    weights = penalized_weights(model)
    if not weights:
        return {"l1_norm": 0.0, "l2_norm": 0.0, "near_zero_frac": 0.0}
    # in float64 (float32's sum of squares overflows), on the CPU (some devices have no float64)
    flat = torch.cat([w.detach().flatten().to("cpu", torch.float64) for w in weights])
    return {"l1_norm": flat.abs().sum().item(), "l2_norm": flat.norm().item(),
            "near_zero_frac": (flat.abs() < near_zero).float().mean().item()}


def _split_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, labels, real mask or None) on `device`."""
    if len(batch) < 2:
        raise ValueError(f"batch: expected (images, labels, ...), got a sequence of {len(batch)}")
    real = batch[3] if len(batch) > 3 and batch[3].dtype == torch.bool else None
    return (batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True).long(),
            None if real is None else real.to(device, non_blocking=True))


def _batch_sums(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """[sum of cross-entropy, correct, count] over the real samples of a batch, as float64 on its device."""
    return _per_sample(logits, labels, real).sum(1)


def _per_sample(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """[3, B] float64: each sample's cross-entropy, whether it was right, and its weight (0 for padding)."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    hits = (logits.argmax(1) == labels).to(losses.dtype)
    weight = torch.ones_like(losses) if real is None else real.to(losses.dtype)
    return torch.stack([losses * weight, hits * weight, weight]).double()


def _val_batches(val_data: ValData | Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """(images, labels) tensors in slices of batch_size; a callable's batches; or an iterable's."""
    if callable(val_data):
        yield from val_data()
        return
    if isinstance(val_data, Sequence) and len(val_data) == 2 and all(isinstance(t, torch.Tensor) for t in val_data):
        images, labels = val_data  # two tensors: (images, labels); batches are sequences of tensors
        if len(images) != len(labels):
            raise ValueError(f"val_data: {len(images)} images but {len(labels)} labels")
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
        return
    yield from cast(Iterable[Batch], val_data)


@torch.no_grad()
def class_sums(model: nn.Module, data: ValData | Iterable[Batch], *, num_classes: int | None = None,
               device: torch.device | None = None, batch_size: int = 512, world: World | None = None) -> np.ndarray:
    """The evaluation pass every score here comes from: `model` in eval mode over the real samples
    of `data` ((images, labels) tensors, a callable returning batches, or batches), plain
    cross-entropy. Returns float64 [3, K]: summed loss, correct predictions and count, per class
    (K = num_classes) or for all together (K = 1); with a distributed `world`, over every rank's shard."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, num_classes or 1, dtype=torch.float64, device=device)
    try:
        for batch in DeviceFeed(_val_batches(data, batch_size), device):
            images, labels, real = _split_batch(batch, device)
            logits = model(images)
            per_sample = _per_sample(logits, labels, real)
            if not num_classes:
                sums += per_sample.sum(1, keepdim=True)
                continue
            if logits.shape[1] != num_classes:
                raise ValueError(f"num_classes: {num_classes}, but the model gives {logits.shape[1]} scores")
            # a product with the one-hot labels, not index_add_: that adds with atomics on CUDA,
            # in an order that changes from run to run
            sums += per_sample @ F.one_hot(labels, num_classes).double()
    finally:
        model.train(was_training)
    return all_reduce_sum(sums, world or World()).cpu().numpy()


def loss_and_accuracy(sums: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy from `class_sums` (all classes together)."""
    loss_sum, correct, count = sums.sum(1).tolist()
    if count == 0:
        raise ValueError("val_data: yielded no samples")
    return loss_sum / count, correct / count


def evaluate(model: nn.Module, val_data: ValData, *, device: torch.device | None = None,
             batch_size: int = 512, world: World | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` in eval mode (plain CE, no smoothing) over the
    real samples of `val_data`; with a distributed `world`, over every rank's shard."""
    return loss_and_accuracy(class_sums(model, val_data, device=device, batch_size=batch_size, world=world))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """`config.optimizer` (AdamW or SGD with Nesterov momentum) at `config.lr`, with weight decay
    on the penalized weights only (not biases or batch-norm parameters)."""
    decay = penalized_weights(model)
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Sequence[torch.Tensor],
                  config: TrainConfig) -> torch.Tensor:
    """What is minimized: cross-entropy (with label smoothing) + l1 * sum|w| over `weights`.

    L2 is not here: it is applied as decoupled weight decay by the optimizer.
    """
    loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
    if config.l1 > 0 and weights:
        loss = loss + config.l1 * torch.stack([w.abs().sum() for w in weights]).sum()
    return loss


def _jsonable_config(config: TrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_weights(path: Path, state: dict[str, torch.Tensor], config: TrainConfig, epoch: int,
                  metrics: dict[str, float]) -> None:
    """best.pt / last.pt: the weights, the config, the epoch and its metrics."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model_state": state, "config": _jsonable_config(config), "epoch": epoch, "metrics": metrics}, tmp)
    tmp.replace(path)  # a reader never sees a half-written file


@dataclass
class _Run:
    """What one call of `fit` works with."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    monitor: OverfitMonitor
    config: TrainConfig
    device: torch.device
    world: World
    data: Stateful | None
    stateful: Mapping[str, Stateful]
    callbacks: Sequence[Callback]
    settings: Mapping[str, Any] = field(default_factory=dict)
    state: RunState = field(default_factory=RunState)

    def checkpoint(self, *, epoch_done: bool, sums: list[float], data_state: Any) -> None:
        """Write checkpoint.pt (rank 0) with every rank's RNG and sums: a collective when distributed."""
        if self.config.out_dir is None:
            return
        ranks = gather_objects(rank_state(self.device, sums), self.world)
        if not self.world.is_main:
            return
        self.state.epoch_done, self.state.monitor = epoch_done, self.monitor.state_dict()
        save_checkpoint(self.config.out_dir / "checkpoint.pt", {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "run": self.state.to_dict(), "ranks": ranks, "data": data_state,
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
            "config": _jsonable_config(self.config), "settings": dict(self.settings)})

    def restore(self, path: Path) -> list[float]:
        """Load a checkpoint into the model, optimizer, scheduler, run state, data and stateful
        objects, and this rank's RNG; returns this rank's running sums of the epoch."""
        ckpt = load_checkpoint(path)
        ranks = ckpt["ranks"]
        if len(ranks) != self.world.world_size:
            raise ResumeMismatch(f"{path}: written by a run of {len(ranks)} ranks; this run has "
                                 f"{self.world.world_size}")
        self.check_same_run(path, ckpt)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = RunState.from_dict(ckpt["run"])
        self.monitor.load_state_dict(self.state.monitor)
        if self.data is not None and ckpt["data"] is not None:
            self.data.load_state_dict(ckpt["data"])
        for name, obj in self.stateful.items():
            if name in ckpt["stateful"]:
                obj.load_state_dict(ckpt["stateful"][name])
        return restore_rank_state(ranks[self.world.rank], self.device)

    def check_same_run(self, path: Path, ckpt: Mapping[str, Any]) -> None:
        """ResumeMismatch naming whatever defines this run and differs from the checkpoint's run: the
        RESUME_FIXED fields of the config, the caller's settings (when the checkpoint has them:
        older ones do not), and which stateful objects there are. Loading would otherwise take
        the optimizer's lr and the scheduler's length from the checkpoint and the rest (dropout,
        l1, the epoch count) from this run, silently — a run that neither of them is."""
        now, then = _jsonable_config(self.config), ckpt.get("config") or {}
        differ = [(k, now[k], then[k]) for k in RESUME_FIXED if k in then and then[k] != now[k]]
        if ckpt.get("settings") is not None:
            old = ckpt["settings"]
            differ += [(k, self.settings.get(k), old.get(k)) for k in sorted({*old, *self.settings})
                       if old.get(k) != self.settings.get(k)]
        text = [f"{k} {new!r} (the checkpoint's run: {was!r})" for k, new, was in differ]
        text += [f"state {name!r} only in {'the checkpoint' if name in ckpt['stateful'] else 'this run'}"
                 for name in sorted({*ckpt["stateful"]} ^ {*self.stateful})]
        if text:
            raise ResumeMismatch(f"{path}: a resumed run goes on with the settings it was started with, and these "
                             f"differ: {'; '.join(text)}. Resume with the run's settings, or start a new run "
                             "(another output folder)")

    def train_epoch(self, batches: Iterable[Batch], epoch: int, sums: list[float]) -> tuple[torch.Tensor, int, Any]:
        """One pass in train mode from step `self.state.step` of `epoch` (1-based); returns the
        running [loss, correct, count] sums over real samples, the images trained on here, and
        the data's state after the last batch."""
        config, device = self.config, self.device
        self.net.train()
        weights = penalized_weights(self.model) if config.l1 > 0 else []
        # Sums stay on the device; reading them every step would sync a GPU after each batch.
        totals = torch.tensor(sums, dtype=torch.float64, device=device)
        length = len(batches) if isinstance(batches, Sized) else None
        if self.state.step and self.data is None:  # nothing to resume the source: skip what was trained
            batches = itertools.islice(batches, self.state.step, None)
        feed = DeviceFeed(batches, device, state_of=self.data)
        seen = 0
        bar = tqdm(total=None, unit="img", unit_scale=True, leave=False,
                   disable=not (config.progress and self.world.is_main), desc=f"epoch {epoch}/{config.epochs}")
        with bar:
            for batch in feed:
                self.state.step += 1
                images, labels, real = _split_batch(batch, device)
                for callback in self.callbacks:
                    callback.on_batch(StepEvent(epoch - 1, self.state.step, batch))
                logits = self.net(images)
                loss = training_loss(logits, labels, weights, config)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                self.optimizer.step()
                with torch.no_grad():
                    totals += _batch_sums(logits.detach(), labels, real)
                seen += len(labels)
                bar.update(len(labels))
                if self.state.step % 10 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{totals[0].item() / max(totals[2].item(), 1):.3f}", refresh=False)
                every = config.checkpoint_every
                if every and self.state.step % every == 0 and (length is None or self.state.step < length):
                    self.checkpoint(epoch_done=False, sums=totals.tolist(),
                                    data_state=feed.state_dict() if self.data is not None else None)
        return totals, seen, feed.state_dict() if self.data is not None else None


def fit(model: nn.Module, train_epoch: TrainEpoch, val_data: ValData, config: TrainConfig, *,
        log: Callable[[str], None] = print, world: World | None = None, data: Stateful | None = None,
        stateful: Mapping[str, Stateful] | None = None, callbacks: Sequence[Callback] = (),
        resume: Path | str | None = None, num_classes: int | None = None,
        settings: Mapping[str, Any] | None = None) -> History:
    """Train `model`, validating after every epoch; returns the History, best weights restored.

    train_epoch(e) yields the batches of epoch e (e is 0-based, as the data stream counts; rows
    and logs count epochs from 1). val_data: (images, labels) tensors or a callable returning
    un-augmented batches. The train metrics are the running loss/accuracy over the epoch in
    train mode (on augmented data, with dropout active), the usual "train" curve; so the gap
    (train - val) is the gap between that curve and the eval-mode validation metrics. Reported
    losses are plain cross-entropy, without label smoothing or the L1 term.

    world: this process's place in the run (default `World.discover()`); with an initialised
    process group of several ranks the model is trained with DistributedDataParallel. data: the
    object behind train_epoch's batches whose state_dict() is the data's position (an
    AugmentedStream): saved in checkpoints and restored on resume; without it a resumed epoch
    skips the batches already trained. stateful: more objects a checkpoint holds (by name).
    resume: a checkpoint.pt to continue from, exactly where it was written. num_classes: the
    validation pass also sums per class, for callbacks' on_validation (the adaptive strength's
    clean gap uses it instead of a second pass). settings: what else defines the run (the model's
    shape, the data, the augmentation; plain values): saved in checkpoints, and a resume whose
    settings, RESUME_FIXED config fields or stateful names differ from the checkpoint's is refused.
    """
    world = world if world is not None else World.discover()
    device = resolve_device(config.device)
    model.to(device)
    optimizer = make_optimizer(model, config)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.lr_schedule == "cosine" else None)
    run = _Run(model, model, optimizer, scheduler, OverfitMonitor(config.gap_warn_epochs), config, device, world,
               data, dict(stateful or {}), callbacks, dict(settings or {}))
    history = History(warnings=run.monitor.warnings)
    say = log if world.is_main else quiet
    out = config.out_dir if world.is_main else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    # Seeding here (inside a forked RNG state) makes dropout masks a function of config.seed
    # without leaving torch's global RNG changed for the caller.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed + world.rank)
        run.state.best_state = _state_copy(model)
        sums = run.restore(Path(resume)) if resume is not None else [0.0, 0.0, 0.0]
        state = run.state
        if world.distributed:
            run.net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            # A conv weight with one input channel has two valid stride patterns in channels_last
            # (its size-1 dimension's stride is free); DDP's reducer warns when the gradient took
            # the other one. Nothing is wrong: the bucket copy handles either.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        if out is not None:
            write_metrics(out, state.rows)
        if state.epoch_done:
            state.epoch, state.step, sums = state.epoch + 1, 0, [0.0, 0.0, 0.0]
        if resume is not None and (state.stopped_early or state.epoch > config.epochs):
            say(f"{resume}: the run is finished ({'stopped early' if state.stopped_early else 'all'} after epoch "
                f"{state.epoch - 1} of {config.epochs}); nothing left to train")
        for callback in callbacks:
            callback.on_train_begin(state.epoch, resume is not None)
        while state.epoch <= config.epochs and not state.stopped_early:
            epoch = state.epoch
            lr = float(optimizer.param_groups[0]["lr"])
            start = time.perf_counter()
            totals, seen, data_state = run.train_epoch(train_epoch(epoch - 1), epoch, sums)
            loss_sum, correct, count, seen_all = all_reduce_sum(
                torch.cat([totals, torch.tensor([float(seen)], dtype=torch.float64, device=device)]), world).tolist()
            if count == 0:
                raise ValueError(f"train_epoch({epoch - 1}) yielded no samples")
            train_loss, train_acc = loss_sum / count, correct / count
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"epoch {epoch}: the training loss is {train_loss}; "
                                         "lower lr or the regularization strengths")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - start
            val_sums = class_sums(model, val_data, num_classes=num_classes, device=device, world=world)
            val_loss, val_acc = loss_and_accuracy(val_sums)
            if not math.isfinite(val_loss) and state.best_epoch == 0:  # no epoch could be "best": the
                # restored weights would be the initial ones (a later one counts as not improved)
                raise FloatingPointError(f"epoch {epoch}: the validation loss is {val_loss} (a non-finite value in "
                                         "the validation images, or weights that overflow); lower lr")
            val_sums.setflags(write=False)  # one array, handed to every callback
            for callback in callbacks:
                callback.on_validation(val_sums)
            gap = run.monitor.update(epoch, train_loss, train_acc, val_loss, val_acc)
            row: dict[str, float] = {
                "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                "val_acc": val_acc, "gap_loss": gap.loss, "gap_acc": gap.acc,
                **weight_stats(model, config.near_zero),
                "images_per_s": seen_all / max(train_seconds, 1e-9), "lr": lr,
                "seconds": time.perf_counter() - start,
            }
            for callback in callbacks:
                callback.on_epoch_end(row)
            state.rows.append(row)
            say(format_row(row))
            if gap.warning:
                say(f"warning: {gap.warning}")
            improved = val_loss < state.best_loss - config.min_delta
            if improved:
                state.best_loss, state.best_state, state.since_best = val_loss, _state_copy(model), 0
                state.best_epoch = epoch
            else:
                state.since_best += 1
            if out is not None:
                write_metrics(out, state.rows)
                if improved:
                    _save_weights(out / "best.pt", state.best_state, config, epoch, row)
                _save_weights(out / "last.pt", _state_copy(model), config, epoch, row)
            if state.since_best >= config.patience and epoch < config.epochs:
                state.stopped_early = True
                say(f"early stop after epoch {epoch}: val loss did not improve for {state.since_best} epochs; "
                    f"restoring epoch {state.best_epoch}")
            elif scheduler is not None:
                scheduler.step()
            run.checkpoint(epoch_done=True, sums=[0.0, 0.0, 0.0], data_state=data_state)
            state.epoch, state.step, sums = epoch + 1, 0, [0.0, 0.0, 0.0]
    history.rows, history.best_epoch, history.stopped_early = state.rows, state.best_epoch, state.stopped_early
    model.load_state_dict(state.best_state)
    if out is not None and state.rows:
        plot_curves(state.rows, out / "curves.png", best_epoch=history.best_epoch)
    for callback in callbacks:
        callback.on_train_end(history)
    return history


def settle_before_exit() -> None:
    """Call last in a process that trained: leaves no Python thread of ours running or waking while
    the interpreter shuts down, and no cyclic garbage for one to free. A daemon thread that starts
    a garbage collection during finalization and frees a tensor there releases the GIL, is ended by
    pthread_exit on taking it back, and the unwind through torch's C++ destructor aborts the process
    ("terminate called without an active exception": core dumps of the test session, 2026-11-26,
    and a stream's fetch thread caught inside such a collection on 2026-11-27)."""
    gc.collect()
    deadline = time.monotonic() + 10.0
    for thread in threading.enumerate():
        if thread.name.startswith(FETCH_THREAD_PREFIX):  # a stopped stream's fetch thread still ending
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    monitor = tqdm.monitor
    if monitor is not None:  # tqdm's daemon monitor wakes every 10 s once a bar was made
        monitor.exit()
    # Best effort, not a guarantee: a collective's last reference may be dropped by one of gloo's
    # C++ worker threads just after the call that waited for it returned, and dropping it takes the
    # GIL (the work's saved thread-local state holds Python objects). A core dump of a DDP rank that
    # aborted at exit (1 of 30 runs of tests/helpers/ddp_stream.py on a loaded machine, 2026-11-27;
    # `bash scripts/ddp_exit_loop.sh 30`) shows that thread ended in take_gil while the main thread
    # collected garbage in Py_FinalizeEx. Holding no GIL for a moment lets such a thread finish
    # first (0 aborts in 100 runs after).
    time.sleep(0.05)


def quiet(*_args: Any, **_kwargs: Any) -> None:
    """print() / the log of ranks other than 0."""
