"""augsvc-train on any served dataset: a folder of RGB photos of mixed sizes, validated through the
eval pipeline in batches within the server's max_batch_bytes, the model sized by the data, and
TensorBoard event files that read back; the eval pipeline and batch sizing on their own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.servers import serve
from PIL import Image

from augsvc import load_spec
from augsvc.server import ServerSettings
from trainer_client.cli import main
from trainer_client.client import DatasetInfo, ServerInfo
from trainer_client.served_data import batch_size_within, check_batch_fits, eval_spec

CROP_SPEC = {"transforms": [{"random_resized_crop": {"height": 40, "width": 40, "scale_range": [0.5, 1.0]}},
                            {"hflip": {"p": 0.5}}, {"color": {"brightness": 0.2, "p": 0.5}}]}
#: 12 validation images of 40x40x3 would be 57,600 bytes: this limit allows 5 per batch.
MAX_BATCH_BYTES = 5 * 40 * 40 * 3 + 100


def make_photos(root: Path, per_class: int = 20) -> None:
    """Three classes told apart by colour (red, green, blue dominant), JPEGs and PNGs of sizes from
    48 to 96 pixels a side."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(48, 97, 2))
            pixels = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
            pixels[..., c] += 140
            Image.fromarray(pixels).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")


@pytest.fixture(scope="module")
def photos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("photos")
    make_photos(root)
    with serve(ServerSettings(workers=1, datasets={"photos": str(root)}, max_batch_bytes=MAX_BATCH_BYTES)) as served:
        yield served.target


def test_train_two_epochs_on_a_served_folder_of_mixed_size_photos(photos_server: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, board = tmp_path / "run", tmp_path / "tb"
    code = main(["--server", photos_server, "--dataset", "photos", "--spec", json.dumps(CROP_SPEC),
                 "--out", str(out), "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.2",
                 "--width", "8", "--depth", "2", "--no-progress", "--device", "cpu",
                 "--tensorboard", str(board), "--tb-images-every", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "photos: 60 images sizes vary, 3 classes; train 48 / val 12 (val batches of 5, 3x40x40)" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["val_acc"] <= 1 for r in rows)
    assert json.loads((out / "summary.json").read_text())["best_epoch"] in (1, 2)

    events = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "gap/loss", "gap/acc",
                "weights/l1_norm", "weights/l2_norm", "speed/images_per_s", "lr"):
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == [1, 2]
    val_loss = [e.value for e in events.Scalars("loss/val")]
    assert val_loss == pytest.approx([r["val_loss"] for r in rows], rel=1e-6)
    grids = events.Images("augmented_train_batch")
    assert [g.step for g in grids] == [1, 2] and grids[0].width > 40 and grids[0].height >= 40


def test_a_resume_with_other_options_is_refused_naming_them(photos_server: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """augsvc-train --resume with options other than the run's: exit 2 and one line naming each
    (before: a new --dropout was applied and a dropped --augment-strength left the stream at the
    checkpoint's strength, silently). The run's own options resume; a finished run says so."""
    out = tmp_path / "run"
    run = ["--server", photos_server, "--dataset", "photos", "--spec", json.dumps(CROP_SPEC), "--out", str(out),
           "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.2", "--width", "8", "--depth", "2",
           "--no-progress", "--device", "cpu"]
    assert main([*run, "--dropout", "0.3", "--augment-strength", "0.5"]) == 0
    capsys.readouterr()
    spec_yaml = (out / "spec.yaml").read_text()
    other_spec = ["--spec", json.dumps({"transforms": [{"resize": {"height": 40, "width": 40}}]})]
    assert main([*run, "--dropout", "0.0", *other_spec, "--resume", str(out / "checkpoint.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("augsvc-train: error: ") and "dropout 0.0 (the checkpoint's run: 0.3)" in err
    assert "augment_strength None (the checkpoint's run: 0.5)" in err and "state 'strength' only in the" in err
    assert "spec '" in err and (out / "spec.yaml").read_text() == spec_yaml  # the run's record is kept
    # the same strength written otherwise is the same run
    assert main([*run, "--dropout", "0.3", "--augment-strength", ".50", "--resume", str(out / "checkpoint.pt")]) == 0
    assert "the run is finished (all after epoch 1 of 1); nothing left to train" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--val-fraction", "0"], "--val-fraction: 0.0 is not allowed; expected a fraction in (0, 1)"),
    (["--val-fraction", "-0.1"], "--val-fraction: -0.1 is not allowed"),
    (["--train-size", "0"], "--train-size: 0 is not allowed; expected an integer >= 1"),
    (["--epochs", "0"], "epochs: 0 is not allowed; expected an integer >= 1"),
    (["--dropout", "1.0"], "--dropout: 1.0 is not allowed; expected a value in [0, 1)"),
    (["--label-smoothing", "1.5"], "label_smoothing: 1.5 is not allowed"),
    (["--augment-strength", "2"], "--augment-strength: 2.0 is outside [0, 1]"),
    (["--experiment", "regularization", "--exp-patience", "0"], "patience: 0 is not allowed"),
])
def test_impossible_options_are_refused_before_anything_starts(args: list[str], message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """One usage line and exit 2, before a server starts (before: tracebacks after the embedded
    server had started, or, for a negative fraction, an inverted split trained silently)."""
    with pytest.raises(SystemExit) as info:
        main(["--out", "unused", "--no-progress", *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_train_size_over_what_is_left_is_refused(photos_server: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--server", photos_server, "--dataset", "photos", "--spec", json.dumps(CROP_SPEC), "--out",
              str(tmp_path), "--train-size", "49", "--val-fraction", "0.2", "--no-progress"])
    assert info.value.code == 2
    assert "--train-size 49: only 48 of the dataset's 60 images are left for training" in capsys.readouterr().err


def test_the_regularization_study_runs_small_on_a_served_folder(photos_server: str, tmp_path: Path) -> None:
    """--experiment regularization on RGB photos of three classes, two epochs a run (before: it
    built a 1-channel, 10-class model and failed, and --epochs was ignored for its fixed 60)."""
    out = tmp_path / "study"
    code = main(["--server", photos_server, "--dataset", "photos", "--spec", json.dumps(CROP_SPEC),
                 "--experiment", "regularization", "--out", str(out), "--seeds", "0", "--exp-train", "24",
                 "--exp-val", "12", "--exp-batch-size", "4", "--exp-epochs", "2", "--exp-patience", "2",
                 "--exp-depth", "2", "--exp-width", "8", "--device", "cpu"])
    assert code == 0
    runs = sorted((out / "runs").glob("*/metrics.jsonl"))
    assert len(runs) == 4
    for metrics in runs:
        assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert (out / "regularization.md").exists()


def test_resuming_a_run_made_with_the_old_weight_decay_default_says_how(photos_server: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "old"
    run = ["--server", photos_server, "--dataset", "photos", "--spec", json.dumps(CROP_SPEC), "--out", str(out),
           "--epochs", "1", "--batch-size", "4", "--width", "8", "--depth", "2", "--no-progress", "--device", "cpu"]
    assert main([*run, "--weight-decay", "0.0005"]) == 0  # what the default was before 2026-11-27
    capsys.readouterr()
    assert main([*run, "--resume", str(out / "checkpoint.pt")]) == 2
    assert "add --weight-decay 0.0005 to go on with a run started before" in capsys.readouterr().err
    assert main([*run, "--weight-decay", "0.0005", "--resume", str(out / "checkpoint.pt")]) == 0


def test_eval_pipeline_follows_the_training_spec() -> None:
    cropped = eval_spec("augsvc/examples/imagenet.yaml").to_dict()["transforms"]
    assert cropped == [{"resize_shorter": {"side": 256}}, {"center_crop": {"height": 224, "width": 224}}]
    resized = eval_spec({"transforms": [{"rotate": {"limit_range": [-5, 5]}}, {"resize": {"height": 32, "width": 24}}]})
    assert resized.to_dict()["transforms"] == [{"resize": {"height": 32, "width": 24}}]
    assert eval_spec("augsvc/examples/digits.yaml").steps == ()


def test_batches_are_sized_within_the_servers_limit() -> None:
    server = ServerInfo(version="x", workers=1, backends=("fused",), max_image_side=4096,
                        max_batch_bytes=64 << 20, max_inflight=8, hostname="h", pid=1)
    photos = DatasetInfo("p", 2000, 10, tuple("abcdefghij"), None, "folder")
    spec = load_spec("augsvc/examples/imagenet.yaml")
    # 512 images of 224x224x3 are 77 MB: over 64 MiB, so validation asks for 445 a batch
    assert batch_size_within(server, eval_spec(spec), photos, 512) == (64 << 20) // (224 * 224 * 3)
    with pytest.raises(ValueError, match=r"batch_size: 512 images of 150528 bytes .* use at most 445"):
        check_batch_fits(server, spec, photos, 512)
    check_batch_fits(server, spec, photos, 32)
