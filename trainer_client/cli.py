"""`augsvc-train`: train the regularized CNN on batches streamed from augsvc.

Without --server it starts an embedded local augsvc (a subprocess on a unix socket) serving the
built-in digits, which is what `make demo` runs. `--experiment regularization` runs the four
configurations x 3 seeds study on a small training subset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from augsvc.spec import load_spec

from .client import AugmentClient, DatasetInfo, TLSConfig
from .embedded import EmbeddedServer
from .model import RegularizedCNN
from .stream import AugmentedStream
from .train import TrainConfig, fit

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "augsvc" / "examples" / "digits.yaml"


def identity_spec(spec: Any) -> dict[str, Any]:
    """Un-augmented view of the data with the same output size as `spec` (for validation)."""
    size = load_spec(spec).output_size
    return {"transforms": [{"resize": {"height": size[0], "width": size[1]}}] if size else []}


def fetch_all(client: AugmentClient, dataset: str, spec: Any, ids: np.ndarray, batch_size: int = 512
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of `ids` through `spec`, in id order, as (uint8 [N,C,H,W], int64 [N])."""
    stream = AugmentedStream(client, dataset, spec, batch_size=batch_size, seed=0, shuffle=False,
                             sample_ids=ids)
    xs, ys = zip(*[(x, y) for x, y, _ in stream], strict=True)
    return torch.cat(xs), torch.cat(ys)


def random_split(n: int, n_val: int, seed: int, n_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    val = np.sort(perm[:n_val])
    train = np.sort(perm[n_val:] if n_train is None else perm[n_val:n_val + n_train])
    return train, val


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[AugmentClient]:
    if args.server:
        tls = TLSConfig(args.tls_ca, args.tls_cert, args.tls_key) if (args.tls_ca or args.tls_cert) else None
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        with AugmentClient(args.server, tls=tls, token=token) as client:
            yield client
        return
    started = time.perf_counter()
    with EmbeddedServer(workers=args.workers) as server:
        print(f"embedded augsvc on {server.target} ({server.workers} workers, "
              f"ready in {time.perf_counter() - started:.1f}s)", flush=True)
        with AugmentClient(server.target) as client:
            yield client


def describe_shape(info: DatasetInfo) -> str:
    """A dataset's image shape as people read it: "32x32x1", or "sizes vary"."""
    return "x".join(map(str, info.image_shape)) if info.image_shape else "sizes vary"


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(args.spec)
    with connect(args) as client:
        info = client.dataset_info(args.dataset)
        n = info.num_samples
        train_ids, val_ids = random_split(n, int(round(n * args.val_fraction)), args.seed, args.train_size)
        print(f"dataset {args.dataset}: {n} images {describe_shape(info)}, "
              f"{info.num_classes} classes; train {len(train_ids)} / val {len(val_ids)}", flush=True)
        val = fetch_all(client, args.dataset, identity_spec(spec), val_ids)
        stream = AugmentedStream(client, args.dataset, spec, batch_size=args.batch_size, seed=args.seed,
                                 sample_ids=train_ids, prefetch=args.prefetch)

        def train_epoch(epoch: int) -> AugmentedStream:
            stream.set_epoch(epoch)
            return stream

        model = RegularizedCNN(val[0].shape[1], info.num_classes, width=args.width, depth=args.depth,
                               dropout=args.dropout, batch_norm=not args.no_batch_norm, seed=args.seed)
        config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, l1=args.l1,
                             label_smoothing=args.label_smoothing, patience=args.patience, out_dir=out,
                             progress=not args.no_progress, seed=args.seed, device=args.device)
        (out / "spec.yaml").write_text(spec.to_yaml())
        history = fit(model, train_epoch, val, config)
    best = history.best
    summary = {"best_epoch": history.best_epoch, "best_val_acc": best["val_acc"],
               "best_val_loss": best["val_loss"], "stopped_early": history.stopped_early,
               "warnings": history.warnings, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"best epoch {history.best_epoch}: val acc {100 * best['val_acc']:.1f}% "
          f"(val loss {best['val_loss']:.4f}); outputs in {out}/", flush=True)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import DIGITS_SPEC, digits_split, run_regularization_experiment

    out = Path(args.out)
    spec = load_spec(args.spec) if args.spec_given else load_spec(DIGITS_SPEC)
    with connect(args) as client:
        info = client.dataset_info(args.dataset)
        n = info.num_samples
        if args.dataset == "digits" and n == 1797:  # the built-in set: a stratified split
            train_ids, val_ids = digits_split(args.exp_train, args.exp_val, seed=0)
        else:
            train_ids, val_ids = random_split(n, args.exp_val, 0, args.exp_train)
        val = fetch_all(client, args.dataset, identity_spec(spec), val_ids)

        def make_train_epoch(augment: bool, seed: int) -> Any:
            stream = AugmentedStream(client, args.dataset, spec if augment else identity_spec(spec),
                                     batch_size=args.exp_batch_size, seed=seed, sample_ids=train_ids)

            def train_epoch(epoch: int) -> AugmentedStream:
                stream.set_epoch(epoch)
                return stream

            return train_epoch

        note = (f"Data: {args.dataset} ({describe_shape(info)}), {len(train_ids)} training images, "
                f"{len(val_ids)} validation images, batch size {args.exp_batch_size}; training batches streamed "
                f"from augsvc (AugmentedStream) with `{spec.to_dict()}`.")
        print(note, flush=True)
        run_regularization_experiment(make_train_epoch, val, out_dir=out, seeds=tuple(args.seeds), data_note=note,
                                      depth=args.exp_depth, width=args.exp_width)
    print(f"wrote {out}/regularization.md and {out}/regularization.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="augsvc-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="augsvc target(s): host:port, a comma list, unix:/path or dns:///name:port "
                                    "(default: start an embedded local service)")
    p.add_argument("--tls-ca")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--token-file")
    p.add_argument("--workers", type=int, default=None, help="embedded service workers")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--spec", default=str(DEFAULT_SPEC), help="augmentation spec (YAML/JSON file or text)")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prefetch", type=int, help="batches kept ahead (default: as many as fit in 256 MiB, 4 to 32)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2, as decoupled weight decay")
    p.add_argument("--l1", type=float, default=1e-5)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--no-batch-norm", action="store_true")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--train-size", type=int, default=None, help="use only this many training images")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--experiment", choices=["regularization"], help="run a study instead of one training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--exp-train", type=int, default=200, help="experiment: training images")
    p.add_argument("--exp-val", type=int, default=400, help="experiment: validation images")
    p.add_argument("--exp-batch-size", type=int, default=16)
    p.add_argument("--exp-depth", type=int, default=4, help="experiment: conv blocks (same for every config)")
    p.add_argument("--exp-width", type=int, default=32, help="experiment: channels of the first block")
    args = p.parse_args(argv)
    args.spec_given = args.spec != str(DEFAULT_SPEC)
    if args.experiment == "regularization":
        return cmd_experiment(args)
    return cmd_train(args)


if __name__ == "__main__":
    sys.exit(main())
