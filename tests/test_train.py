"""Model, training loop, overfitting monitor and regularization experiment, on tiny synthetic data."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trainer_client.experiment import (  # noqa: E402
    REGULARIZATION_CONFIGS,
    digits_split,
    load_digits_images,
    make_local_train_epoch,
    run_regularization_experiment,
)
from trainer_client.model import RegularizedCNN  # noqa: E402
from trainer_client.train import (  # noqa: E402
    History,
    OverfitMonitor,
    TrainConfig,
    evaluate,
    fit,
    penalized_weights,
    training_loss,
    weight_stats,
)

Batches = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The models here are tiny: more threads only add sync cost, and on a busy shared machine
    # spinning OpenMP threads made these tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def halves_data(n: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright left half; class 1: bright right half; plus noise. Easy to learn."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    images = torch.randint(0, 60, (n, 1, size, size), generator=gen)
    half = size // 2
    images[labels == 0, :, :, :half] += 150
    images[labels == 1, :, :, half:] += 150
    return images.to(torch.uint8), labels


def as_epochs(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16,
              calls: list[int] | None = None) -> Callable[[int], Batches]:
    """A train_epoch callable yielding (images, labels, sample_ids), like the data stream."""
    def train_epoch(epoch: int) -> Batches:
        if calls is not None:
            calls.append(epoch)
        ids = torch.arange(len(labels))
        return [(images[i:i + batch_size], labels[i:i + batch_size], ids[i:i + batch_size])
                for i in range(0, len(labels), batch_size)]
    return train_epoch


def quiet(**overrides: object) -> TrainConfig:
    base: dict[str, object] = {"epochs": 3, "progress": False, "device": "cpu", "seed": 0}
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


def tiny_model(**overrides: object) -> RegularizedCNN:
    kwargs: dict[str, object] = {"width": 4, "depth": 2, "seed": 0}
    kwargs.update(overrides)
    return RegularizedCNN(1, 2, **kwargs)  # type: ignore[arg-type]


# ---- model ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("channels", "height", "width"), [(1, 32, 32), (3, 32, 32), (1, 17, 23), (3, 9, 5),
                                                            (3, 1, 1)])
def test_model_output_shape(channels: int, height: int, width: int) -> None:
    model = RegularizedCNN(channels, 7, width=4, depth=3, seed=0).eval()
    x = torch.randint(0, 256, (2, channels, height, width), dtype=torch.uint8)
    assert model(x).shape == (2, 7)


def test_model_normalizes_uint8_input() -> None:
    model = RegularizedCNN(3, 2, width=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1).contiguous()
    out = model.normalize(x)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    torch.testing.assert_close(out[0:1], (0 - mean) / std)
    torch.testing.assert_close(out[1:2], (1 - mean) / std)
    assert {"mean", "std"} <= set(model.state_dict())  # buffers travel with checkpoints
    with pytest.raises(ValueError, match="images"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mean"):
        RegularizedCNN(3, 2, mean=(0.1, 0.2))


def test_nothing_model_has_no_regularizers() -> None:
    plain = RegularizedCNN(1, 10, dropout=0.0, batch_norm=False)
    kinds = {type(m) for m in plain.modules()}
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.Dropout not in kinds
    regular = RegularizedCNN(1, 10, dropout=0.3, batch_norm=True)
    kinds = {type(m) for m in regular.modules()}
    assert torch.nn.BatchNorm2d in kinds and torch.nn.Dropout in kinds


def test_model_seed_is_reproducible_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = (RegularizedCNN(1, 10, width=4, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.head[-1].weight, c.head[-1].weight)


# ---- loss and regularizers --------------------------------------------------------------------

def test_training_loss_adds_l1_and_label_smoothing() -> None:
    model = tiny_model()
    images, labels = halves_data(8, seed=0)
    logits = model(images)
    weights = penalized_weights(model)
    plain = training_loss(logits, labels, weights, quiet())
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits, labels))
    l1 = training_loss(logits, labels, weights, quiet(l1=1e-3))
    expected = plain + 1e-3 * sum(w.abs().sum() for w in weights)
    torch.testing.assert_close(l1, expected)
    assert l1 > plain
    smoothed = training_loss(logits, labels, weights, quiet(label_smoothing=0.2))
    assert not torch.isclose(smoothed, plain)


def test_l1_drives_weights_toward_zero() -> None:
    images, labels = halves_data(64, seed=0)
    val = halves_data(32, seed=1)
    stats = {}
    for l1 in (0.0, 1e-2):
        model = tiny_model()
        config = quiet(epochs=8, l1=l1, lr=1e-2, weight_decay=0.0, patience=10)
        history = fit(model, as_epochs(images, labels, batch_size=8), val, config, log=lambda _: None)
        stats[l1] = history.rows[-1]
        assert weight_stats(model)["l1_norm"] == pytest.approx(history.best["l1_norm"])
    assert stats[1e-2]["near_zero_frac"] > stats[0.0]["near_zero_frac"] + 0.05
    assert stats[1e-2]["l1_norm"] < 0.7 * stats[0.0]["l1_norm"]


def test_weight_decay_shrinks_l2_norm() -> None:
    images, labels = halves_data(64, seed=0)
    val = halves_data(32, seed=1)
    norms = {}
    for wd in (0.0, 5.0):
        history = fit(tiny_model(), as_epochs(images, labels), val, quiet(epochs=3, weight_decay=wd),
                      log=lambda _: None)
        norms[wd] = history.rows[-1]["l2_norm"]
    assert norms[5.0] < 0.9 * norms[0.0]


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam2")
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)


# ---- fit ----------------------------------------------------------------------------------------

def test_fit_learns_and_logs_every_epoch(tmp_path: Path) -> None:
    images, labels = halves_data(128, seed=0)
    val_images, val_labels = halves_data(64, seed=1)
    calls: list[int] = []
    lines: list[str] = []
    rng_state = torch.get_rng_state()
    history = fit(tiny_model(), as_epochs(images, labels, calls=calls), (val_images, val_labels),
                  quiet(epochs=4, label_smoothing=0.1, patience=10), log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng_state)  # fit seeds a forked RNG, not the caller's
    assert calls == [0, 1, 2, 3]  # train_epoch gets 0-based epochs, as the data stream counts
    assert [r["epoch"] for r in history.rows] == [1, 2, 3, 4]
    assert history.best["val_acc"] > 0.9
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 4
    for part in ("train loss", "val loss", "gap", "L1", "L2", "near-zero", "img/s", "lr"):
        assert part in epoch_lines[0]


def test_fit_is_deterministic_for_a_seed() -> None:
    images, labels = halves_data(64, seed=0)
    val = halves_data(32, seed=1)
    runs = [fit(tiny_model(dropout=0.5), as_epochs(images, labels), val, quiet(epochs=2), log=lambda _: None)
            for _ in range(2)]
    keys = ("train_loss", "val_loss", "l1_norm")
    assert [[r[k] for k in keys] for r in runs[0].rows] == [[r[k] for k in keys] for r in runs[1].rows]


def test_fit_accepts_callable_val_data() -> None:
    images, labels = halves_data(64, seed=0)
    val_images, val_labels = halves_data(32, seed=1)
    as_pair = fit(tiny_model(), as_epochs(images, labels), (val_images, val_labels), quiet(epochs=1),
                  log=lambda _: None)
    as_batches = fit(tiny_model(), as_epochs(images, labels), lambda: as_epochs(val_images, val_labels, 5)(0),
                     quiet(epochs=1), log=lambda _: None)
    assert as_batches.rows[0]["val_loss"] == pytest.approx(as_pair.rows[0]["val_loss"], rel=1e-5)
    assert as_batches.rows[0]["val_acc"] == as_pair.rows[0]["val_acc"]


def test_fit_hands_each_validation_pass_per_class_to_callbacks() -> None:
    """fit(num_classes=K): callbacks get the epoch's validation sums per class (on_validation, once,
    before on_epoch_end), the very pass the row's val_loss/val_acc come from (one pass, not two)."""
    from trainer_client.train import Callback, class_sums, loss_and_accuracy

    images, labels = halves_data(64, seed=0)
    val_images, val_labels = halves_data(40, seed=1)
    passes: list[int] = []

    def val_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        passes.append(1)
        yield from zip(val_images.split(16), val_labels.split(16), strict=True)

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[tuple[str, object]] = []

        def on_validation(self, sums: np.ndarray) -> None:
            self.events.append(("val", sums.copy()))

        def on_epoch_end(self, row: dict[str, float]) -> None:
            self.events.append(("row", dict(row)))

    recorder, model = Recorder(), tiny_model()
    history = fit(model, as_epochs(images, labels), val_batches, quiet(epochs=2), log=lambda _: None,
                  callbacks=[recorder], num_classes=2)
    assert [kind for kind, _ in recorder.events] == ["val", "row", "val", "row"] and len(passes) == 2
    for (_, sums), (_, row) in zip(recorder.events[::2], recorder.events[1::2], strict=True):
        assert isinstance(sums, np.ndarray) and isinstance(row, dict) and sums.shape == (3, 2)
        assert sums[2].tolist() == [float((val_labels == c).sum()) for c in (0, 1)]  # counts per class
        assert loss_and_accuracy(sums) == pytest.approx((row["val_loss"], row["val_acc"]))
    # the best epoch's pass scored the weights fit leaves in the model: the same sums again
    last = recorder.events[2 * (history.best_epoch - 1)][1]
    assert np.allclose(class_sums(model, (val_images, val_labels), num_classes=2), last)
    assert evaluate(model, (val_images, val_labels)) == pytest.approx(loss_and_accuracy(last))


def test_a_resumed_run_tells_callbacks_where_it_starts_and_tensorboard_drops_the_killed_runs_epochs(
        tmp_path: Path) -> None:
    """A run killed after it logged epoch 2 but before epoch 2's checkpoint resumes at epoch 2:
    fit says so to every callback (on_train_begin), and the TensorBoard log then holds each epoch
    once (the killed run's epoch 2 purged), read from the checkpoint fit loads, not a second load."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer_client.tensorboard_log import TensorBoardCallback
    from trainer_client.train import Callback

    class Killed(Exception):
        pass

    class Starts(Callback):
        def __init__(self, kill_at: int = 0) -> None:
            self.kill_at, self.starts = kill_at, []

        def on_train_begin(self, first_epoch: int, resumed: bool) -> None:
            self.starts.append((first_epoch, resumed))

        def on_epoch_end(self, row: dict[str, float]) -> None:
            if row["epoch"] == self.kill_at:  # after the callbacks before it logged the epoch
                raise Killed

    images, labels = halves_data(32, seed=0)
    config, board = quiet(epochs=3, out_dir=tmp_path / "out"), tmp_path / "tb"
    first = Starts(kill_at=2)
    with pytest.raises(Killed):
        fit(tiny_model(), as_epochs(images, labels), (images, labels), config, log=lambda _: None,
            callbacks=[TensorBoardCallback(board), first])
    second = Starts()
    fit(tiny_model(), as_epochs(images, labels), (images, labels), config, log=lambda _: None,
        callbacks=[TensorBoardCallback(board), second], resume=tmp_path / "out" / "checkpoint.pt")
    assert first.starts == [(1, False)] and second.starts == [(2, True)]
    events = EventAccumulator(str(board), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/val")] == [1, 2, 3]  # without the purge: 1, 2, 2, 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss/val")] == pytest.approx([r["val_loss"] for r in rows], rel=1e-6)


def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path: Path) -> None:
    """A resumed run goes on with the run's settings. Before, --epochs 6 on a 3-epoch checkpoint
    trained epoch 4 at lr 0 (the scheduler's length came from the checkpoint, the loop's from the
    new config), a new lr was silently replaced by the checkpoint's, and other settings silently
    applied. Early stopping's patience may change; a finished run says there is nothing to do."""
    images, labels = halves_data(32, seed=0)
    out = tmp_path / "out"
    settings = {"width": 4, "dropout": 0.3}
    fit(tiny_model(), as_epochs(images, labels), (images, labels), quiet(epochs=2, out_dir=out),
        log=lambda _: None, settings=settings)
    ckpt = out / "checkpoint.pt"

    def resume(config: TrainConfig, **kwargs: object) -> list[str]:
        said: list[str] = []
        fit(tiny_model(), as_epochs(images, labels), (images, labels), config, log=said.append, resume=ckpt,
            **{"settings": settings, **kwargs})  # type: ignore[arg-type]
        return said

    for change, fragment in [({"epochs": 3}, "epochs 3 (the checkpoint's run: 2)"),
                             ({"lr": 1e-4}, "lr 0.0001 (the checkpoint's run: 0.003)"),
                             ({"l1": 1e-3, "seed": 5}, "l1 0.001 (the checkpoint's run: 0.0); seed 5 (the "
                                                       "checkpoint's run: 0)")]:
        with pytest.raises(ValueError, match=r"a resumed run goes on with the settings it was started with.*"
                                             + fragment.replace("(", r"\(").replace(")", r"\)")):
            resume(quiet(**{"epochs": 2, "out_dir": out, **change}))
    with pytest.raises(ValueError, match=r"dropout 0\.0 \(the checkpoint's run: 0\.3\)"):
        resume(quiet(epochs=2, out_dir=out), settings={"width": 4, "dropout": 0.0})
    with pytest.raises(ValueError, match="state 'strength' only in this run"):
        resume(quiet(epochs=2, out_dir=out), stateful={"strength": _Counter()})
    said = resume(quiet(epochs=2, out_dir=out, patience=9))
    assert said == [f"{ckpt}: the run is finished (all after epoch 2 of 2); nothing left to train"]
    # a checkpoint from before settings were saved: only the config and the state names are compared
    old = torch.load(ckpt, weights_only=False)
    del old["settings"]
    torch.save(old, ckpt)
    assert resume(quiet(epochs=2, out_dir=out), settings={"width": 4, "dropout": 0.0})


def test_a_validation_loss_that_is_not_finite_stops_the_run() -> None:
    """No epoch could be "best": before, fit reported epoch 0 and restored the untrained weights."""
    images, labels = halves_data(32, seed=0)
    val_images = images.float()
    val_images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1: the validation loss is nan"):
        fit(tiny_model(), as_epochs(images, labels), (val_images, labels), quiet(epochs=2), log=lambda _: None)


def test_weight_norms_of_huge_weights_stay_finite() -> None:
    """L2 <= L1 always; in float32 the sum of squares of weights near 1e20 overflowed to inf."""
    model = tiny_model()
    with torch.no_grad():
        for w in penalized_weights(model):
            w.fill_(1e20)
    stats = weight_stats(model)
    assert np.isfinite(stats["l2_norm"]) and stats["l2_norm"] <= stats["l1_norm"]


class _Counter:
    """A stateful object for `fit(stateful=...)`."""

    def state_dict(self) -> dict[str, int]:
        return {"n": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def test_early_stopping_stops_and_restores_best_weights(tmp_path: Path) -> None:
    # Validation has the same images as training with the labels swapped: the better the model
    # learns the training labels, the higher the validation loss, so it must stop early.
    images, labels = halves_data(64, seed=0)
    val = (images, 1 - labels)
    model = tiny_model()
    history = fit(model, as_epochs(images, labels), val,
                  quiet(epochs=30, patience=3, lr=1e-2, out_dir=tmp_path), log=lambda _: None)
    assert history.stopped_early
    assert len(history.rows) == history.best_epoch + 3 < 30
    last, best = history.rows[-1], history.best
    assert last["val_loss"] > best["val_loss"]
    restored_loss, _ = evaluate(model, val)
    assert restored_loss == pytest.approx(best["val_loss"], rel=1e-5)
    assert restored_loss != pytest.approx(last["val_loss"], rel=1e-3)
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == history.best_epoch
    for key, value in model.state_dict().items():
        assert torch.equal(saved["model_state"][key], value)


def test_fit_writes_metrics_checkpoints_and_curves(tmp_path: Path) -> None:
    images, labels = halves_data(64, seed=0)
    val = halves_data(32, seed=1)
    out = tmp_path / "run"
    history = fit(tiny_model(), as_epochs(images, labels), val, quiet(epochs=3, patience=10, out_dir=out),
                  log=lambda _: None)
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[2]["epoch"]) == 3
    assert float(rows[1]["val_acc"]) == pytest.approx(history.rows[1]["val_acc"])
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(jsonl) == 3
    assert {"gap_loss", "gap_acc", "l1_norm", "l2_norm", "near_zero_frac", "images_per_s", "lr"} <= set(jsonl[0])
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert {"model_state", "config", "epoch", "metrics"} <= set(ckpt)
        assert ckpt["config"]["out_dir"] == str(out)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- overfitting monitor ------------------------------------------------------------------------

def feed(monitor: OverfitMonitor, gaps: list[float]) -> list[str | None]:
    """Feed accuracy gaps (train 1.0, val 1.0 - gap) with a steady loss gap."""
    return [monitor.update(i + 1, 0.1, 1.0, 0.2, 1.0 - g).warning for i, g in enumerate(gaps)]


def test_monitor_warns_when_gap_keeps_widening() -> None:
    monitor = OverfitMonitor(warn_epochs=3)
    warnings = feed(monitor, [0.01, 0.02, 0.03, 0.04, 0.05])
    assert warnings[:3] == [None, None, None]
    assert warnings[3] is not None and "accuracy gap" in warnings[3] and "epoch 4" in warnings[3]
    assert warnings[4] is not None
    assert monitor.warnings == [w for w in warnings if w]


def test_monitor_is_quiet_on_a_steady_or_closing_gap() -> None:
    assert feed(OverfitMonitor(3), [0.03, 0.03, 0.03, 0.03, 0.03, 0.03]) == [None] * 6
    # Widening twice, then a pause: the streak resets and never reaches 3.
    assert feed(OverfitMonitor(3), [0.01, 0.02, 0.03, 0.03, 0.04, 0.05, 0.04]) == [None] * 7
    # A negative gap moving toward zero (early epochs) is not overfitting.
    assert feed(OverfitMonitor(3), [-0.10, -0.08, -0.05, -0.03, -0.01]) == [None] * 5


def test_monitor_watches_the_loss_gap_too() -> None:
    monitor = OverfitMonitor(warn_epochs=2)
    reports = [monitor.update(i + 1, 0.1, 0.9, 0.1 + 0.1 * i, 0.9) for i in range(4)]
    assert reports[0].loss == pytest.approx(0.0) and reports[0].acc == pytest.approx(0.0)
    assert reports[1].warning is None
    assert reports[2].warning is not None and "loss gap" in reports[2].warning


def test_fit_reports_monitor_warnings() -> None:
    # Random labels: training accuracy climbs while validation stays at chance.
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 2, (64,), generator=gen)
    val = (torch.randint(0, 256, (64, 1, 8, 8), generator=gen, dtype=torch.uint8),
           torch.randint(0, 2, (64,), generator=gen))
    lines: list[str] = []
    history = fit(RegularizedCNN(1, 2, width=16, depth=2, dropout=0.0, seed=0), as_epochs(images, labels), val,
                  quiet(epochs=12, lr=1e-2, patience=20, gap_warn_epochs=2), log=lines.append)
    assert isinstance(history, History)
    assert history.rows[-1]["gap_acc"] > 0.2
    assert history.warnings and any(line.startswith("warning:") for line in lines)


# ---- experiment ---------------------------------------------------------------------------------

def test_digits_split_is_stratified_disjoint_and_deterministic() -> None:
    from sklearn.datasets import load_digits

    train, val = digits_split(200, 400, seed=0)
    assert len(train) == 200 and len(val) == 400 and not set(train) & set(val)
    labels = load_digits().target
    assert np.bincount(labels[train], minlength=10).min() >= 19
    again_train, again_val = digits_split(200, 400, seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert np.array_equal(digits_split(1000, 400, seed=0)[1], val)  # val depends on (n_val, seed) only
    assert not np.array_equal(digits_split(200, 400, seed=1)[0], train)
    with pytest.raises(ValueError, match="n_train"):
        digits_split(1500, 400)


def test_regularization_experiment_writes_table_and_plot(tmp_path: Path) -> None:
    images, labels = halves_data(32, seed=0)
    val = halves_data(32, seed=1)
    made: list[tuple[bool, int]] = []

    def make_train_epoch(augment: bool, seed: int) -> Callable[[int], Batches]:
        made.append((augment, seed))
        return as_epochs(images, labels)

    result = run_regularization_experiment(make_train_epoch, val, seeds=(0, 1), out_dir=tmp_path, epochs=2,
                                           width=4, depth=2, num_classes=2, device="cpu", keep_runs=False,
                                           log=lambda _: None)
    assert len(result.runs) == 8
    assert (True, 1) in made and (False, 0) in made
    table = (tmp_path / "regularization.md").read_text()
    for cfg in REGULARIZATION_CONFIGS:
        assert f"| {cfg.name} |" in table
    assert "verdict:" in table and " ± " in table
    assert (tmp_path / "regularization.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result.summary) == {c.name for c in REGULARIZATION_CONFIGS}


def test_local_train_epoch_yields_stream_shaped_batches() -> None:
    images, labels = load_digits_images()
    assert images.shape == (1797, 32, 32, 1) and images.dtype == np.uint8
    ids = np.arange(20, 40)
    make = make_local_train_epoch(images, labels, ids, batch_size=8)
    plain, augmented = make(False, 0)(0), make(True, 0)(0)
    assert [len(b[0]) for b in plain] == [8, 8, 4]
    x, y, sample_ids = augmented[0]
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 32, 32) and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(labels[sample_ids.numpy()]))
    assert torch.equal(plain[0][0], torch.from_numpy(images[sample_ids.numpy()]).permute(0, 3, 1, 2))
    assert not torch.equal(x, plain[0][0])  # same plan (seed, epoch), augmented pixels
    assert torch.equal(make(True, 0)(0)[0][0], x)  # deterministic
    assert not torch.equal(make(True, 0)(1)[0][0], x)  # another epoch: another order and draws
