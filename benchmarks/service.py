"""`python -m benchmarks.service`: images/s that one client receives from a 2-worker server (StreamBatches
over a served dataset) against images/s of the engine itself in 2 local processes — same spec,
same images, same batch size, same run. The ratio is the service's overhead: transport, the
hand-off to workers, and the client's decoding. Two ways to receive: pixels in the gRPC stream
(any client, any host), and the shared-memory path a client on the server's host gets (the
workers write into segments the client offers; the stream carries labels, ids and shapes). The
three are measured in alternating windows, the machine let go quiet before each."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from augsvc.samples import sample_images
from augsvc.shm import client_pixels, create_client_segment, release_segment
from augsvc.spec import load_spec
from augsvc.v1 import augment_pb2 as pb
from augsvc.wire import parse_reply

from .common import BENCH_SPEC, Window, interleaved_rates, machine, write_json


def _engine_loop(path: str, batch: int, conn: Any) -> None:
    """One engine process: on each number of seconds received, augment batches flat out for that
    long and answer (images, elapsed); None ends it."""
    import cv2

    from augsvc.engine import augment_batch

    cv2.setNumThreads(0)
    images = np.load(path)["images"]
    spec = load_spec(BENCH_SPEC)
    epoch = 0
    while (seconds := conn.recv()) is not None:
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            ids = np.arange(epoch * batch, (epoch + 1) * batch) % len(images)
            augment_batch(images[ids], spec, seed=0, epoch=epoch, sample_ids=ids)
            n += batch
            epoch += 1
        conn.send((n, elapsed))


class EngineProcesses:
    """`processes` local processes that run the engine flat out on request: the ceiling that the
    service is compared with. `window(seconds)` is a `benchmarks.common.Window`."""

    def __init__(self, path: str, processes: int, batch: int) -> None:
        ctx = mp.get_context("spawn")
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        for _ in range(processes):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_engine_loop, args=(path, batch, theirs), daemon=True)
            proc.start()
            self._conns.append(ours)
            self._procs.append(proc)
        self.window(0.2)  # warm-up: imports, the first batches

    def window(self, seconds: float) -> tuple[float, float]:
        """The images/s of all processes together, as (images, seconds) of one window."""
        for conn in self._conns:
            conn.send(seconds)
        results = []
        for conn in self._conns:
            if not conn.poll(seconds + 120):
                raise TimeoutError("an engine process did not answer")
            results.append(conn.recv())
        elapsed = sum(t for _, t in results) / len(results)
        return sum(n / t for n, t in results) * elapsed, elapsed

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs, strict=True):
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> EngineProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServiceReader:
    """One client receiving StreamBatches, epoch after epoch, as numpy arrays (views of the received
    messages, or of this client's segments with `shared_memory`). `window(seconds)` is a
    `benchmarks.common.Window`; the channel and the segments live as long as the reader."""

    def __init__(self, target: str, batch: int, num_samples: int, *, shared_memory: bool = False,
                 batch_bytes: int = 0) -> None:
        options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.http2.lookahead_bytes", 8 << 20)]
        self._batch = batch
        # One segment per batch of an epoch, reused epoch after epoch: a finished call wrote them all.
        self._segments = [create_client_segment(batch_bytes) for _ in range(num_samples // batch if shared_memory
                                                                             else 0)]
        self._by_name = {shm.name: shm for shm, _ in self._segments}
        self._offered = [pb.ShmSegment(name=shm.name, token=token) for shm, token in self._segments]
        self._channel = grpc.insecure_channel(target, options=options)
        # The client library's path: replies parsed without copying the pixels (augsvc.wire).
        self._stream = self._channel.unary_stream("/augsvc.v1.Augmenter/StreamBatches",
                                                  request_serializer=pb.StreamBatchesRequest.SerializeToString,
                                                  response_deserializer=parse_reply)
        self._spec = load_spec(BENCH_SPEC).to_proto()
        self._epoch = 0

    def window(self, seconds: float) -> tuple[float, float]:
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            request = pb.StreamBatchesRequest(dataset="bench", spec=self._spec, seed=0, epoch=self._epoch,
                                              batch_size=self._batch, drop_last=True, shm_segments=self._offered)
            for msg, images in self._stream(request):
                if images is None:
                    images = client_pixels(self._by_name[msg.shm_segment], tuple(msg.images.shape))
                n += len(images)
                del images
            self._epoch += 1
        return n, elapsed

    def close(self) -> None:
        self._channel.close()
        for shm, _ in self._segments:
            release_segment(shm, unlink=True)


def run(sides: list[int], *, workers: int, seconds: float, batches: dict[int, int],
        rounds: int = 4) -> list[dict[str, Any]]:
    from augsvc.server import ServerSettings, create_server

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            batch = batches.get(side, 64)
            count = max(8 * batch, 512)
            path = str(Path(tmp) / f"bench{side}.npz")
            np.savez(path, images=sample_images(count, side), labels=np.zeros(count, np.int64))
            settings = ServerSettings(workers=workers, datasets={"bench": path},
                                      max_batch_bytes=max(64 << 20, batch * side * side * 3 * 2))
            server, port = create_server("127.0.0.1:0", settings)
            server.start()
            reader = partial(ServiceReader, f"127.0.0.1:{port}", batch, count, batch_bytes=batch * side * side * 3)
            with contextlib.ExitStack() as stack:
                stack.callback(server.stop, 0)
                engine = stack.enter_context(EngineProcesses(path, workers, batch))
                inline, shm = reader(), reader(shared_memory=True)
                stack.callback(inline.close)
                stack.callback(shm.close)
                windows: dict[str, Window] = {"engine": engine.window, "service": inline.window,
                                              "service_shm": shm.window}
                for window in windows.values():
                    window(min(2.0, seconds / rounds))  # warm-up
                rates = interleaved_rates(windows, seconds=seconds, rounds=rounds, settle=True)
            local, remote, remote_shm = rates["engine"], rates["service"], rates["service_shm"]
            rows.append({"side": side, "batch": batch, "workers": workers, "rounds": rounds, "service": remote,
                         "service_shm": remote_shm, "engine_local": local, "ratio": remote / local,
                         "ratio_shm": remote_shm / local})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per candidate and side")
    parser.add_argument("--batch-32", type=int, default=512, help="batch size at 32x32")
    parser.add_argument("--batch-224", type=int, default=64, help="batch size at 224x224")
    parser.add_argument("--rounds", type=int, default=4, help="alternating windows per candidate")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = run(args.sides, workers=args.workers, seconds=args.seconds,
               batches={32: args.batch_32, 224: args.batch_224}, rounds=args.rounds)
    print(f"service vs engine, {args.workers} workers vs {args.workers} local engine processes ({machine()})")
    print(f"{'side':>5} {'batch':>6} {'engine img/s':>13} {'service (gRPC bytes)':>21} {'ratio':>6} "
          f"{'service (shared memory)':>24} {'ratio':>6}")
    for r in rows:
        print(f"{r['side']:>5} {r['batch']:>6} {r['engine_local']:>13.0f} {r['service']:>21.0f} {r['ratio']:>6.2f} "
              f"{r['service_shm']:>24.0f} {r['ratio_shm']:>6.2f}")
    write_json(args.json, {"benchmark": "service", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
