"""`python -m benchmarks.e2e`: images/s reaching a training loop, side by side in one run, same spec
(flip + rotate + scale + color jitter), same core budget W, same batch size:

  (a) torch DataLoader(num_workers=W) + albumentations Compose  — what users run otherwise
  (b) AugmentedStream from a local augsvc with W workers         — this project
  (c) the engine itself in W local processes, nothing delivered  — the ceiling

The three are measured in alternating windows (`--rounds` each), the machine let go quiet before
each, so that a noisy neighbour slows all of them alike; a window of (a) or (b) first takes,
untimed, the batches its prefetch made ready while the others ran. Also records the resident
memory of the server process and of the client at every epoch of (b), so growth across epochs is
visible, and the cores that (b)'s server, workers and client kept busy. Needs torch, for (a)
and (b).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from augsvc.procfs import cpu_seconds, descendants, status_kb
from augsvc.samples import sample_images
from trainer_client.client import AugmentClient
from trainer_client.embedded import EmbeddedServer
from trainer_client.stream import AugmentedStream, default_prefetch

from .common import BENCH_SPEC, Window, albumentations_compose, interleaved_rates, machine, write_json
from .service import EngineProcesses


def memory_mb(pid: int | None = None) -> dict[str, float]:
    """Resident memory of a process (this one by default), from /proc: the total ("rss") and its
    anonymous and shared-memory parts (datasets and batch segments are shared memory)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}
    return {name: status_kb(pid or os.getpid(), key) / 1024 for key, name in fields.items()}


class _AlbumentationsDataset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.compose: Any = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.compose is None:  # built in the worker process
            self.compose = albumentations_compose()
        out = self.compose(image=self.images[i])["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), 0


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(0)


def _forever(epoch_batches: Any) -> Generator[Any, None, None]:
    """Batches epoch after epoch: `epoch_batches(epoch)` gives one epoch's batches."""
    for epoch in itertools.count():
        yield from epoch_batches(epoch)


def _batch_window(batches: Iterator[Any], step: Any, *, skip: int) -> Window:
    """A measurement window over a batch pipeline. Its first `skip` batches are consumed untimed:
    what a pipeline with that much prefetch made ready while the other candidates ran."""

    def window(seconds: float) -> tuple[float, float]:
        for _ in range(skip):
            step(next(batches)[0])
        n, start = 0, time.perf_counter()
        while True:
            images = next(batches)[0]
            step(images)
            n += len(images)
            if (elapsed := time.perf_counter() - start) >= seconds:
                return n, elapsed

    return window


def _train_step_factory(enabled: bool) -> Any:
    if not enabled:
        return lambda images: None
    from trainer_client.model import RegularizedCNN

    model = RegularizedCNN(3, 10, width=16, depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(images: torch.Tensor) -> None:
        loss = model(images).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def default_count(side: int, batch: int) -> int:
    """Images in the benchmark's dataset: CIFAR-sized (50,000) at small sides, where an epoch of
    a few batches would mostly measure the pipeline draining at each epoch's end (for every
    candidate); 2,048 (300 MB) at large sides."""
    return max(4 * batch, 50_000 if side <= 64 else 2048)


def run_side(side: int, *, workers: int, batch: int, seconds: float, train_step: bool,
             count: int | None = None, rounds: int = 3, prefetch: int | None = None) -> dict[str, Any]:
    count = count or default_count(side, batch)
    images = sample_images(count, side)
    # prefetch: batches ready ahead of the loop, for (a) (workers x prefetch_factor) and (b); by default
    # the stream's own default for this batch size (`default_prefetch`), and the same for (a)
    prefetch = prefetch or default_prefetch(batch * side * side * 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.npz")
        np.savez(path, images=images, labels=np.zeros(count, np.int64))
        step = _train_step_factory(train_step)
        # (a) DataLoader + albumentations
        loader = DataLoader(_AlbumentationsDataset(images), batch_size=batch, shuffle=True, num_workers=workers,
                            worker_init_fn=_worker_init, persistent_workers=True,
                            prefetch_factor=max(1, prefetch // workers))
        # (b) AugmentedStream from a local augsvc (unix socket, W workers)
        extra = ["--max-batch-mb", str(max(64, batch * side * side * 3 * 2 >> 20))]
        with EmbeddedServer(datasets={"bench": path}, workers=workers, extra_args=extra) as server, \
                AugmentClient(server.target) as client, EngineProcesses(path, workers, batch) as engine:
            stream = AugmentedStream(client, "bench", BENCH_SPEC, batch_size=batch, seed=0, prefetch=prefetch)
            memory: list[dict[str, float]] = []

            def record(epoch: int) -> None:
                mem = memory_mb(server.pid)
                memory.append({"epoch": epoch, "server_mb": mem["rss"], "server_anon_mb": mem["anon"],
                               "server_shmem_mb": mem["shmem"], "client_mb": memory_mb()["rss"]})

            def stream_epoch(epoch: int) -> AugmentedStream:
                record(epoch)
                stream.set_epoch(epoch)
                return stream

            loader_batches, stream_batches = _forever(lambda _: loader), _forever(stream_epoch)
            # Where (b)'s CPU goes: the server process, its children (the workers), this client.
            processes = {"server": [server.pid], "workers": sorted(descendants(server.pid)), "client": [os.getpid()]}
            busy = dict.fromkeys(processes, 0.0)
            wall = [0.0]
            augsvc_window = _batch_window(stream_batches, step, skip=prefetch)

            def augsvc_measured(seconds: float) -> tuple[float, float]:
                before, start = {k: cpu_seconds(v) for k, v in processes.items()}, time.perf_counter()
                result = augsvc_window(seconds)
                wall[0] += time.perf_counter() - start
                for k, v in processes.items():
                    busy[k] += cpu_seconds(v) - before[k]
                return result

            windows: dict[str, Window] = {
                "dataloader": _batch_window(loader_batches, step, skip=prefetch),
                "augsvc": augsvc_window,
                "engine": engine.window,  # (c) the engine in W processes
            }
            for window in windows.values():
                window(min(2.0, seconds / rounds))  # warm-up: workers started, caches filled
            windows["augsvc"] = augsvc_measured  # after the warm-up
            rates = interleaved_rates(windows, seconds=seconds, rounds=rounds, settle=True)
            stream_batches.close()  # ends the pass: its fetch threads stop
            loader_batches.close()  # the DataLoader's workers exit
            record(len(memory))
            received = dict(stream.received)  # how the batches came: shared memory or inline
    service, dataloader, ceiling = rates["augsvc"], rates["dataloader"], rates["engine"]
    return {"side": side, "batch": batch, "workers": workers, "train_step": train_step, "images": count,
            "rounds": rounds, "prefetch": prefetch, "dataloader": dataloader, "augsvc": service, "engine": ceiling,
            "augsvc_vs_dataloader": service / dataloader, "augsvc_vs_engine": service / ceiling,
            "epochs": len(memory) - 1, "received": received, "memory": memory,
            "augsvc_cores": {k: v / wall[0] for k, v in busy.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per candidate and side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per candidate")
    parser.add_argument("--prefetch", type=int, help="batches ready ahead of the loop, for (a) and (b) "
                        "(default: the stream's default for the batch size)")
    parser.add_argument("--images", type=int, help="dataset size (default: 50,000 at sides <= 64, else 2,048)")
    parser.add_argument("--train-step", action="store_true", help="a small CNN step on every batch")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [run_side(s, workers=args.workers, batch=args.batch, seconds=args.seconds,
                     train_step=args.train_step, count=args.images, rounds=args.rounds,
                     prefetch=args.prefetch) for s in args.sides]
    print(f"end to end, images/s into the training loop, W={args.workers}, batch {args.batch} ({machine()})")
    print(f"{'side':>5} {'(a) DataLoader':>15} {'(b) augsvc':>11} {'(c) engine':>11} {'b/a':>6} {'b/c':>6} "
          f"{'server MB first->last':>22} {'client MB first->last':>22}")
    for r in rows:
        m = r["memory"]
        print(f"{r['side']:>5} {r['dataloader']:>15.0f} {r['augsvc']:>11.0f} {r['engine']:>11.0f} "
              f"{r['augsvc_vs_dataloader']:>6.2f} {r['augsvc_vs_engine']:>6.2f} "
              f"{m[0]['server_mb']:>10.0f} -> {m[-1]['server_mb']:<9.0f} "
              f"{m[0]['client_mb']:>10.0f} -> {m[-1]['client_mb']:<9.0f}")
    for r in rows:
        cores = ", ".join(f"{k} {v:.2f}" for k, v in r["augsvc_cores"].items())
        print(f"  {r['side']}x{r['side']}: cores busy during (b): {cores}")
    write_json(args.json, {"benchmark": "e2e", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
