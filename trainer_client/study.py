"""The adaptive-augmentation study: `augsvc-train --experiment adaptive`.

Does augmentation strength that follows the overfitting signal (`adaptive.StrengthController`)
do as well as the best fixed strength, without a sweep? On the built-in digits, at 10, 30 and
100 training images per class, each seed draws one split shared by every arm of that seed:
20 validation images per class, nested training sets (10 of them in the 30, the 30 in the 100)
and one test set (every image in neither), so sizes are compared on the same test images. Arms:
fixed strengths (0 is "no augmentation"), a linear ramp 0 -> 1, the adaptive controller (global)
and its per-class mode; "fixed, chosen on validation" picks, per size and seed, the fixed
strength with the best final validation accuracy. Every arm of a size gets the same budget of
optimizer steps (no early stopping), the same initialisation and the same sample order — the
batches stream from augsvc, whose counter-based draws give every arm the same random numbers
at any strength — and is scored on the test set after its last step.

Each run's result is a JSON file under the output folder, so an interrupted study resumes where
it stopped; `report` turns whatever has finished into a table, the paired differences, the
fixed-strength curve per size, the s(t) plot, and how often an ideal controller would pass the
issue's bar with this study's noise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .adaptive import GAP_METRICS, ControllerSettings, StrengthController, clean_gaps, stratified_subset
from .model import RegularizedCNN
from .train import TrainConfig, class_sums, make_optimizer, training_loss

__all__ = ["ARMS", "STUDY_SPEC", "Arm", "study_arms", "StudyConfig", "Digits", "report", "run_study", "study_split"]

NUM_CLASSES = 10
#: Pixel mean/std of the built-in digits at 32x32 (the model's normalization).
DIGITS_MEAN, DIGITS_STD = (0.305,), (0.323,)

#: One strong spec whose strength the arms scale (no flips: a mirrored 2 is not a 2).
STUDY_SPEC: dict[str, Any] = {
    "transforms": [
        {"rotate": {"limit_range": [-45, 45]}},
        {"scale": {"scale_range": [0.6, 1.6]}},
        {"translate": {"x_range": [-0.25, 0.25], "y_range": [-0.25, 0.25]}},
        {"color": {"brightness": 0.6, "contrast": 0.6}},
        {"coarse_dropout": {"num_holes_range": [1, 2], "hole_height_range": [0.2, 0.45],
                            "hole_width_range": [0.2, 0.45], "p": 0.5}},
    ],
    "border": "constant",
}


@dataclass(frozen=True)
class Arm:
    """How one arm sets the strength: "fixed" (value), "ramp" (0 -> 1), "adaptive" (a controller)."""

    name: str
    kind: str
    value: float = 0.0
    per_class: bool = False


FIXED = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The strength of STUDY_SPEC that s = 1 means, and the controller's settings: both fixed before
#: a study on the validation sets of calibration seeds (README: "Augmentation that follows the
#: overfitting signal"). The first study (2026-11-26: top 1, target 0.9, seeds 100 and 101) found
#: every s >= 0.75 far worse at every size and the best fixed s at 0.25 everywhere; the second
#: (top 0.5; target 0.8, step 0.05, start 0 from seeds 100-103) a controller that keeps s at 0
#: for the first few hundred steps; the third's settings are the lowest worst-size validation
#: regret of six candidates on seeds 100-107.
STUDY_TOP = 0.5
STUDY_CONTROLLER = ControllerSettings(gap="ratio", target=0.8, step=0.025, start=0.5)
#: Settings added to StudyConfig after studies were run, with the value those studies used.
_ADDED_LATER = {"top": 1.0}


def study_arms(fixed: Sequence[float] = FIXED) -> tuple[Arm, ...]:
    """The fixed arms of grid `fixed`, the ramp and the two controllers."""
    names = (f"fixed {s:.2f}" if round(s, 2) == s else f"fixed {s:.3f}" for s in fixed)
    return (*(Arm(name, "fixed", s) for name, s in zip(names, fixed, strict=True)), Arm("ramp", "ramp"),
            Arm("adaptive", "adaptive"), Arm("adaptive per class", "adaptive", per_class=True))


ARMS = study_arms()


@dataclass(frozen=True)
class StudyConfig:
    """The study's fixed settings. `controller` is chosen before the study (on validation sets of
    calibration seeds) and kept for every size; `interval` is the least number of optimizer steps
    between two controller updates (an update happens at the next epoch boundary)."""

    sizes: tuple[int, ...] = (10, 30, 100)
    seeds: tuple[int, ...] = tuple(range(10))
    val_per_class: int = 20
    steps: int = 1500
    batch_size: int = 32
    interval: int = 50
    clean_per_class: int = 20
    arms: tuple[Arm, ...] = ARMS
    controller: ControllerSettings = field(default_factory=lambda: STUDY_CONTROLLER)
    lr: float = 3e-3
    weight_decay: float = 5e-4
    width: int = 32
    depth: int = 3
    dropout: float = 0.3
    #: The strength of STUDY_SPEC that s = 1 sends: every arm's s (and each class's) goes out as
    #: top * s, which is STUDY_SPEC with its magnitudes scaled by `top` (each rule is linear in s).
    top: float = STUDY_TOP


@dataclass(frozen=True)
class StudySplit:
    val: np.ndarray
    test: np.ndarray
    train: dict[int, np.ndarray]  # images per class -> training ids


def study_split(labels: np.ndarray, sizes: Sequence[int], val_per_class: int, seed: int) -> StudySplit:
    """Per class: a random order from `seed`; the first `val_per_class` are validation, the next
    max(sizes) hold the nested training sets, the rest is the test set."""
    rng = np.random.default_rng(seed)
    largest = max(sizes)
    val: list[np.ndarray] = []
    test: list[np.ndarray] = []
    train: dict[int, list[np.ndarray]] = {n: [] for n in sizes}
    for c in range(NUM_CLASSES):
        ids = rng.permutation(np.flatnonzero(labels == c))
        if len(ids) < val_per_class + largest + 1:
            raise ValueError(f"class {c}: {len(ids)} images cannot hold {val_per_class} validation and "
                             f"{largest} training images and a test set")
        val.append(ids[:val_per_class])
        for n in sizes:
            train[n].append(ids[val_per_class:val_per_class + n])
        test.append(ids[val_per_class + largest:])
    return StudySplit(np.sort(np.concatenate(val)), np.sort(np.concatenate(test)),
                      {n: np.sort(np.concatenate(parts)) for n, parts in train.items()})


@dataclass(frozen=True)
class Digits:
    """The clean (un-augmented) digits as the server serves them, and a way to stream them."""

    images: torch.Tensor          # uint8 [N, 1, 32, 32]
    labels: torch.Tensor          # int64 [N]
    #: make_stream(train_ids, seed) -> an AugmentedStream of STUDY_SPEC over those ids
    make_stream: Callable[[np.ndarray, int], Any]

    def subset(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(ids, dtype=torch.long)
        return self.images[index], self.labels[index]


def _accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, list[float]]:
    """Overall and per-class accuracy in eval mode."""
    _loss, correct, count = class_sums(model, data, num_classes=NUM_CLASSES)
    return float(correct.sum() / count.sum()), (correct / count).tolist()


def run_arm(arm: Arm, size: int, seed: int, split: StudySplit, digits: Digits, config: StudyConfig) -> dict[str, Any]:
    """Train one arm for `config.steps` steps; its final test/val accuracy and strength trace."""
    train_ids = split.train[size]
    clean_train = digits.subset(train_ids[stratified_subset(digits.labels[train_ids].numpy(),
                                                            config.clean_per_class, seed)])
    val, test = digits.subset(split.val), digits.subset(split.test)
    controller = (StrengthController(replace(config.controller, per_class=arm.per_class), NUM_CLASSES)
                  if arm.kind == "adaptive" else None)
    stream = digits.make_stream(train_ids, seed)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks: the same in every arm of a seed
        model = RegularizedCNN(1, NUM_CLASSES, width=config.width, depth=config.depth, dropout=config.dropout,
                               mean=DIGITS_MEAN, std=DIGITS_STD, seed=seed)
        train_config = TrainConfig(lr=config.lr, weight_decay=config.weight_decay, progress=False)
        optimizer = make_optimizer(model, train_config)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
        step, epoch, last_update = 0, 0, 0
        strength = arm.value if arm.kind == "fixed" else 0.0  # a controller's comes from it, below
        trace: list[tuple[int, Any]] = []
        while step < config.steps:
            class_strength = controller.class_strength if controller else None
            if controller:
                strength = controller.global_strength
            trace.append((step, class_strength if class_strength is not None else strength))
            stream.set_epoch(epoch, strength=config.top * strength,
                             class_strength=class_strength and [config.top * c for c in class_strength])
            model.train()
            for images, labels, _ids in stream:
                loss = training_loss(model(images), labels, [], train_config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
                step += 1
                if step >= config.steps:
                    break
            epoch += 1
            if arm.kind == "ramp":
                strength = step / config.steps
            elif controller is not None and step - last_update >= config.interval and step < config.steps:
                controller.update(clean_gaps(model, [clean_train], [val], num_classes=NUM_CLASSES,
                                             gap=config.controller.gap), step)
                last_update = step
        test_acc, test_per_class = _accuracy(model, test)
        val_acc, _ = _accuracy(model, val)
        with torch.no_grad():
            model.eval()
            train_loss = float(F.cross_entropy(model(clean_train[0]), clean_train[1]))
    return {"arm": arm.name, "size": size, "seed": seed, "top": config.top, "steps": step, "epochs": epoch,
            "test_acc": test_acc, "test_worst_class": min(test_per_class), "test_per_class": test_per_class,
            "val_acc": val_acc, "clean_train_loss": train_loss, "trace": trace,
            "seconds": time.perf_counter() - started}


def _result_path(out: Path, size: int, seed: int, arm: Arm) -> Path:
    return out / "runs" / f"size{size}-seed{seed}-{arm.name.replace(' ', '_')}.json"


def run_study(out: Path, digits: Digits, config: StudyConfig, *, log: Callable[[str], None] = print) -> int:
    """Every (size, seed, arm) run not yet in `out`, seeds in order (so an early stop leaves whole
    seeds); returns how many ran now. ValueError, running nothing, when `out` holds runs made with
    other settings than `config` (only the seeds, sizes and arms may differ)."""
    settings = json.loads(json.dumps(_jsonable(config)))
    if (out / "config.json").exists():
        before = {**_ADDED_LATER, **json.loads((out / "config.json").read_text())}
        changed = [k for k in settings if k not in ("seeds", "sizes", "arms") and before.get(k) != settings[k]]
        if changed:  # its runs would be summarized with these
            raise ValueError(f"{out}: its runs were made with other settings ({', '.join(changed)}); "
                             "use another --out")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(settings, indent=2))
    ran = 0
    for seed in config.seeds:
        split = study_split(digits.labels.numpy(), config.sizes, config.val_per_class, seed)
        for size in config.sizes:
            for arm in config.arms:
                path = _result_path(out, size, seed, arm)
                if path.exists():
                    continue
                result = run_arm(arm, size, seed, split, digits, config)
                path.write_text(json.dumps(result))
                ran += 1
                log(f"seed {seed} size {size} {arm.name}: test {100 * result['test_acc']:.1f}% "
                    f"(worst class {100 * result['test_worst_class']:.1f}%), val {100 * result['val_acc']:.1f}%, "
                    f"{result['seconds']:.0f}s")
    return ran


def _jsonable(config: StudyConfig) -> dict[str, Any]:
    data = asdict(config)
    data["arms"] = [asdict(a) for a in config.arms]
    return data


# -- the report ---------------------------------------------------------------------------------------

def _load(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def _t95(n: int) -> float:
    """Two-sided 95% Student t quantile for n - 1 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else math.nan


def _best_on_validation(names: Sequence[str], by: dict[tuple[int, int, str], dict[str, Any]], size: int,
                        seed: int) -> str:
    return max(names, key=lambda name: float(by[(size, seed, name)]["val_acc"]))


def summarize(results: Sequence[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per size: each arm's mean test accuracy and worst-class accuracy over the complete seeds,
    the validation-selected fixed arm, the paired difference adaptive - selected with its 95%
    interval, and each arm's regret (best fixed arm's mean minus its own)."""
    names = [a.name for a in config.arms]
    fixed = [a.name for a in config.arms if a.kind == "fixed"]
    by = {(r["size"], r["seed"], r["arm"]): r for r in results}
    out: dict[str, Any] = {"sizes": {}, "complete_seeds": {}}
    for size in config.sizes:
        seeds = [s for s in config.seeds if all((size, s, n) in by for n in names)]
        out["complete_seeds"][size] = seeds
        if not seeds:
            continue
        rows: dict[str, dict[str, float]] = {}
        for name in names:
            acc = np.array([by[(size, s, name)]["test_acc"] for s in seeds])
            worst = np.array([by[(size, s, name)]["test_worst_class"] for s in seeds])
            rows[name] = {"test_acc": float(acc.mean()), "test_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                          "worst_class": float(worst.mean())}
        chosen: list[str] = []
        paired = {}
        if fixed:  # the fixed arms ran: the validation-selected one, regrets, paired differences
            chosen = [_best_on_validation(fixed, by, size, s) for s in seeds]
            selected = np.array([by[(size, s, n)]["test_acc"] for s, n in zip(seeds, chosen, strict=True)])
            rows["fixed, chosen on validation"] = {
                "test_acc": float(selected.mean()),
                "test_std": float(selected.std(ddof=1)) if len(selected) > 1 else 0.0,
                "worst_class": float(np.mean([by[(size, s, n)]["test_worst_class"]
                                              for s, n in zip(seeds, chosen, strict=True)]))}
            best_fixed = max(rows[n]["test_acc"] for n in fixed)
            for row in rows.values():
                row["regret"] = best_fixed - row["test_acc"]
            for name in ("adaptive", "adaptive per class"):
                if name in names:
                    diff = np.array([by[(size, s, name)]["test_acc"] for s in seeds]) - selected
                    half = _t95(len(diff)) * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
                    paired[name] = {"mean": float(diff.mean()), "low": float(diff.mean() - half),
                                    "high": float(diff.mean() + half),
                                    "sd": float(diff.std(ddof=1)) if len(diff) > 1 else math.nan}
        out["sizes"][size] = {"rows": rows, "paired": paired, "chosen": chosen}
    worst_regret = {}
    for name in [*names, "fixed, chosen on validation"]:
        regrets = [out["sizes"][z]["rows"][name]["regret"] for z in out["sizes"]
                   if "regret" in out["sizes"][z]["rows"].get(name, {})]
        if regrets:
            worst_regret[name] = max(regrets)
    out["worst_regret"] = worst_regret
    out["worst_regret_bootstrap"] = _bootstrap_worst_regret(by, config, names, fixed)
    out["ideal_controller"] = _ideal_controller(by, config, fixed, out)
    return out


def _bootstrap_worst_regret(by: dict[tuple[int, int, str], dict[str, Any]], config: StudyConfig,
                            names: Sequence[str], fixed: Sequence[str], resamples: int = 2000) -> dict[str, Any]:
    """How sure the worst-size regrets are: the seeds complete at every size resampled with
    replacement (the same draw for every arm and size: arms are paired by seed), each arm's
    worst-size regret recomputed per resample. Per arm: its 95% percentile interval and the share
    of resamples in which it is below every fixed arm's (for a fixed arm, every other one's)."""
    seeds = [s for s in config.seeds if all((z, s, n) in by for z in config.sizes for n in names)]
    if not fixed or len(seeds) < 2:
        return {"seeds": seeds, "arms": {}}
    acc = {n: np.array([[by[(z, s, n)]["test_acc"] for s in seeds] for z in config.sizes]) for n in names}
    acc["fixed, chosen on validation"] = np.array(
        [[by[(z, s, _best_on_validation(fixed, by, z, s))]["test_acc"] for s in seeds] for z in config.sizes])
    rng = np.random.default_rng(0)  # the same intervals every time the report is written
    draws = np.concatenate([np.arange(len(seeds))[None], rng.integers(0, len(seeds), (resamples, len(seeds)))])
    means = {n: a[:, draws].mean(axis=2) for n, a in acc.items()}  # [size, 1 + resamples]
    best = np.max([means[n] for n in fixed], axis=0)
    worst = {n: (best - m).max(axis=0) for n, m in means.items()}  # [1 + resamples]; [0]: all seeds
    arms = {}
    for name, w in worst.items():
        rivals = [worst[f] for f in fixed if f != name]
        below = np.all([w[1:] < r[1:] for r in rivals], axis=0) if rivals else np.ones(resamples, bool)
        arms[name] = {"regret": float(w[0]), "low": float(np.percentile(w[1:], 2.5)),
                      "high": float(np.percentile(w[1:], 97.5)), "below_every_fixed": float(below.mean())}
    return {"seeds": seeds, "resamples": resamples, "arms": arms}


#: The issue's first bar: at every size the paired interval (adaptive - fixed chosen on validation)
#: has its lower end above -0.5 points.
INTERVAL_BAR = -0.005


def _ideal_controller(by: dict[tuple[int, int, str], dict[str, Any]], config: StudyConfig,
                      fixed: Sequence[str], summary: dict[str, Any], trials: int = 4000) -> dict[str, Any]:
    """How often an ideal controller would pass each half of the bar, with this study's noise, in
    studies of n, 2n and 4n seeds (n: the fewest complete seeds of a size).

    Regret bar (worst-size regret below every fixed arm's): a "perfect" controller is, at every
    size, exactly as good in expectation as the best fixed arm there. Model, per size: a run's test
    accuracy = its arm's mean (this study's) + the seed's shift (shared by every arm, so it cancels
    in a regret) + the run's own noise, normal with the pooled residual deviation sigma of the
    fixed arms' seed x arm table (seed and arm effects removed). A simulated study draws each fixed
    arm's mean and the perfect controller's (expectation: the best fixed mean) with deviation
    sigma / sqrt(n) and scores the bar as the report does. Taking this study's means as the truth
    keeps their noise in the fixed curve, which makes it steeper than the truth and so, if
    anything, flatters the perfect controller.

    Interval bar (lower end of the paired 95% interval above INTERVAL_BAR at every size): a
    controller exactly as good in expectation as the fixed arm chosen on validation, its paired
    differences normal with mean 0 and this study's deviation of (adaptive - chosen) at that size."""
    seeds = summary["complete_seeds"]
    if len(fixed) < 2 or any(len(seeds.get(z, [])) < 2 for z in config.sizes):
        return {}
    means, sigma = {}, {}
    for z in config.sizes:
        table = np.array([[by[(z, s, f)]["test_acc"] for f in fixed] for s in seeds[z]])  # [seed, arm]
        resid = table - table.mean(axis=0) - table.mean(axis=1, keepdims=True) + table.mean()
        means[z] = table.mean(axis=0)
        sigma[z] = float(math.sqrt((resid ** 2).sum() / ((table.shape[0] - 1) * (table.shape[1] - 1))))
    paired_sd = {z: summary["sizes"][z]["paired"]["adaptive"]["sd"] for z in config.sizes
                 if "adaptive" in summary["sizes"][z]["paired"]}
    n = min(len(seeds[z]) for z in config.sizes)
    rng = np.random.default_rng(0)  # the same figures every time the report is written
    regret_bar, interval_bar = {}, {}
    for n_seeds in (n, 2 * n, 4 * n):
        worst_fixed = np.zeros((trials, len(fixed)))
        worst_perfect = np.full(trials, -np.inf)
        for z in config.sizes:
            draw = rng.normal(0.0, sigma[z] / math.sqrt(n_seeds), (trials, len(fixed) + 1))
            arms = means[z][None] + draw[:, :-1]
            perfect = means[z].max() + draw[:, -1]
            best = arms.max(axis=1)
            worst_fixed = np.maximum(worst_fixed, best[:, None] - arms)
            worst_perfect = np.maximum(worst_perfect, best - perfect)
        regret_bar[n_seeds] = float(np.mean(worst_perfect < worst_fixed.min(axis=1)))
        if len(paired_sd) == len(config.sizes):
            passes = np.ones(trials, bool)
            for sd in paired_sd.values():
                diff = rng.normal(0.0, sd, (trials, n_seeds))
                low = diff.mean(axis=1) - _t95(n_seeds) * diff.std(axis=1, ddof=1) / math.sqrt(n_seeds)
                passes &= low > INTERVAL_BAR
            interval_bar[n_seeds] = float(passes.mean())
    return {"sigma": sigma, "paired_sd": paired_sd, "trials": trials, "regret_bar": regret_bar,
            "interval_bar": interval_bar}


def report(out: Path, config: StudyConfig) -> dict[str, Any]:
    """Write study.md (tables), study.json (numbers) and study.png (fixed curve, s(t)); return the summary."""
    results = _load(out)
    summary = summarize(results, config)
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    tops = sorted({r.get("top", _ADDED_LATER["top"]) for r in results})
    lines = [f"# Adaptive augmentation study ({len(results)} runs)", "",
             f"Strength s = 1 sends {' / '.join(f'{t:g}' for t in tops)} x the study spec's magnitudes (--top).", ""]
    for size, data in summary["sizes"].items():
        seeds = summary["complete_seeds"][size]
        lines += [f"## {size} training images per class ({len(seeds)} seeds: {seeds})", "",
                  "| arm | test acc (%) | worst class (%) | regret (pts) |", "| --- | --- | --- | --- |"]
        for name, row in data["rows"].items():
            regret = f"{100 * row['regret']:+.2f}" if "regret" in row else "-"
            lines.append(f"| {name} | {100 * row['test_acc']:.2f} ± {100 * row['test_std']:.2f} | "
                         f"{100 * row['worst_class']:.1f} | {regret} |")
        for name, p in data["paired"].items():
            lines.append(f"\n{name} − fixed chosen on validation: {100 * p['mean']:+.2f} points "
                         f"(95% interval {100 * p['low']:+.2f} to {100 * p['high']:+.2f})")
        lines.append("")
    lines += ["## Worst-size regret (best fixed arm's test accuracy minus the arm's, worst over sizes)", "",
              "| arm | worst-size regret (pts) |", "| --- | --- |"]
    lines += [f"| {n} | {100 * r:+.2f} |" for n, r in summary["worst_regret"].items()]
    boot = summary["worst_regret_bootstrap"]
    if boot["arms"]:
        lines += ["", f"Bootstrap over the {len(boot['seeds'])} seeds complete at every size ({boot['resamples']} "
                  "resamples of seeds, paired across arms): each arm's worst-size regret with its 95% interval, "
                  "and the share of resamples in which it is below every fixed arm's (for a fixed arm: every "
                  "other one's).", "", "| arm | worst-size regret (pts) | 95% interval | below every fixed |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {100 * a['regret']:+.2f} | {100 * a['low']:+.2f} to {100 * a['high']:+.2f} | "
                  f"{100 * a['below_every_fixed']:.1f}% |" for n, a in boot["arms"].items()]
    ideal = summary["ideal_controller"]
    if ideal:
        lines += ["", "## How often would an ideal controller pass the bar?", "",
                  "Simulated studies with this study's noise: per-run deviation of the fixed arms (pooled residual "
                  "of the seed x arm table) " + ", ".join(f"{100 * v:.2f}" for v in ideal["sigma"].values())
                  + " pts and of the paired differences adaptive − chosen on validation "
                  + (", ".join(f"{100 * v:.2f}" for v in ideal["paired_sd"].values()) or "-")
                  + f" pts at {' / '.join(str(z) for z in ideal['sigma'])} per class; {ideal['trials']} "
                  "studies each. Regret bar: a controller exactly as good as the best fixed arm at every size "
                  "(taking these means as the truth). Interval bar: one exactly as good as the fixed arm chosen "
                  f"on validation (lower end above {100 * INTERVAL_BAR:+.1f} points at every size).", "",
                  "| seeds | regret bar passed | interval bar passed |", "| --- | --- | --- |"]
        lines += [f"| {n} | {100 * r:.0f}% | "
                  + (f"{100 * ideal['interval_bar'][n]:.0f}%" if n in ideal["interval_bar"] else "-") + " |"
                  for n, r in ideal["regret_bar"].items()]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    _plot(results, summary, config, out / "study.png")
    return summary


def _plot(results: Sequence[dict[str, Any]], summary: dict[str, Any], config: StudyConfig, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), layout="constrained")
    curve, trace = fig.subplots(1, 2)
    fixed = [a for a in config.arms if a.kind == "fixed"]
    for size, data in summary["sizes"].items():
        xs = [a.value for a in fixed]
        curve.plot(xs, [100 * data["rows"][a.name]["test_acc"] for a in fixed], marker="o", label=f"{size}/class")
        adaptive = data["rows"].get("adaptive")
        if adaptive:
            curve.axhline(100 * adaptive["test_acc"], linestyle=":", linewidth=1, color=curve.lines[-1].get_color())
    curve.set(title="test accuracy vs fixed strength (dotted: adaptive)", xlabel="strength s", ylabel="test acc (%)")
    curve.grid(alpha=0.3)
    curve.legend()
    for size in config.sizes:
        runs = [r for r in results if r["size"] == size and r["arm"] == "adaptive"]
        if not runs:
            continue
        grid = np.linspace(0, config.steps, 61)
        values = [np.interp(grid, [t[0] for t in r["trace"]], [t[1] for t in r["trace"]]) for r in runs]
        trace.plot(grid, np.mean(values, axis=0), label=f"{size}/class (mean of {len(runs)} seeds)")
    trace.set(title="adaptive strength s(t)", xlabel="optimizer step", ylabel="s", ylim=(-0.02, 1.02))
    trace.grid(alpha=0.3)
    trace.legend()
    fig.savefig(path, dpi=100)


def connect_digits(client: Any, batch_size: int) -> Digits:
    """The clean digits from a server's `digits` dataset, and streams of STUDY_SPEC over them."""
    from .stream import AugmentedStream

    whole = AugmentedStream(client, "digits", {"transforms": []}, batch_size=512, seed=0, shuffle=False)
    images, labels = zip(*[(x.contiguous(), y) for x, y, _ in whole], strict=True)

    def make_stream(ids: np.ndarray, seed: int) -> AugmentedStream:
        return AugmentedStream(client, "digits", STUDY_SPEC, batch_size=batch_size, seed=seed, sample_ids=ids)

    return Digits(torch.cat(images), torch.cat(labels), make_stream)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer_client.study` (what `augsvc-train --experiment adaptive` runs)."""
    import argparse

    from .client import AugmentClient
    from .embedded import EmbeddedServer

    p = argparse.ArgumentParser(prog="augsvc-train --experiment adaptive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/adaptive")
    p.add_argument("--server", help="augsvc target serving builtin:digits as 'digits' (default: embedded)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 100], help="training images per class")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per run (every arm, every size)")
    p.add_argument("--arms", nargs="+", help="run only these arms (names as in the report)")
    p.add_argument("--fixed", type=float, nargs="+", default=list(FIXED), help="the fixed arms' strengths")
    p.add_argument("--top", type=float, default=STUDY_TOP,
                   help="the strength of the study's spec that s=1 sends (each arm sends top * s)")
    p.add_argument("--target", type=float, default=STUDY_CONTROLLER.target, help="controller: the clean gap to keep")
    p.add_argument("--step", type=float, default=STUDY_CONTROLLER.step, help="controller: strength change per update")
    p.add_argument("--start", type=float, default=STUDY_CONTROLLER.start,
                   help="controller: strength before the first update")
    p.add_argument("--gap", choices=GAP_METRICS, default=STUDY_CONTROLLER.gap,
                   help="controller: which clean gap")
    p.add_argument("--interval", type=int, default=50, help="controller: least steps between updates")
    p.add_argument("--quick", action="store_true", help="a tiny version (one seed, one size, 16 steps)")
    p.add_argument("--report-only", action="store_true", help="summarize what has finished, run nothing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a small CNN's steps gain nothing from more, and runs can go side by side)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not all(0.0 <= v <= 1.0 for v in [*args.fixed, args.top]):
        p.error("--fixed and --top: strengths are in [0, 1]")
    if len({f"{v:.3f}" for v in args.fixed}) != len(args.fixed):
        p.error(f"--fixed: {args.fixed} names a strength twice")
    arms = tuple(a for a in study_arms(args.fixed) if not args.arms or a.name in args.arms)
    config = StudyConfig(sizes=tuple(args.sizes), seeds=tuple(args.seeds), steps=args.steps, arms=arms,
                         interval=args.interval, top=args.top,
                         controller=ControllerSettings(target=args.target, step=args.step, start=args.start,
                                                       gap=args.gap))
    if args.quick:
        config = replace(config, sizes=(10,), seeds=(0,), steps=16, interval=4)
    out = Path(args.out)
    if not args.report_only:
        if args.server:
            with AugmentClient(args.server) as client:
                run_study(out, connect_digits(client, config.batch_size), config)
        else:
            with EmbeddedServer(workers=1) as server, AugmentClient(server.target) as client:
                run_study(out, connect_digits(client, config.batch_size), config)
    summary = report(out, config)
    for name, regret in summary["worst_regret"].items():
        print(f"worst-size regret {name}: {100 * regret:+.2f} points")
    ideal = summary["ideal_controller"]
    for n_seeds, rate in ideal.get("regret_bar", {}).items():
        interval = ideal["interval_bar"].get(n_seeds)
        print(f"{n_seeds}-seed studies: a perfect controller passes the regret bar in {100 * rate:.0f}%"
              + (f"; one as good as the validation-chosen arm passes the interval bar in {100 * interval:.0f}%"
                 if interval is not None else ""))
    print(f"wrote {out}/study.md, {out}/study.json, {out}/study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
