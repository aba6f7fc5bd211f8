"""The overfitting monitor: the train-val gap each epoch, and a warning when it keeps widening."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

    def state_dict(self) -> dict[str, Any]:
        """The streaks, the last gap and the warnings so far (for a checkpoint)."""
        prev = None if self._prev is None else {"loss": self._prev.loss, "acc": self._prev.acc}
        return {"prev": prev, "streak_loss": self._streak_loss, "streak_acc": self._streak_acc,
                "warnings": list(self.warnings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prev = state["prev"]
        self._prev = None if prev is None else GapReport(loss=float(prev["loss"]), acc=float(prev["acc"]))
        self._streak_loss, self._streak_acc = int(state["streak_loss"]), int(state["streak_acc"])
        self.warnings[:] = [str(w) for w in state["warnings"]]
