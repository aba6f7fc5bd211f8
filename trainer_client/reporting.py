"""What a training run reports: the per-epoch line, metrics.csv / metrics.jsonl, curves.png.

Rows are dicts of floats whose first keys are `METRIC_KEYS`; a callback may add columns
(`Callback.on_epoch_end`), which the files carry after the standard ones.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "gap_loss", "gap_acc",
               "l1_norm", "l2_norm", "near_zero_frac", "images_per_s", "lr", "seconds")


def format_row(row: dict[str, float]) -> str:
    """The line a run prints for an epoch."""
    return (f"epoch {int(row['epoch'])}: "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.1f}% | "
            f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.1f}% | "
            f"gap loss {row['gap_loss']:+.4f} acc {100 * row['gap_acc']:+.1f} pts | "
            f"L1 {row['l1_norm']:.1f} L2 {row['l2_norm']:.2f} near-zero {100 * row['near_zero_frac']:.1f}% | "
            f"{row['images_per_s']:.0f} img/s | lr {row['lr']:.2e}")


def columns(rows: Sequence[dict[str, float]]) -> list[str]:
    """METRIC_KEYS, then every other key in the order rows first have it."""
    keys = list(METRIC_KEYS)
    for row in rows:
        keys += [k for k in row if k not in keys]
    return keys


def write_metrics(out: Path, rows: Sequence[dict[str, float]]) -> None:
    """metrics.csv and metrics.jsonl with every row so far (rewritten whole: a resumed run writes
    the checkpoint's rows again, and a column added later gets its header)."""
    fields = columns(rows)
    for name in ("metrics.csv", "metrics.jsonl"):
        tmp = out / f".{name}.tmp"
        with tmp.open("w", newline="") as f:
            if name.endswith(".csv"):
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            else:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        tmp.replace(out / name)


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
