"""Augmentation strength that follows the overfitting signal.

`StrengthController` is StyleGAN2-ADA's rule (Karras et al. 2020) for a classifier: after each
measurement of the *clean* generalization gap — the model in eval mode on a fixed subset of
un-augmented training images against the validation set — the strength s moves by a fixed
`step` toward keeping the gap at `target` (up when the gap is wider, down when narrower), and
stays in [0, 1]. Measuring on clean images matters: accuracy on *augmented* training batches
falls as s rises even without overfitting, which would push s down for the wrong reason.

`per_class=True` keeps one s per class from per-class gaps (a class that overfits gets stronger
augmentation, one that underfits weaker), sent as `class_strength` with a global strength of 1.
`schedule` makes the other two modes of `augsvc-train --augment-strength`: a fixed value, or a
linear ramp 0 -> 1 over the run. A controller's state (s and its history) is part of a
checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import ResumeMismatch
from .train import Callback, class_sums
from .world import World

__all__ = ["ClassGaps", "ControllerSettings", "StrengthCallback", "StrengthController", "StrengthSchedule",
           "clean_gaps", "gaps_from_sums", "parse_strength", "stratified_subset"]

GAP_METRICS = ("loss", "ratio", "acc")


@dataclass(frozen=True)
class ControllerSettings:
    """The controller's knobs. gap: which gap it watches, on clean images in eval mode ("loss":
    val loss - train loss; "ratio": the share of the validation loss that the training loss does
    not have, 1 - train loss / val loss, bounded above by 1 whatever the data size; "acc": train
    accuracy - val accuracy); target: the gap it keeps; step: how far s moves per update; start:
    s before the first update."""

    target: float = 0.1
    step: float = 0.05
    start: float = 0.0
    gap: str = "loss"
    per_class: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("target", math.isfinite(self.target), "a finite number"),
            ("step", 0.0 < self.step <= 1.0, "a value in (0, 1]"),
            ("start", 0.0 <= self.start <= 1.0, "a value in [0, 1]"),
            ("gap", self.gap in GAP_METRICS, f"one of {GAP_METRICS}"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class ClassGaps:
    """One measurement: the overall gap and one per class (NaN where a class has no images)."""

    overall: float
    per_class: np.ndarray


class StrengthController:
    """ADA's sign rule on the clean train-val gap; see the module docstring."""

    def __init__(self, settings: ControllerSettings, num_classes: int = 1) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes: {num_classes} is not allowed; expected >= 1")
        self.settings = settings
        self.num_classes = num_classes
        size = num_classes if settings.per_class else 1
        self.strength = np.full(size, settings.start, np.float64)
        #: (step, gap, strength after the update) per update.
        self.history: list[tuple[int, float, list[float]]] = []

    @property
    def global_strength(self) -> float:
        """The strength to send as the spec's (1 in per-class mode: the classes carry it)."""
        return 1.0 if self.settings.per_class else float(self.strength[0])

    @property
    def class_strength(self) -> list[float] | None:
        return [float(v) for v in self.strength] if self.settings.per_class else None

    def update(self, gaps: ClassGaps, step: int = 0) -> np.ndarray:
        """Move s one step toward keeping the gap at the target; returns the new strength(s)."""
        s = self.settings
        observed = gaps.per_class if s.per_class else np.array([gaps.overall])
        if observed.shape != self.strength.shape:
            raise ValueError(f"gaps: {observed.shape[0]} values for a controller of {self.strength.size}")
        direction = np.sign(np.nan_to_num(observed - s.target, nan=0.0))  # no images of a class: hold
        self.strength = np.clip(self.strength + s.step * direction, 0.0, 1.0)
        self.history.append((step, float(gaps.overall), [float(v) for v in self.strength]))
        return self.strength.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"strength": self.strength.tolist(), "history": [list(h) for h in self.history],
                "settings": self.settings.__dict__.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("settings", self.settings.__dict__) != self.settings.__dict__:
            raise ValueError(f"state_dict: controller settings {state['settings']} do not match "
                             f"{self.settings.__dict__}")
        strength = np.asarray(state["strength"], np.float64)
        if strength.shape != self.strength.shape:
            raise ValueError(f"state_dict: {strength.size} strengths for a controller of {self.strength.size}")
        self.strength = strength
        self.history = [(int(h[0]), float(h[1]), [float(v) for v in h[2]]) for h in state["history"]]


@dataclass(frozen=True)
class StrengthSchedule:
    """`--augment-strength`: "adaptive" (a controller), a fixed FLOAT, or "ramp" (0 -> 1 linearly)."""

    kind: str                      # "fixed" | "ramp" | "adaptive"
    value: float = 1.0             # fixed: the strength

    def at(self, progress: float) -> float:
        """The scheduled strength at `progress` (0 at the start of training, 1 at its end)."""
        if self.kind == "ramp":
            return float(min(1.0, max(0.0, progress)))
        return self.value


def parse_strength(text: str) -> StrengthSchedule:
    """`adaptive`, `ramp`, or a number in [0, 1]."""
    if text in ("adaptive", "ramp"):
        return StrengthSchedule(text)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--augment-strength: {text!r} is not allowed; expected adaptive, ramp or a number "
                         "in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--augment-strength: {value} is outside [0, 1]")
    return StrengthSchedule("fixed", value)


#: Batches as a stream yields them: (images, labels), (images, labels, ids), or with a fourth
#: element, the mask of real (not padding) samples.
Batches = Iterable[Sequence[torch.Tensor]]


def gaps_from_sums(train: np.ndarray, val: np.ndarray, gap: str = "loss") -> ClassGaps:
    """The generalization gap from two `class_sums` ([3, K]: loss, correct, count per class) of
    clean training images and of the validation set, overall and per class."""
    (t_loss, t_correct, t_count), (v_loss, v_correct, v_count) = train, val
    with np.errstate(invalid="ignore", divide="ignore"):
        if gap == "loss":
            per_class = v_loss / v_count - t_loss / t_count
            overall = v_loss.sum() / v_count.sum() - t_loss.sum() / t_count.sum()
        elif gap == "ratio":
            per_class = 1.0 - (t_loss / t_count) / (v_loss / v_count)
            overall = 1.0 - (t_loss.sum() / t_count.sum()) / (v_loss.sum() / v_count.sum())
        else:
            per_class = t_correct / t_count - v_correct / v_count
            overall = t_correct.sum() / t_count.sum() - v_correct.sum() / v_count.sum()
    return ClassGaps(float(overall), per_class)


def clean_gaps(model: nn.Module, train: Batches, val: Batches, *, num_classes: int, gap: str = "loss",
               device: torch.device | None = None, world: World | None = None,
               reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> ClassGaps:
    """The generalization gap of `model` in eval mode: batches of clean training images `train`
    against the validation batches `val`, overall and per class; with a distributed `world`, the
    sums of every rank's shards. reduce (the older way to say it): adds the stacked per-class sums
    ([6, K]: the train rows, then the validation rows) over the ranks."""
    def sums(batches: Batches) -> np.ndarray:
        return class_sums(model, batches, num_classes=num_classes, device=device, world=world)

    train_sums, val_sums = sums(train), sums(val)
    if reduce is not None:
        both = reduce(np.concatenate([train_sums, val_sums]))
        train_sums, val_sums = both[:3], both[3:]
    return gaps_from_sums(train_sums, val_sums, gap)


class StrengthCallback(Callback):
    """augsvc-train's --augment-strength: the strength each epoch trains at. "fixed" and "ramp"
    follow the schedule (the ramp goes 0 -> 1 from the first epoch to the last); "adaptive" asks
    `measure(val_sums)` for the clean gaps after each epoch — val_sums: the `class_sums` of the
    epoch's validation pass, which `fit` hands over (on_validation), so the validation set is
    scored once — and moves the controller. Adds the columns `strength` (the epoch's) and, when
    adaptive, `clean_gap`; a checkpoint holds its state."""

    def __init__(self, schedule: StrengthSchedule, epochs: int, *, controller: StrengthController | None = None,
                 measure: Callable[..., ClassGaps] | None = None) -> None:
        if schedule.kind == "adaptive" and (controller is None or measure is None):
            raise ValueError("an adaptive strength needs a controller and a measure of the clean gap")
        self.schedule, self.epochs = schedule, epochs
        self.controller, self.measure = controller, measure
        #: a measure() of no arguments (the older form) scores the validation set itself
        self._measure_takes_sums = measure is not None and bool(inspect.signature(measure).parameters)
        self.epoch = 0  # the next epoch to train (0-based)
        self.val_sums: np.ndarray | None = None  # this epoch's, from fit

    @property
    def strength(self) -> float:
        """The global strength of epoch `self.epoch`."""
        if self.controller is not None:
            return self.controller.global_strength
        return self.schedule.at(self.epoch / max(1, self.epochs - 1))

    @property
    def class_strength(self) -> list[float] | None:
        return self.controller.class_strength if self.controller is not None else None

    def on_validation(self, sums: np.ndarray) -> None:
        self.val_sums = sums

    def on_epoch_end(self, row: dict[str, float]) -> None:
        row["strength"] = self.strength if self.class_strength is None else float(np.mean(self.class_strength))
        if self.controller is not None and self.measure is not None:
            gaps = self.measure(self.val_sums) if self._measure_takes_sums else self.measure()
            self.val_sums = None
            self.controller.update(gaps, int(row["epoch"]))
            row["clean_gap"] = gaps.overall
        self.epoch = int(row["epoch"])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "controller": self.controller.state_dict() if self.controller else None,
                "schedule": [self.schedule.kind, self.schedule.value]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The state of a run with the same schedule (ResumeMismatch otherwise; a state from
        before the schedule was saved is taken as it is)."""
        saved = state.get("schedule")
        if saved is not None and (saved[0], float(saved[1])) != (self.schedule.kind, self.schedule.value):
            def name(kind: str, value: float) -> str:
                return f"{value:g}" if kind == "fixed" else kind

            raise ResumeMismatch(f"the strength schedule is {name(self.schedule.kind, self.schedule.value)}; the "
                             f"checkpoint's run used {name(saved[0], float(saved[1]))}")
        self.epoch = int(state["epoch"])
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])


def stratified_subset(labels: Sequence[int] | np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Positions into `labels`: at most `per_class` of each class, drawn from `seed` (sorted)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
