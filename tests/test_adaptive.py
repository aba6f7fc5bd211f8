"""The strength controller (ADA's sign rule on the clean gap) with scripted gaps, its checkpoint,
the --augment-strength schedules, the clean-gap measurement, and the study's --quick run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from trainer_client.adaptive import (
    ClassGaps,
    ControllerSettings,
    StrengthController,
    clean_gaps,
    parse_strength,
    stratified_subset,
)
from trainer_client.study import study_split


def gaps(overall: float, per_class: list[float] | None = None) -> ClassGaps:
    return ClassGaps(overall, np.asarray(per_class if per_class is not None else [overall]))


def test_moves_up_on_a_widening_gap_and_down_on_a_negative_one() -> None:
    c = StrengthController(ControllerSettings(target=0.1, step=0.05, start=0.3))
    seen = [float(c.update(gaps(g), step)[0]) for step, g in enumerate([0.2, 0.4, 0.8, -0.1, -0.3, 0.1])]
    # above the target: up a step each time; below: down; exactly at it: stays
    assert seen == pytest.approx([0.35, 0.40, 0.45, 0.40, 0.35, 0.35])
    assert [h[0] for h in c.history] == [0, 1, 2, 3, 4, 5] and c.global_strength == pytest.approx(0.35)


def test_clamps_to_zero_and_one() -> None:
    c = StrengthController(ControllerSettings(target=0.0, step=0.4, start=0.9))
    assert float(c.update(gaps(1.0))[0]) == 1.0 and float(c.update(gaps(1.0))[0]) == 1.0
    for _ in range(5):
        c.update(gaps(-1.0))
    assert float(c.strength[0]) == 0.0


def test_per_class_mode_moves_each_class_by_its_own_gap() -> None:
    c = StrengthController(ControllerSettings(target=0.1, step=0.1, start=0.5, per_class=True), num_classes=3)
    c.update(gaps(0.2, [0.5, 0.0, float("nan")]))
    assert c.class_strength == pytest.approx([0.6, 0.4, 0.5])  # a class without images holds
    assert c.global_strength == 1.0  # the classes carry the strength
    with pytest.raises(ValueError, match="gaps"):
        c.update(gaps(0.2, [0.5, 0.0]))


def test_resumes_exactly_from_its_checkpoint() -> None:
    settings = ControllerSettings(target=0.1, step=0.07, start=0.2, per_class=True)
    script = [list(np.random.default_rng(k).normal(0.1, 0.3, 4)) for k in range(12)]
    whole = StrengthController(settings, 4)
    for k, g in enumerate(script):
        whole.update(gaps(float(np.mean(g)), g), k)
    first = StrengthController(settings, 4)
    for k, g in enumerate(script[:5]):
        first.update(gaps(float(np.mean(g)), g), k)
    state = json.loads(json.dumps(first.state_dict()))  # through a checkpoint file's round trip
    resumed = StrengthController(settings, 4)
    resumed.load_state_dict(state)
    for k, g in enumerate(script[5:], start=5):
        resumed.update(gaps(float(np.mean(g)), g), k)
    np.testing.assert_array_equal(resumed.strength, whole.strength)
    assert resumed.history == whole.history
    with pytest.raises(ValueError, match="settings"):
        StrengthController(ControllerSettings(target=0.2), 4).load_state_dict(state)


@pytest.mark.parametrize(("kw", "field"), [({"step": 0.0}, "step"), ({"start": 1.5}, "start"),
                                           ({"gap": "f1"}, "gap"), ({"target": float("nan")}, "target")])
def test_settings_are_validated(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ControllerSettings(**kw)  # type: ignore[arg-type]


def test_augment_strength_schedules() -> None:
    assert parse_strength("adaptive").kind == "adaptive"
    ramp = parse_strength("ramp")
    assert [ramp.at(p) for p in (0.0, 0.25, 1.0, 2.0)] == [0.0, 0.25, 1.0, 1.0]
    fixed = parse_strength("0.4")
    assert fixed.kind == "fixed" and fixed.at(0.0) == fixed.at(1.0) == 0.4
    for bad in ("1.5", "strong"):
        with pytest.raises(ValueError, match="--augment-strength"):
            parse_strength(bad)


class _Memorizer(nn.Module):
    """Right on images whose first pixel is even, wrong on the others: a known gap."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = images[:, 0, 0, 1].long()
        logits = torch.full((len(images), 2), -4.0)
        right = images[:, 0, 0, 0] % 2 == 0
        logits[torch.arange(len(images)), torch.where(right, labels, 1 - labels)] = 4.0
        return logits


def test_clean_gaps_measure_train_against_validation() -> None:
    def data(labels: list[int], even: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros((len(labels), 1, 1, 2), dtype=torch.uint8)
        x[:, 0, 0, 0] = torch.tensor([0 if e else 1 for e in even], dtype=torch.uint8)
        x[:, 0, 0, 1] = torch.tensor(labels, dtype=torch.uint8)
        return x, torch.tensor(labels)

    model = _Memorizer()
    model.register_parameter("p", nn.Parameter(torch.zeros(1)))
    train = data([0, 0, 1, 1], [True, True, True, True])
    val = data([0, 0, 1, 1], [True, False, False, False])  # class 0: 1 of 2 right, class 1: none
    acc = clean_gaps(model, [train], [val], num_classes=2, gap="acc")
    assert acc.overall == pytest.approx(1.0 - 0.25) and list(acc.per_class) == pytest.approx([0.5, 1.0])
    loss = clean_gaps(model, [train], [val], num_classes=2, gap="loss")
    assert loss.overall > 0 and loss.per_class[1] > loss.per_class[0] > 0
    seen: list[tuple[int, ...]] = []

    def twice(sums: np.ndarray) -> np.ndarray:  # reduce=: as if a second rank had the same shards
        seen.append(sums.shape)
        return 2 * sums

    doubled = clean_gaps(model, [train], [val], num_classes=2, gap="acc", reduce=twice)
    assert seen == [(6, 2)] and doubled.overall == pytest.approx(acc.overall)


def test_study_split_is_nested_and_disjoint() -> None:
    labels = np.repeat(np.arange(10), 150)
    split = study_split(labels, (10, 30, 100), 20, seed=3)
    assert set(split.train[10]) < set(split.train[30]) < set(split.train[100])
    assert not set(split.val) & set(split.test) and not set(split.train[100]) & (set(split.val) | set(split.test))
    assert len(split.val) == 200 and len(split.test) == 10 * (150 - 120)
    for n, ids in split.train.items():
        assert np.bincount(labels[ids]).tolist() == [n] * 10
    assert np.array_equal(study_split(labels, (10, 30, 100), 20, seed=3).test, split.test)
    picked = stratified_subset(labels[split.train[100]], 20, seed=0)
    assert np.bincount(labels[split.train[100]][picked]).tolist() == [20] * 10


@pytest.mark.timeout(900)
def test_quick_study_runs_every_arm_through_a_served_dataset(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "trainer_client.study", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted(r["arm"] for r in runs) == sorted(["fixed 0.00", "fixed 0.25", "fixed 0.50", "fixed 0.75",
                                                     "fixed 1.00", "ramp", "adaptive", "adaptive per class"])
    assert all(r["steps"] == 16 for r in runs)
    ramp = next(r for r in runs if r["arm"] == "ramp")
    assert ramp["trace"][0][1] == 0.0 and ramp["trace"][-1][1] > 0.5  # the ramp rose
    adaptive = next(r for r in runs if r["arm"] == "adaptive")
    assert len(adaptive["trace"]) > 2  # the controller updated within the run
    summary = json.loads((out / "study.json").read_text())
    assert "adaptive" in summary["sizes"]["10"]["paired"] and (out / "study.png").stat().st_size > 0
    # a second invocation resumes: nothing left to run
    again = subprocess.run([sys.executable, "-m", "trainer_client.study", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=840)
    assert again.returncode == 0 and "seed 0 size 10" not in again.stdout


def test_strength_callback_schedules_and_checkpoint() -> None:
    from trainer_client.adaptive import StrengthCallback

    ramp = StrengthCallback(parse_strength("ramp"), epochs=5)
    seen = []
    for epoch in range(1, 6):
        seen.append(ramp.strength)
        row: dict[str, float] = {"epoch": epoch}
        ramp.on_epoch_end(row)
        assert row["strength"] == seen[-1]
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])

    script = iter([0.95, 0.95, 0.5, 0.5, 0.5])  # the clean gap after each epoch

    def make() -> StrengthCallback:
        controller = StrengthController(ControllerSettings(gap="ratio", target=0.9, step=0.1, start=0.3))
        return StrengthCallback(parse_strength("adaptive"), epochs=5, controller=controller,
                                measure=lambda: gaps(next(script)))  # the older form: no validation sums

    whole, used = make(), []
    for epoch in range(1, 6):
        used.append(whole.strength)
        row = {"epoch": float(epoch)}
        whole.on_epoch_end(row)
        assert row["clean_gap"] in (0.95, 0.5)
    assert used == pytest.approx([0.3, 0.4, 0.5, 0.4, 0.3])  # up on a wide gap, down on a narrow one
    script = iter([0.95, 0.95, 0.5, 0.5, 0.5])
    first = make()
    for epoch in (1, 2):
        first.on_epoch_end({"epoch": float(epoch)})
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.epoch == 2 and resumed.strength == pytest.approx(0.5)
    # another schedule refuses the state (before, a fixed 0.9 took it and reported 0.9 while the
    # stream went on at the checkpoint's strength)
    for other in ("0.9", "ramp"):
        with pytest.raises(ValueError, match=f"the strength schedule is {other}; the checkpoint's run used adaptive"):
            StrengthCallback(parse_strength(other), epochs=5).load_state_dict(first.state_dict())
    older = {k: v for k, v in first.state_dict().items() if k != "schedule"}  # saved before schedules were
    StrengthCallback(parse_strength("0.9"), epochs=5).load_state_dict(older)
    with pytest.raises(ValueError, match="adaptive"):
        StrengthCallback(parse_strength("adaptive"), epochs=3)


@pytest.mark.timeout(900)
def test_augsvc_train_with_an_adaptive_strength(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer_client.cli", "--out", str(out), "--epochs", "3",
                           "--train-size", "200", "--augment-strength", "adaptive", "--strength-start", "0.5",
                           "--strength-step", "0.05", "--no-progress"], capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["strength"] for r in rows][0] == 0.5 and all("clean_gap" in r for r in rows)
    steps = {round(abs(b["strength"] - a["strength"]), 6) for a, b in zip(rows, rows[1:], strict=False)}
    assert steps <= {0.05, 0.0}  # the controller moves by its step (or holds at a clamp)
    assert "strength 0.50" in proc.stdout


@pytest.mark.parametrize("form", [["--experiment", "adaptive"], ["--experiment=adaptive"]])
def test_experiment_adaptive_runs_the_study_with_its_own_options(form: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer_client.study
    from trainer_client.cli import main

    seen: list[list[str]] = []
    monkeypatch.setattr(trainer_client.study, "main", lambda argv: seen.append(list(argv)) or 7)
    assert main(["--out", "x", *form, "--quick"]) == 7
    assert seen == [["--out", "x", "--quick"]]


class _RecordingStream:
    """Stands in for an AugmentedStream: records what each epoch was asked to send, yields clean batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels, self.sent = images, labels, []

    def set_epoch(self, epoch: int, *, strength: float, class_strength: list[float] | None) -> None:
        self.sent.append((epoch, strength, class_strength))

    def __iter__(self):  # type: ignore[no-untyped-def]
        for start in range(0, len(self.images), 32):
            yield self.images[start:start + 32], self.labels[start:start + 32], None


@pytest.mark.parametrize("arm_name", ["fixed 0.50", "fixed 0.125", "adaptive per class"])
def test_study_top_scales_what_each_arm_sends(arm_name: str) -> None:
    """--top t sends t * s: the study's spec with every magnitude scaled by t (the arm's own s, in the
    trace and the controller, stays in [0, 1])."""
    from dataclasses import replace

    from trainer_client.study import Digits, StudyConfig, run_arm, study_arms

    labels = torch.arange(10).repeat(60)
    images = torch.randint(0, 256, (600, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    streams: list[_RecordingStream] = []

    def make_stream(ids: np.ndarray, seed: int) -> _RecordingStream:
        streams.append(_RecordingStream(images[torch.as_tensor(ids)], labels[torch.as_tensor(ids)]))
        return streams[-1]

    digits = Digits(images, labels, make_stream)
    arm = next(a for a in study_arms((0.0, 0.125, 0.5)) if a.name == arm_name)
    split = study_split(labels.numpy(), (10,), 20, seed=0)
    config = replace(StudyConfig(sizes=(10,), seeds=(0,), steps=12, interval=1, width=8, depth=1), top=0.4,
                     controller=ControllerSettings(gap="loss", target=-10.0, step=0.25, start=0.25))  # always up
    result = run_arm(arm, 10, 0, split, digits, config)
    sent = streams[0].sent
    assert result["steps"] == 12 and len(sent) == 3  # 100 images: 4 batches an epoch
    for (epoch, strength, classes), (_step, s) in zip(sent, result["trace"], strict=True):
        if arm.per_class:
            assert strength == pytest.approx(0.4) and classes == pytest.approx([0.4 * v for v in s])
            assert s == [0.25 * (1 + epoch)] * 10  # 0.25, 0.5, 0.75: the controller moved every class
        else:
            assert strength == pytest.approx(0.4 * arm.value) and classes is None and s == arm.value


def test_a_study_folder_refuses_runs_with_other_settings(tmp_path: Path) -> None:
    """Resuming may add seeds, sizes or arms; another --top (or steps, controller, ...) would mix
    runs of two studies in one summary, so the folder refuses before running anything."""
    from dataclasses import replace

    from trainer_client.study import Digits, StudyConfig, run_study

    def no_stream(ids: np.ndarray, seed: int) -> None:
        raise AssertionError("nothing may run")

    digits = Digits(torch.zeros((0, 1, 32, 32), dtype=torch.uint8), torch.zeros(0, dtype=torch.long), no_stream)
    config = StudyConfig(sizes=(), seeds=())
    assert run_study(tmp_path, digits, config) == 0  # writes config.json
    assert run_study(tmp_path, digits, replace(config, seeds=(), sizes=(), arms=())) == 0
    for changed in (replace(config, top=1.0), replace(config, steps=10)):
        with pytest.raises(ValueError, match="other settings"):
            run_study(tmp_path, digits, changed)
    # a folder from before --top existed holds runs made at top 1
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["top"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert run_study(tmp_path, digits, replace(config, top=1.0)) == 0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"other settings \(top\)"):
        run_study(tmp_path, digits, replace(config, top=0.5))


def test_study_summary_regrets_selection_and_bootstrap() -> None:
    """Scripted results: the regrets, the validation-selected arm, the paired interval, and the
    bootstrap of worst-size regrets (arms paired by seed: a seed's shift moves every arm alike)."""
    from trainer_client.study import StudyConfig, study_arms, summarize

    config = StudyConfig(sizes=(10, 30), seeds=(0, 1, 2, 3), arms=study_arms((0.0, 0.5)))
    test = {10: {"fixed 0.00": 0.90, "fixed 0.50": 0.95, "ramp": 0.92, "adaptive": 0.95, "adaptive per class": 0.80},
            30: {"fixed 0.00": 0.98, "fixed 0.50": 0.96, "ramp": 0.975, "adaptive": 0.98, "adaptive per class": 0.90}}
    jitter = [0.004, -0.004, 0.004, -0.004]  # the adaptive arm's own, seed by seed, at 30 / class
    results = [{"size": z, "seed": s, "arm": arm, "test_worst_class": acc - 0.1,
                "test_acc": acc + 0.01 * s + (jitter[s] if (z, arm) == (30, "adaptive") else 0.0),
                "val_acc": acc}  # validation ranks the fixed arms as the test does
               for z, arms in test.items() for arm, acc in arms.items() for s in config.seeds]
    summary = summarize(results, config)
    assert summary["sizes"][10]["chosen"] == ["fixed 0.50"] * 4 and summary["sizes"][30]["chosen"] == ["fixed 0.00"] * 4
    regret = summary["worst_regret"]
    assert regret["fixed 0.00"] == pytest.approx(0.05) and regret["fixed 0.50"] == pytest.approx(0.02)
    assert regret["ramp"] == pytest.approx(0.03) and regret["fixed, chosen on validation"] == pytest.approx(0.0)
    paired = summary["sizes"][30]["paired"]["adaptive"]
    assert paired["mean"] == pytest.approx(0.0) and paired["low"] < 0 < paired["high"]
    boot = summary["worst_regret_bootstrap"]
    assert boot["seeds"] == [0, 1, 2, 3] and set(boot["arms"]) == {*regret}
    for name, arm in boot["arms"].items():
        assert arm["regret"] == pytest.approx(regret[name]) and arm["low"] <= arm["high"]
    # shifts shared by every arm cancel: the same regrets in every resample
    assert boot["arms"]["ramp"]["low"] == pytest.approx(0.03) == boot["arms"]["ramp"]["high"]
    assert boot["arms"]["ramp"]["below_every_fixed"] == 0.0  # 0.03 > fixed 0.5's 0.02, always
    assert boot["arms"]["fixed 0.50"]["below_every_fixed"] == 1.0  # below fixed 0's 0.05, always
    # adaptive's own jitter at 30 / class: its regret there is 0 or above, never below, and varies
    adaptive = boot["arms"]["adaptive"]
    assert adaptive["low"] == pytest.approx(0.0) and adaptive["high"] > 0.002
    assert adaptive["below_every_fixed"] == 1.0  # never as high as fixed 0.5's 0.02


def test_study_ideal_controller_pass_rates() -> None:
    """How often an ideal controller would pass each half of the bar. Regret bar: certain where the
    best fixed strength moves with the size and nothing is noisy; 1 in (k + 1) on a flat curve at
    one size (the perfect controller passes there only by beating all k fixed arms, exchangeable
    with it); the pooled residual deviation is the two-way table's. Interval bar: the t interval's
    chance, from the noncentral t distribution of a paired study with that deviation."""
    from scipy import stats

    from trainer_client.study import INTERVAL_BAR, StudyConfig, _t95, study_arms, summarize

    fixed = (0.0, 0.5, 1.0)

    def results(config: StudyConfig, acc: Callable[[int, int, str], float]) -> list[dict[str, Any]]:
        return [{"size": z, "seed": s, "arm": arm.name, "test_acc": acc(z, s, arm.name), "test_worst_class": 0.5,
                 "val_acc": 0.5} for z in config.sizes for s in config.seeds for arm in config.arms]

    # the best strength moves with the size (s = 0.5 is 0.005 short of it at both), seeds shift every
    # arm alike: no noise, so a perfect controller always passes
    moving = StudyConfig(sizes=(10, 30), seeds=(0, 1, 2), arms=study_arms(fixed))
    gain = {10: {"fixed 1.00": 0.02, "fixed 0.50": 0.015}, 30: {"fixed 0.00": 0.02, "fixed 0.50": 0.015}}
    summary = summarize(results(moving, lambda z, s, a: 0.9 + 0.01 * s + gain[z].get(a, 0.0)), moving)
    assert summary["worst_regret"]["fixed 0.50"] == pytest.approx(0.005)
    ideal = summary["ideal_controller"]
    assert ideal["sigma"] == {10: pytest.approx(0.0, abs=1e-12), 30: pytest.approx(0.0, abs=1e-12)}
    assert ideal["regret_bar"] == {3: 1.0, 6: 1.0, 12: 1.0}
    # a flat curve at one size with a +-d checkerboard of per-run noise; the adaptive arm 0.01 up
    # on odd seeds against the arm chosen on validation (every seed: the first fixed arm)
    flat = StudyConfig(sizes=(10,), seeds=(0, 1, 2, 3), arms=study_arms(fixed))
    d = 0.004
    index = {arm.name: i for i, arm in enumerate(flat.arms)}

    def flat_acc(z: int, s: int, a: str) -> float:
        return 0.9 + (d if (s + index[a]) % 2 else -d) + (0.01 if a == "adaptive" and s % 2 else 0.0)

    summary = summarize(results(flat, flat_acc), flat)
    assert summary["sizes"][10]["chosen"] == ["fixed 0.00"] * 4
    ideal = summary["ideal_controller"]
    resid = np.array([[d if (s + i) % 2 else -d for i in range(len(fixed))] for s in flat.seeds])
    resid = resid - resid.mean(0) - resid.mean(1, keepdims=True) + resid.mean()
    assert ideal["sigma"][10] == pytest.approx(math.sqrt((resid ** 2).sum() / (3 * 2)))
    for rate in ideal["regret_bar"].values():
        assert rate == pytest.approx(1 / (len(fixed) + 1), abs=0.03)
    diff = np.array([flat_acc(10, s, "adaptive") - flat_acc(10, s, "fixed 0.00") for s in flat.seeds])
    sd = ideal["paired_sd"][10]
    assert sd == pytest.approx(diff.std(ddof=1))
    assert set(ideal["interval_bar"]) == {4, 8, 16}
    for n, rate in ideal["interval_bar"].items():
        # low > bar  <=>  (mean - bar) / (sd_hat / sqrt(n)) > t95: a noncentral t with df n - 1
        expected = stats.nct.sf(_t95(n), n - 1, -INTERVAL_BAR * math.sqrt(n) / sd)
        assert rate == pytest.approx(expected, abs=0.03)
    assert 0.05 < ideal["interval_bar"][4] < ideal["interval_bar"][16] < 0.95
