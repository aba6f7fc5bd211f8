"""The regularization experiment: does augmentation and/or dropout+L2+BN close the overfitting gap?

On a small training subset of the built-in digits (so overfitting is real), four configurations
— nothing; augmentation only; dropout+L2+BN only; both — are trained over several seeds with the
same model family and loop, and summarized in `regularization.md` (mean ± std) and
`regularization.png`. The data source is injected: `make_train_epoch(augment, seed)` returns a
`train_epoch` callable for `fit`, backed by the gRPC stream in the CLI or by the in-process
engine (`make_local_train_epoch`) in tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import RegularizedCNN
from .train import TrainConfig, TrainEpoch, ValData, evaluate, fit

MakeTrainEpoch = Callable[[bool, int], TrainEpoch]

DIGITS_COUNT = 1797
DIGITS_MEAN = (0.305,)
"""Pixel mean/std of the built-in digits at 32x32, in [0, 1] units (for the model's normalization)."""
DIGITS_STD = (0.323,)
DIGITS_SPEC: dict[str, Any] = {
    # No flips: digits are not flip-invariant.
    "transforms": [
        {"rotate": {"limit_range": [-12, 12], "p": 1.0}},
        {"scale": {"scale_range": [0.9, 1.1], "p": 1.0}},
        {"color": {"brightness": 0.2, "contrast": 0.2, "p": 0.8}},
    ],
    "border": "constant",
}
"""A default augmentation spec for the digits."""


@dataclass(frozen=True)
class RegularizationConfig:
    """One arm of the experiment: which regularizers are on."""

    name: str
    augment: bool
    dropout: float
    weight_decay: float
    batch_norm: bool
    l1: float = 0.0
    label_smoothing: float = 0.0


REGULARIZATION_CONFIGS: tuple[RegularizationConfig, ...] = (
    RegularizationConfig("nothing", augment=False, dropout=0.0, weight_decay=0.0, batch_norm=False),
    RegularizationConfig("augmentation only", augment=True, dropout=0.0, weight_decay=0.0, batch_norm=False),
    RegularizationConfig("dropout+L2+BN only", augment=False, dropout=0.3, weight_decay=5e-2,
                         batch_norm=True),
    RegularizationConfig("both", augment=True, dropout=0.3, weight_decay=5e-2, batch_norm=True),
)


@dataclass
class RunResult:
    """One (config, seed) run, measured at the restored best epoch.

    gap_acc: train accuracy of the final model in eval mode on the un-augmented training set,
    minus val accuracy — the generalization gap, free of dropout/augmentation noise.
    running_gap_acc: the same from fit's running train accuracy (what the monitor watches).
    """

    config: str
    seed: int
    val_acc: float
    val_loss: float
    train_acc: float
    gap_acc: float
    running_gap_acc: float
    epochs_run: int
    best_epoch: int
    seconds: float
    val_curve: list[float] = field(default_factory=list)


@dataclass
class ExperimentResult:
    runs: list[RunResult]
    summary: dict[str, dict[str, float]]
    passed: bool
    verdict: str
    table: str
    seconds: float


def load_digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The built-in dataset as the server holds it: uint8 (1797, size, size, 1) and int64 labels."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = (digits.images * 255 / 16).round().astype(np.uint8)
    images = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in scaled])
    return images[..., None], digits.target.astype(np.int64)


def digits_split(n_train: int = 200, n_val: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, disjoint (train_ids, val_ids) into the 1,797 digits of `load_digits()`.

    The validation ids depend only on (n_val, seed), so runs with different n_train share the
    same validation set. Deterministic; ids come back sorted.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if n_train < 10 or n_val < 10 or n_train + n_val > DIGITS_COUNT:
        raise ValueError(f"n_train={n_train}, n_val={n_val}: each must be >= 10 (one per class) "
                         f"and together at most {DIGITS_COUNT}")
    labels = load_digits().target
    ids = np.arange(DIGITS_COUNT)
    rest, val = train_test_split(ids, test_size=n_val, stratify=labels, random_state=seed)
    if n_train == len(rest):
        train = rest
    else:
        train, _ = train_test_split(rest, train_size=n_train, stratify=labels[rest], random_state=seed)
    return np.sort(train).astype(np.int64), np.sort(val).astype(np.int64)


def to_tensors(images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC uint8 rows `ids` -> (uint8 [N, C, H, W], int64 [N]) tensors, e.g. a validation set."""
    x = np.ascontiguousarray(images[ids].transpose(0, 3, 1, 2))
    return torch.from_numpy(x), torch.from_numpy(labels[ids].astype(np.int64))


def make_local_train_epoch(images: np.ndarray, labels: np.ndarray, train_ids: np.ndarray, *,
                           spec: dict[str, Any] | None = None, batch_size: int = 32) -> MakeTrainEpoch:
    """An in-process `make_train_epoch(augment, seed)`: the same epoch plan and augmentation as the
    service (`augsvc.epoch_batches`, `augsvc.augment_batch`) without a server."""
    from augsvc import augment_batch, epoch_batches

    spec = DIGITS_SPEC if spec is None else spec

    def make(augment: bool, seed: int) -> TrainEpoch:
        def train_epoch(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            batches = []
            for ids in epoch_batches(train_ids, batch_size, seed=seed, epoch=epoch):
                x = images[ids]
                if augment:
                    x = augment_batch(x, spec, seed=seed, epoch=epoch, sample_ids=ids)
                nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
                batches.append((nchw, torch.from_numpy(labels[ids].astype(np.int64)), torch.from_numpy(ids)))
            return batches
        return train_epoch
    return make


def _run_one(cfg: RegularizationConfig, seed: int, make_train_epoch: MakeTrainEpoch, val_data: ValData,
             run_dir: Path | None, model_kwargs: dict[str, Any], train_kwargs: dict[str, Any],
             log: Callable[[str], None]) -> RunResult:
    start = time.perf_counter()
    model = RegularizedCNN(dropout=cfg.dropout, batch_norm=cfg.batch_norm, seed=seed, **model_kwargs)
    config = TrainConfig(weight_decay=cfg.weight_decay, l1=cfg.l1, label_smoothing=cfg.label_smoothing,
                         out_dir=run_dir, seed=seed, **train_kwargs)
    history = fit(model, make_train_epoch(cfg.augment, seed), val_data, config, log=lambda _: None)
    clean = make_train_epoch(False, seed)
    _, train_acc = evaluate(model, lambda: clean(0))
    best = history.best
    result = RunResult(
        config=cfg.name, seed=seed, val_acc=best["val_acc"], val_loss=best["val_loss"], train_acc=train_acc,
        gap_acc=train_acc - best["val_acc"], running_gap_acc=best["gap_acc"], epochs_run=len(history.rows),
        best_epoch=history.best_epoch, seconds=time.perf_counter() - start,
        val_curve=[r["val_acc"] for r in history.rows])
    log(f"{cfg.name:>20} seed {seed}: val acc {100 * result.val_acc:.1f}% "
        f"gap {100 * result.gap_acc:+.1f} pts "
        f"(running {100 * result.running_gap_acc:+.1f}) best epoch {result.best_epoch}/{result.epochs_run} "
        f"[{result.seconds:.1f}s]")
    return result


def _summarize(runs: Sequence[RunResult], names: Sequence[str]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        rs = [r for r in runs if r.config == name]
        row: dict[str, float] = {}
        for key in ("val_acc", "gap_acc", "running_gap_acc", "train_acc"):
            vals = np.array([getattr(r, key) for r in rs]) * 100
            row[key] = float(vals.mean())
            row[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        row["epochs_run"] = float(np.mean([r.epochs_run for r in rs]))
        row["best_epoch"] = float(np.mean([r.best_epoch for r in rs]))
        summary[name] = row
    return summary


def _verdict(summary: dict[str, dict[str, float]]) -> tuple[bool, str]:
    if "nothing" not in summary or "both" not in summary:
        return False, "verdict: needs the 'nothing' and 'both' configurations"
    gain = summary["both"]["val_acc"] - summary["nothing"]["val_acc"]
    gap_n, gap_b = summary["nothing"]["gap_acc"], summary["both"]["gap_acc"]
    passed = gain >= 3.0 and gap_b <= 0.5 * gap_n
    return passed, (f"verdict: {'PASS' if passed else 'FAIL'} — 'both' is {gain:+.1f} points of val "
                    f"accuracy over 'nothing' (need >= +3.0) with a train-val gap of {gap_b:.1f} vs "
                    f"{gap_n:.1f} points "
                    f"(need <= half, {0.5 * gap_n:.1f})")


def _markdown(summary: dict[str, dict[str, float]], configs: Sequence[RegularizationConfig],
              seeds: Sequence[int], verdict: str, setup: str) -> str:
    lines = [
        "# Regularization experiment", "",
        setup, "",
        f"Mean ± sample std over seeds {list(seeds)}, measured at the restored best epoch (lowest val loss).",
        "Gap = train accuracy (eval mode, un-augmented training images) − val accuracy; the running gap",
        "uses the epoch's running train accuracy (augmented, dropout on), as the overfitting monitor does.",
        "",
        "| config | augment | dropout | weight decay | BN | val acc (%) | train−val gap (pts) "
        "| running gap (pts) | epochs run | best epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in configs:
        s = summary[c.name]
        lines.append(
            f"| {c.name} | {'yes' if c.augment else 'no'} | {c.dropout:g} | {c.weight_decay:g} | "
            f"{'yes' if c.batch_norm else 'no'} | {s['val_acc']:.1f} ± {s['val_acc_std']:.1f} | "
            f"{s['gap_acc']:.1f} ± {s['gap_acc_std']:.1f} | "
            f"{s['running_gap_acc']:.1f} ± {s['running_gap_acc_std']:.1f} | "
            f"{s['epochs_run']:.1f} | {s['best_epoch']:.1f} |")
    lines += ["", verdict, ""]
    return "\n".join(lines)


def _plot(summary: dict[str, dict[str, float]], runs: Sequence[RunResult], names: Sequence[str],
          path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), layout="constrained")
    ax_curve, ax_acc, ax_gap = fig.subplots(1, 3)
    for i, name in enumerate(names):
        for j, r in enumerate(r for r in runs if r.config == name):
            ax_curve.plot(range(1, len(r.val_curve) + 1), [100 * v for v in r.val_curve], color=f"C{i}",
                          alpha=0.7, linewidth=1, label=name if j == 0 else None)
    ax_curve.set(title="val accuracy per epoch (each seed)", xlabel="epoch", ylabel="val accuracy (%)")
    ax_curve.legend(fontsize=8)
    x = np.arange(len(names))
    colors = [f"C{i}" for i in range(len(names))]
    ax_acc.bar(x, [summary[n]["val_acc"] for n in names], yerr=[summary[n]["val_acc_std"] for n in names],
               color=colors, capsize=4)
    lo = min(summary[n]["val_acc"] - summary[n]["val_acc_std"] for n in names)
    ax_acc.set(title="val accuracy (best epoch)", ylabel="%", ylim=(max(0.0, lo - 5), 100))
    ax_gap.bar(x, [summary[n]["gap_acc"] for n in names], yerr=[summary[n]["gap_acc_std"] for n in names],
               color=colors, capsize=4)
    ax_gap.set(title="train − val accuracy gap", ylabel="points")
    for ax in (ax_acc, ax_gap, ax_curve):
        ax.grid(alpha=0.3)
    for ax in (ax_acc, ax_gap):
        ax.set_xticks(x, names, rotation=15, fontsize=8)
    fig.savefig(path, dpi=100)


def run_regularization_experiment(
    make_train_epoch: MakeTrainEpoch, val_data: ValData, *,
    configs: Sequence[RegularizationConfig] = REGULARIZATION_CONFIGS, seeds: Sequence[int] = (0, 1, 2),
    out_dir: Path, epochs: int = 60, lr: float = 3e-3, patience: int = 15, width: int = 32, depth: int = 3,
    in_channels: int = 1, num_classes: int = 10, mean: Sequence[float] = DIGITS_MEAN,
    std: Sequence[float] = DIGITS_STD, device: str = "auto", keep_runs: bool = True, data_note: str = "",
    log: Callable[[str], None] = print,
) -> ExperimentResult:
    """Train every config over every seed; write regularization.md and regularization.png to out_dir.

    make_train_epoch(augment, seed) -> train_epoch for `fit`; val_data: un-augmented validation
    data as `fit` takes it. The seed drives the model init, dropout, the epoch order and the
    augmentation draws. keep_runs: also keep each run's metrics, checkpoints and curves under
    out_dir/runs/. data_note: a line on the data (subset size, batch size, spec) for the report.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configs: names must be unique, got {names}")
    model_kwargs = {"in_channels": in_channels, "num_classes": num_classes, "width": width, "depth": depth,
                    "mean": tuple(mean), "std": tuple(std)}
    train_kwargs = {"epochs": epochs, "lr": lr, "patience": patience, "device": device, "progress": False}
    runs: list[RunResult] = []
    for cfg in configs:
        for seed in seeds:
            slug = cfg.name.replace(" ", "-").replace("+", "-")
            run_dir = out_dir / "runs" / f"{slug}-seed{seed}" if keep_runs else None
            runs.append(_run_one(cfg, seed, make_train_epoch, val_data, run_dir, model_kwargs, train_kwargs,
                                 log))
    summary = _summarize(runs, names)
    passed, verdict = _verdict(summary)
    setup = (f"Model: RegularizedCNN width {width}, depth {depth}; AdamW lr {lr}, cosine schedule, "
             f"up to {epochs} epochs, early stopping patience {patience} on val loss.")
    if data_note:
        setup = f"{data_note}\n{setup}"
    table = _markdown(summary, configs, seeds, verdict, setup)
    (out_dir / "regularization.md").write_text(table)
    _plot(summary, runs, names, out_dir / "regularization.png")
    seconds = time.perf_counter() - start
    log(verdict)
    log(f"regularization experiment: {len(runs)} runs in {seconds:.0f}s -> {out_dir / 'regularization.md'}")
    return ExperimentResult(runs=runs, summary=summary, passed=passed, verdict=verdict, table=table,
                            seconds=seconds)


def run_digits_regularization_experiment(out_dir: Path, *, n_train: int = 200, n_val: int = 400,
                                         split_seed: int = 0, spec: dict[str, Any] | None = None,
                                         batch_size: int = 16, **kwargs: Any) -> ExperimentResult:
    """The experiment on the built-in digits, in process (no server): a convenience and a reference."""
    images, labels = load_digits_images()
    train_ids, val_ids = digits_split(n_train, n_val, seed=split_seed)
    make = make_local_train_epoch(images, labels, train_ids, spec=spec, batch_size=batch_size)
    kwargs.setdefault("data_note", (
        f"Data: built-in digits at 32x32, {n_train} training images, {n_val} validation images "
        f"(stratified, split seed {split_seed}), batch size {batch_size}, in-process augmentation with "
        f"`{json.dumps(DIGITS_SPEC if spec is None else spec)}`."))
    return run_regularization_experiment(make, to_tensors(images, labels, val_ids), out_dir=out_dir, **kwargs)
