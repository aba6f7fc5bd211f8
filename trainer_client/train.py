"""Training loop: regularizers, early stopping, an overfitting monitor, checkpoints and curves.

`fit` trains any classifier that takes uint8 [N, C, H, W] batches (RegularizedCNN does its own
normalization). Regularizers: L2 as decoupled weight decay (AdamW, or SGD's weight decay), an
optional L1 penalty added to the loss, label smoothing, and whatever dropout/batch norm the model
has. Validation runs on un-augmented data after every epoch; early stopping watches the
validation loss and the best weights are restored at the end. The L1/L2 norms of the weights and
their near-zero fraction are logged every epoch, so the effect of L1/L2 can be seen in the logs.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

Batch = Sequence[torch.Tensor]
"""(images uint8 [N, C, H, W], labels int64 [N], *extra) — extra items (sample ids) are ignored."""
TrainEpoch = Callable[[int], Iterable[Batch]]
ValData = tuple[torch.Tensor, torch.Tensor] | Callable[[], Iterable[Batch]]

METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "gap_loss", "gap_acc",
               "l1_norm", "l2_norm", "near_zero_frac", "images_per_s", "lr", "seconds")
_OPTIMIZERS = ("adamw", "sgd")
_SCHEDULES = ("cosine", "constant")


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
    (None writes nothing). seed: seeds torch's RNG inside `fit` (dropout masks).
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
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; expected {allowed}")
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)


@dataclass
class GapReport:
    """One epoch's generalization gap. Positive values mean the model fits train better than val."""

    loss: float
    acc: float
    warning: str | None = None


class OverfitMonitor:
    """Reports the train-val gap each epoch and warns when it keeps widening.

    gap_loss = val_loss - train_loss; gap_acc = train_acc - val_acc. An epoch "widens" a gap when
    the gap grew and is positive (a negative gap shrinking toward zero, as in the first epochs,
    is not overfitting). After `warn_epochs` widening epochs in a row of either gap, every
    further widening epoch produces a warning; any non-widening epoch resets that gap's streak.
    """

    def __init__(self, warn_epochs: int = 3) -> None:
        if warn_epochs < 1:
            raise ValueError(f"warn_epochs: {warn_epochs} is not allowed; expected an integer >= 1")
        self.warn_epochs = warn_epochs
        self.warnings: list[str] = []
        self._prev: GapReport | None = None
        self._streak_loss = 0
        self._streak_acc = 0

    def update(self, epoch: int, train_loss: float, train_acc: float, val_loss: float,
               val_acc: float) -> GapReport:
        gap = GapReport(loss=val_loss - train_loss, acc=train_acc - val_acc)
        if self._prev is not None:
            self._streak_loss = self._streak_loss + 1 if 0 < gap.loss and self._prev.loss < gap.loss else 0
            self._streak_acc = self._streak_acc + 1 if 0 < gap.acc and self._prev.acc < gap.acc else 0
        self._prev = gap
        widening = []
        if self._streak_acc >= self.warn_epochs:
            widening.append(f"accuracy gap {100 * gap.acc:.1f} points ({self._streak_acc} epochs)")
        if self._streak_loss >= self.warn_epochs:
            widening.append(f"loss gap {gap.loss:.3f} ({self._streak_loss} epochs)")
        if widening:
            gap.warning = (f"epoch {epoch}: train-val gap keeps widening: {'; '.join(widening)} "
                           "— the model is overfitting; consider more regularization or stopping")
            self.warnings.append(gap.warning)
        return gap


@dataclass
class History:
    """What `fit` did: one metrics row per epoch (keys: METRIC_KEYS), the best epoch (1-based,
    by validation loss; its weights are the ones left in the model), and the monitor's warnings."""

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
    flat = torch.cat([w.detach().flatten().float() for w in weights])
    return {"l1_norm": flat.abs().sum().item(), "l2_norm": flat.norm().item(),
            "near_zero_frac": (flat.abs() < near_zero).float().mean().item()}


def _split_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if len(batch) < 2:
        raise ValueError(f"batch: expected (images, labels, ...), got a sequence of {len(batch)}")
    images, labels = batch[0], batch[1]
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True).long()


def _val_batches(val_data: ValData, batch_size: int) -> Iterator[Batch]:
    if callable(val_data):
        yield from val_data()
        return
    images, labels = val_data
    if len(images) != len(labels):
        raise ValueError(f"val_data: {len(images)} images but {len(labels)} labels")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, val_data: ValData, *, device: torch.device | None = None,
             batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` in eval mode (plain CE, no smoothing)."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in _val_batches(val_data, batch_size):
        images, labels = _split_batch(batch, device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum().item())
        count += len(labels)
    model.train(was_training)
    if count == 0:
        raise ValueError("val_data: yielded no samples")
    return loss_sum / count, correct / count


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
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


def _train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                     config: TrainConfig, device: torch.device, epoch: int) -> tuple[float, float, int]:
    """One pass in train mode; returns running (plain CE loss, accuracy, images)."""
    model.train()
    weights = penalized_weights(model) if config.l1 > 0 else []
    # Sums stay on the device; reading them every step would sync a GPU after each batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    bar = tqdm(total=None, unit="img", unit_scale=True, leave=False, disable=not config.progress,
               desc=f"epoch {epoch}/{config.epochs}")
    with bar:
        for step, batch in enumerate(batches):
            images, labels = _split_batch(batch, device)
            logits = model(images)
            loss = training_loss(logits, labels, weights, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            with torch.no_grad():
                loss_sum += F.cross_entropy(logits, labels, reduction="sum")
                correct += (logits.argmax(1) == labels).sum()
            count += len(labels)
            bar.update(len(labels))
            if step % 10 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss_sum.item() / count:.3f}", refresh=False)
    if count == 0:
        raise ValueError(f"train_epoch({epoch - 1}) yielded no samples")
    mean_loss = loss_sum.item() / count
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"epoch {epoch}: the training loss is {mean_loss}; "
                                 "lower lr or the regularization strengths")
    return mean_loss, int(correct.item()) / count, count


def _jsonable_config(config: TrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save(path: Path, state: dict[str, torch.Tensor], config: TrainConfig, epoch: int,
          metrics: dict[str, float]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model_state": state, "config": _jsonable_config(config), "epoch": epoch,
                "metrics": metrics}, tmp)
    tmp.replace(path)  # a reader never sees a half-written checkpoint


def _format_row(row: dict[str, float]) -> str:
    return (f"epoch {int(row['epoch'])}: "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.1f}% | "
            f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.1f}% | "
            f"gap loss {row['gap_loss']:+.4f} acc {100 * row['gap_acc']:+.1f} pts | "
            f"L1 {row['l1_norm']:.1f} L2 {row['l2_norm']:.2f} near-zero {100 * row['near_zero_frac']:.1f}% | "
            f"{row['images_per_s']:.0f} img/s | lr {row['lr']:.2e}")


def fit(model: nn.Module, train_epoch: TrainEpoch, val_data: ValData, config: TrainConfig, *,
        log: Callable[[str], None] = print) -> History:
    """Train `model`, validating after every epoch; returns the History, best weights restored.

    train_epoch(e) yields the batches of epoch e (e is 0-based, as the data stream counts; rows
    and logs count epochs from 1). val_data: (images, labels) tensors or a callable returning
    un-augmented batches. The train metrics are the running loss/accuracy over the epoch in
    train mode (on augmented data, with dropout active), the usual "train" curve; so the gap
    (train - val) is the gap between that curve and the eval-mode validation metrics. Reported
    losses are plain cross-entropy, without label smoothing or the L1 term.
    """
    device = resolve_device(config.device)
    model.to(device)
    optimizer = _make_optimizer(model, config)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.lr_schedule == "cosine" else None)
    monitor = OverfitMonitor(config.gap_warn_epochs)
    history = History(warnings=monitor.warnings)
    out = config.out_dir
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.csv", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    best_loss, best_state, since_best = math.inf, _state_copy(model), 0
    # Seeding here (inside a forked RNG state) makes dropout masks a function of config.seed
    # without leaving torch's global RNG changed for the caller.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)
        for epoch in range(1, config.epochs + 1):
            lr = float(optimizer.param_groups[0]["lr"])
            start = time.perf_counter()
            train_loss, train_acc, seen = _train_one_epoch(model, train_epoch(epoch - 1), optimizer,
                                                           config, device, epoch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - start
            val_loss, val_acc = evaluate(model, val_data, device=device)
            gap = monitor.update(epoch, train_loss, train_acc, val_loss, val_acc)
            row: dict[str, float] = {
                "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                "val_acc": val_acc, "gap_loss": gap.loss, "gap_acc": gap.acc,
                **weight_stats(model, config.near_zero),
                "images_per_s": seen / max(train_seconds, 1e-9), "lr": lr,
                "seconds": time.perf_counter() - start,
            }
            history.rows.append(row)
            log(_format_row(row))
            if gap.warning:
                log(f"warning: {gap.warning}")
            improved = val_loss < best_loss - config.min_delta
            if improved:
                best_loss, best_state, since_best = val_loss, _state_copy(model), 0
                history.best_epoch = epoch
            else:
                since_best += 1
            if out is not None:
                _append_metrics(out, row)
                if improved:
                    _save(out / "best.pt", best_state, config, epoch, row)
                _save(out / "last.pt", _state_copy(model), config, epoch, row)
            if since_best >= config.patience and epoch < config.epochs:
                history.stopped_early = True
                log(f"early stop after epoch {epoch}: val loss did not improve for {since_best} epochs; "
                    f"restoring epoch {history.best_epoch}")
                break
            if scheduler is not None:
                scheduler.step()
    model.load_state_dict(best_state)
    if out is not None:
        plot_curves(history.rows, out / "curves.png", best_epoch=history.best_epoch)
    return history


def _append_metrics(out: Path, row: dict[str, float]) -> None:
    csv_path = out / "metrics.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_KEYS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def plot_curves(rows: Sequence[dict[str, float]], path: Path, *, best_epoch: int | None = None) -> None:
    """Two panels, loss and accuracy, train vs val per epoch; a dashed line marks the best epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker=".", label="val")
    ax_loss.set(title="loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], marker=".", label="train")
    ax_acc.plot(epochs, [100 * r["val_acc"] for r in rows], marker=".", label="val")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        if best_epoch:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1,
                       label=f"best (epoch {best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
