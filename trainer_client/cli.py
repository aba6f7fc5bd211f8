"""`augsvc-train`: train the regularized CNN on batches streamed from augsvc.

Without --server it starts an embedded local augsvc (a subprocess on a unix socket) serving the
built-in digits, which is what `make demo` runs; under torchrun, local rank 0 of each node starts
it and the node's other ranks find it through the process group. Any served dataset works
(`--dataset`, `--spec`): validation streams through the deterministic eval pipeline in batches
the server accepts, and the model adapts to the data's channels, size and classes.

Distributed: `torchrun --nproc_per_node N -m trainer_client.cli ...` (or `augsvc-train --nproc N`)
trains with DistributedDataParallel (gloo on CPU, nccl on GPUs); rank 0 prints and writes.
`--checkpoint-every S` and `--resume out/checkpoint.pt` continue a run exactly where it stopped.
`--experiment regularization` runs the four configurations x 3 seeds study on a small training
subset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from augsvc.spec import Spec, load_spec

from .adaptive import (
    GAP_METRICS,
    ClassGaps,
    ControllerSettings,
    StrengthCallback,
    StrengthController,
    gaps_from_sums,
    parse_strength,
)
from .checkpoint import ResumeMismatch, gather_objects
from .client import AugmentClient, DatasetInfo, TLSConfig
from .embedded import EmbeddedServer
from .model import RegularizedCNN
from .served_data import (
    MAX_VAL_BATCH,
    ImageFormat,
    batch_size_within,
    check_batch_fits,
    eval_spec,
    probe_format,
    random_split,
    validation_stream,
)
from .stream import AugmentedStream
from .study import STUDY_CONTROLLER
from .train import Callback, TrainConfig, class_sums, fit, quiet, resolve_device, settle_before_exit
from .world import World

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "augsvc" / "examples" / "digits.yaml"


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """Under a launcher that set WORLD_SIZE > 1 (torchrun), the default process group for this run
    (nccl when training on CUDA, else gloo), destroyed at the end; else nothing to set up. SIGTERM
    (which torchrun sends when a rank fails) ends the process through SystemExit, so that an
    embedded server is stopped on the way out."""
    world = World.discover()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if world.world_size == 1 or dist.is_initialized():
            yield world
            return
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            yield World.discover()
        finally:
            dist.destroy_process_group()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def device_for(name: str, world: World) -> str:
    """--device for this rank: "auto" is cuda:LOCAL_RANK when CUDA is there, else cpu; "cuda"
    is cuda:LOCAL_RANK (one GPU per rank of a node)."""
    if name == "auto":
        return f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu"
    return f"cuda:{world.local_rank}" if name == "cuda" else name


@contextlib.contextmanager
def connect(args: argparse.Namespace, world: World | None = None) -> Iterator[AugmentClient]:
    """A client of --server, or of an embedded server: one per node, started by the node's local
    rank 0; the other ranks learn its address from the process group (all_gather_object)."""
    world = world or World()
    if args.server:
        tls = TLSConfig(args.tls_ca, args.tls_cert, args.tls_key) if (args.tls_ca or args.tls_cert) else None
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        try:
            remote = AugmentClient(args.server, tls=tls, token=token, insecure=args.insecure)
        except ValueError as exc:  # a token it would send in clear text, an empty target list
            print(f"augsvc-train: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        with remote as client:
            yield client
        return
    with contextlib.ExitStack() as stack:
        target = None
        if world.is_local_main:
            started = time.perf_counter()
            server = stack.enter_context(EmbeddedServer(workers=args.workers))
            target = server.target
            if world.is_main:
                print(f"embedded augsvc on {server.target} ({server.workers} workers, "
                      f"ready in {time.perf_counter() - started:.1f}s)", flush=True)
        if world.distributed:
            targets = dict(t for t in gather_objects((world.node, target), world) if t[1] is not None)
            target = targets[world.node]
        if target is None:
            raise RuntimeError(f"rank {world.rank}: no embedded server for node {world.node}, and no --server")
        with AugmentClient(target) as client:
            yield client
        if world.distributed:
            dist.barrier()  # every rank is done with the node's server before it stops


def describe_shape(info: DatasetInfo) -> str:
    """A dataset's image shape as people read it: "32x32x1", or "sizes vary"."""
    return "x".join(map(str, info.image_shape)) if info.image_shape else "sizes vary"


def image_format(client: AugmentClient, dataset: str, spec: Spec, info: DatasetInfo, sample_id: int) -> ImageFormat:
    """Channels and size of what the model sees: from the dataset and spec, or one probed image."""
    size = spec.output_size_for((info.image_shape[0], info.image_shape[1]) if info.image_shape else None)
    if info.image_shape and size:
        return ImageFormat(info.image_shape[2], size[0], size[1])
    return probe_format(client, dataset, spec, sample_id)


def cmd_train(args: argparse.Namespace, callbacks: Sequence[Callback] = ()) -> int:
    out = Path(args.out)
    spec = load_spec(args.spec)
    with process_group(args.device) as world, connect(args, world) as client:
        say: Callable[..., None] = print if world.is_main else quiet
        info = client.dataset_info(args.dataset)
        n = info.num_samples
        n_val = int(round(n * args.val_fraction))
        if not 0 < n_val < n:
            _refuse(f"--val-fraction {args.val_fraction}: {n_val} of the dataset's {n} images for validation; "
                    "expected at least one for each side", world)
        if args.train_size is not None and args.train_size > n - n_val:
            _refuse(f"--train-size {args.train_size}: only {n - n_val} of the dataset's {n} images are left for "
                    f"training beside the {n_val} for validation", world)
        if world.is_main:  # after the checks: a refused command leaves no folder behind
            out.mkdir(parents=True, exist_ok=True)
        train_ids, val_ids = random_split(n, n_val, args.seed, args.train_size)
        val_spec = eval_spec(spec)
        check_batch_fits(client.server_info(), spec, info, args.batch_size)
        val_stream = validation_stream(client, args.dataset, val_spec, val_ids,
                                       wanted_batch=min(MAX_VAL_BATCH, 2 * args.batch_size))
        fmt = image_format(client, args.dataset, val_spec, info, int(val_ids[0]))
        say(f"dataset {args.dataset}: {n} images {describe_shape(info)}, {info.num_classes} classes; "
            f"train {len(train_ids)} / val {len(val_ids)} (val batches of {val_stream.batch_size}, "
            f"{fmt.channels}x{fmt.height}x{fmt.width}); {world.world_size} rank(s)", flush=True)
        stream = AugmentedStream(client, args.dataset, spec, batch_size=args.batch_size, seed=args.seed,
                                 sample_ids=train_ids, prefetch=args.prefetch, with_mask=True)

        model = RegularizedCNN(fmt.channels, info.num_classes, width=args.width, depth=args.depth,
                               dropout=args.dropout, batch_norm=not args.no_batch_norm, seed=args.seed,
                               stem=RegularizedCNN.stem_for(fmt.height, fmt.width))
        config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, l1=args.l1,
                             label_smoothing=args.label_smoothing, patience=args.patience, out_dir=out,
                             progress=not args.no_progress, seed=args.seed, device=device_for(args.device, world),
                             checkpoint_every=args.checkpoint_every)
        hooks = list(callbacks)
        strength = strength_callback(args, client, val_spec, train_ids, val_ids, info, model, config.epochs, world)
        if strength is not None:
            hooks.insert(0, strength)  # first: its columns reach the other callbacks

        def train_epoch(epoch: int) -> AugmentedStream:
            if strength is None:
                stream.set_epoch(epoch)
            else:
                stream.set_epoch(epoch, strength=strength.strength, class_strength=strength.class_strength)
            return stream

        if args.tensorboard and world.is_main:
            from .tensorboard_log import TensorBoardCallback

            hooks.append(TensorBoardCallback(args.tensorboard, images_every=args.tb_images_every))
        if world.is_main and not args.resume:  # a resumed run's is the one it started with (checked by fit)
            (out / "spec.yaml").write_text(spec.to_yaml())
        with stream, val_stream:
            try:
                history = fit(model, train_epoch, lambda: val_stream, config, world=world, data=stream,
                              stateful={"strength": strength} if strength is not None else None, callbacks=hooks,
                              resume=args.resume, num_classes=info.num_classes, settings=run_settings(args, spec))
            except ResumeMismatch as exc:  # every rank finds it, before any collective of the run
                hint = ""
                if "weight_decay 0.05 (the checkpoint's run: 0.0005)" in str(exc):
                    hint = (" (--weight-decay's default became 0.05 on 2026-11-27, AdamW's scale; add "
                            "--weight-decay 0.0005 to go on with a run started before)")
                if world.is_main:
                    print(f"augsvc-train: error: {exc}{hint}", file=sys.stderr, flush=True)
                return 2
            except FloatingPointError as exc:  # a loss that is not a number: the run cannot go on
                if world.is_main:
                    print(f"augsvc-train: error: {exc}", file=sys.stderr, flush=True)
                return 1
    if not world.is_main:
        return 0
    best = history.best
    summary = {"best_epoch": history.best_epoch, "best_val_acc": best["val_acc"],
               "best_val_loss": best["val_loss"], "stopped_early": history.stopped_early,
               "warnings": history.warnings, "world_size": world.world_size, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"best epoch {history.best_epoch}: val acc {100 * best['val_acc']:.1f}% "
          f"(val loss {best['val_loss']:.4f}); outputs in {out}/", flush=True)
    return 0


def _refuse(message: str, world: World) -> NoReturn:
    """A command line that the data it met makes impossible: one error line (from rank 0), exit 2
    (as argparse) on every rank."""
    if world.is_main:
        print(f"augsvc-train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_settings(args: argparse.Namespace, spec: Spec) -> dict[str, Any]:
    """The options that define a training run beside `TrainConfig`'s (the model, the data, the
    spec by its identity, the augmentation strength): a checkpoint keeps them, and `--resume`
    with others is refused."""
    keys = ["dataset", "batch_size", "train_size", "val_fraction", "width", "depth", "dropout", "no_batch_norm"]
    schedule = parse_strength(args.augment_strength) if args.augment_strength is not None else None
    if schedule is not None and schedule.kind == "adaptive":
        keys += ["strength_target", "strength_step", "strength_start", "strength_gap", "strength_per_class"]
    # the schedule as parsed: "0.5", ".5" and "0.50" are one strength
    strength = None if schedule is None else schedule.value if schedule.kind == "fixed" else schedule.kind
    return {"spec": spec.identity, "augment_strength": strength, **{k: getattr(args, k) for k in keys}}


def strength_callback(args: argparse.Namespace, client: AugmentClient, clean_spec: Spec, train_ids: Any,
                      val_ids: Any, info: DatasetInfo, model: torch.nn.Module, epochs: int, world: World
                      ) -> StrengthCallback | None:
    """--augment-strength as a callback of `fit`. Adaptive: the clean gap is measured after each
    epoch on a fixed subset of up to 512 training images, through the eval pipeline, against the
    validation pass `fit` just made (its per-class sums); each rank scores its shard and the sums
    are added over the ranks, so every rank sees the same gaps and takes the same decision."""
    if args.augment_strength is None:
        return None
    schedule = parse_strength(args.augment_strength)
    if schedule.kind != "adaptive":
        return StrengthCallback(schedule, epochs)
    settings = ControllerSettings(target=args.strength_target, step=args.strength_step, start=args.strength_start,
                                  gap=args.strength_gap, per_class=args.strength_per_class)
    subset = np.sort(np.random.default_rng(args.seed).permutation(np.asarray(train_ids))[:512])
    batch = batch_size_within(client.server_info(), clean_spec, info, MAX_VAL_BATCH)

    def clean(ids: Any) -> AugmentedStream:
        return AugmentedStream(client, args.dataset, clean_spec, batch_size=batch, seed=0, shuffle=False,
                               sample_ids=ids, rank=world.rank, world_size=world.world_size, with_mask=True)

    train_clean = clean(subset)

    def measure(val_sums: np.ndarray | None) -> ClassGaps:
        if val_sums is None or val_sums.shape[1] != info.num_classes:
            raise RuntimeError("the adaptive strength needs fit(num_classes=...): per-class validation sums")
        train_clean.set_epoch(0)
        train_sums = class_sums(model, train_clean, num_classes=info.num_classes, world=world)
        return gaps_from_sums(train_sums, val_sums, settings.gap)

    return StrengthCallback(schedule, epochs, controller=StrengthController(settings, info.num_classes),
                            measure=measure)


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import DIGITS_MEAN, DIGITS_SPEC, DIGITS_STD, digits_split, run_regularization_experiment

    out = Path(args.out)
    spec = load_spec(args.spec) if args.spec_given else load_spec(DIGITS_SPEC)
    with connect(args) as client:
        info = client.dataset_info(args.dataset)
        n = info.num_samples
        if args.dataset == "digits" and n == 1797:  # the built-in set: a stratified split
            train_ids, val_ids = digits_split(args.exp_train, args.exp_val, seed=0)
        else:
            train_ids, val_ids = random_split(n, args.exp_val, 0, args.exp_train)
        plain = eval_spec(spec)
        val_stream = validation_stream(client, args.dataset, plain, val_ids)

        def make_train_epoch(augment: bool, seed: int) -> Any:
            stream = AugmentedStream(client, args.dataset, spec if augment else plain,
                                     batch_size=args.exp_batch_size, seed=seed, sample_ids=train_ids)

            def train_epoch(epoch: int) -> AugmentedStream:
                stream.set_epoch(epoch)
                return stream

            return train_epoch

        note = (f"Data: {args.dataset} ({describe_shape(info)}), {len(train_ids)} training images, "
                f"{len(val_ids)} validation images, batch size {args.exp_batch_size}; training batches streamed "
                f"from augsvc (AugmentedStream) with `{spec.to_dict()}`.")
        print(note, flush=True)
        fmt = image_format(client, args.dataset, plain, info, int(val_ids[0]))
        # the digits' pixel statistics, or a neutral normalization for any other dataset
        mean, std = (DIGITS_MEAN, DIGITS_STD) if args.dataset == "digits" and n == 1797 else \
            ((0.5,) * fmt.channels, (0.25,) * fmt.channels)
        run_regularization_experiment(
            make_train_epoch, lambda: val_stream, out_dir=out, seeds=tuple(args.seeds), data_note=note,
            depth=args.exp_depth, width=args.exp_width, epochs=args.exp_epochs, patience=args.exp_patience,
            lr=args.exp_lr, device=device_for(args.device, World()), in_channels=fmt.channels,
            num_classes=info.num_classes, mean=mean, std=std)
    print(f"wrote {out}/regularization.md and {out}/regularization.png")
    return 0


def launch(nproc: int, argv: Sequence[str]) -> int:
    """`augsvc-train --nproc N ARGS`: ARGS under torchrun on this node (torch.distributed.run
    --standalone), N ranks; returns torchrun's exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "trainer_client.cli", *argv]
    return subprocess.run(command, check=False).returncode


def _without_nproc(argv: Sequence[str]) -> list[str]:
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return rest


def main(argv: list[str] | None = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """The command line; `callbacks` go to `fit` (for programs that drive a run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs = list(zip(argv, argv[1:], strict=False))
    if "--experiment=adaptive" in argv or ("--experiment", "adaptive") in pairs:
        from .study import main as study_main  # the adaptive-augmentation study has options of its own

        if "--experiment=adaptive" in argv:
            argv.remove("--experiment=adaptive")
        else:
            at = pairs.index(("--experiment", "adaptive"))
            del argv[at:at + 2]
        return study_main(argv)
    p = argparse.ArgumentParser(prog="augsvc-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="augsvc target(s): host:port, a comma list, unix:/path or dns:///name:port "
                                    "(default: start an embedded local service)")
    p.add_argument("--tls-ca")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--token-file")
    p.add_argument("--insecure", action="store_true",
                   help="send --token-file's token without TLS to a server beyond this host")
    p.add_argument("--workers", type=int, default=None, help="embedded service workers")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--spec", default=str(DEFAULT_SPEC), help="augmentation spec (YAML/JSON file or text)")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prefetch", type=int, help="batches kept ahead (default: as many as fit in 256 MiB, 4 to 32)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-2,
                   help="L2, as AdamW's decoupled weight decay (scaled by lr: 5e-2 here is about SGD's 5e-4)")
    p.add_argument("--l1", type=float, default=1e-5)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--no-batch-norm", action="store_true")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--train-size", type=int, default=None, help="use only this many training images")
    p.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK when CUDA is there, else cpu")
    p.add_argument("--nproc", type=int, default=None,
                   help="train with N ranks on this node (runs this command under torchrun)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also write OUT/checkpoint.pt every STEPS steps inside an epoch (it is written at "
                        "every epoch end)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue exactly from OUT/checkpoint.pt of a run")
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard scalars and sample grids to DIR "
                                                        "(needs: pip install 'augsvc[tensorboard]')")
    p.add_argument("--tb-images-every", type=int, default=5, metavar="EPOCHS",
                   help="TensorBoard: a grid of augmented training images every EPOCHS epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--augment-strength", metavar="adaptive|ramp|FLOAT",
                   help="the augmentation strength per epoch: a fixed value in [0, 1], a ramp 0 -> 1 over the "
                        "epochs, or adaptive (follows the clean train-val gap; default: the spec as written)")
    p.add_argument("--strength-gap", choices=GAP_METRICS, default=STUDY_CONTROLLER.gap,
                   help="adaptive: the clean gap the controller watches")
    p.add_argument("--strength-target", type=float, default=STUDY_CONTROLLER.target, help="adaptive: its target")
    p.add_argument("--strength-step", type=float, default=STUDY_CONTROLLER.step, help="adaptive: change per epoch")
    p.add_argument("--strength-start", type=float, default=STUDY_CONTROLLER.start, help="adaptive: first strength")
    p.add_argument("--strength-per-class", action="store_true", help="adaptive: one strength per class")
    p.add_argument("--experiment", choices=["regularization", "adaptive"],
                   help="run a study instead of one training (adaptive: see `augsvc-train --experiment "
                        "adaptive --help`)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--exp-train", type=int, default=200, help="experiment: training images")
    p.add_argument("--exp-val", type=int, default=400, help="experiment: validation images")
    p.add_argument("--exp-batch-size", type=int, default=16)
    p.add_argument("--exp-depth", type=int, default=4, help="experiment: conv blocks (same for every config)")
    p.add_argument("--exp-width", type=int, default=32, help="experiment: channels of the first block")
    p.add_argument("--exp-epochs", type=int, default=60, help="experiment: epochs per run (early stopping aside)")
    p.add_argument("--exp-patience", type=int, default=15, help="experiment: early stopping's patience")
    p.add_argument("--exp-lr", type=float, default=3e-3, help="experiment: AdamW's learning rate")
    args = p.parse_args(argv)
    args.spec_given = args.spec != str(DEFAULT_SPEC)
    checks = [("--val-fraction", args.val_fraction, 0 < args.val_fraction < 1, "a fraction in (0, 1)"),
              ("--train-size", args.train_size, args.train_size is None or args.train_size >= 1, "an integer >= 1"),
              ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
              ("--dropout", args.dropout, 0 <= args.dropout < 1, "a value in [0, 1)"),
              ("--width", args.width, args.width >= 1, "an integer >= 1"),
              ("--depth", args.depth, args.depth >= 1, "an integer >= 1")]
    for flag, value, ok, allowed in checks:
        if not ok:
            p.error(f"{flag}: {value} is not allowed; expected {allowed}")
    try:  # the training settings, checked as fit checks them, before anything starts
        TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, l1=args.l1,
                    label_smoothing=args.label_smoothing, patience=args.patience,
                    checkpoint_every=args.checkpoint_every)
        if args.augment_strength is not None:
            parse_strength(args.augment_strength)
        if args.experiment == "regularization":
            TrainConfig(epochs=args.exp_epochs, lr=args.exp_lr, patience=args.exp_patience)
    except ValueError as exc:
        p.error(str(exc))
    if args.nproc is not None and "RANK" not in os.environ:
        if args.nproc < 1:
            p.error(f"--nproc: {args.nproc} is not allowed; expected >= 1")
        return launch(args.nproc, _without_nproc(argv))
    if args.experiment == "regularization":
        return cmd_experiment(args)
    try:
        return cmd_train(args, callbacks)
    finally:
        settle_before_exit()


if __name__ == "__main__":
    sys.exit(main())
