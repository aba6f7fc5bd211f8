"""`python -m benchmarks.jpeg`: a folder of JPEGs into a training loop, side by side in one run.

The benchmark makes its own folder: `--images` JPEGs (quality 90) of 256-512 px a side, crops and
rescales of scikit-learn's two sample photos, in two class sub-folders. Same semantics on every
side: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3), horizontal flip, color jitter
(0.2, 0.2, 0.2, 0.05, p 0.8); batch `--batch`, `--workers` W:

  (a) torch DataLoader(num_workers=W): Pillow decode + albumentations Compose   — the usual way
  (b) AugmentedStream from a local augsvc with W workers, once per layout (decoded, encoded,
      files), at full-size decode and with a declared decode size (`--decode-size`)
  (c) with `--dali-python PY`: NVIDIA DALI's CPU pipeline with W threads (ROI decode of the random
      crop), run by PY, the Python of a venv that has DALI (`benchmarks/jpeg_dali.py`)

Candidates run in alternating windows (`--rounds` each), the machine let go quiet before each,
so that a noisy neighbour slows all of them alike. Before that, on one core: what each decoder
costs per image on these files, and what share of a worker's time per image is the decode
(decode vs the engine's augmentation of the decoded image, measured interleaved). Needs torch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from augsvc.datasets import JPEG_DECODER, LAYOUTS, DecodeSize

from .common import Window, compare_rates, interleaved_rates, machine, write_json

#: RandomResizedCrop 224 + flip + color jitter, as augsvc spells it.
TRAIN_SPEC: dict[str, Any] = {"transforms": [
    {"random_resized_crop": {"height": 224, "width": 224}},
    {"hflip": {"p": 0.5}},
    {"color": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 0.8}},
]}


def make_jpeg_folder(root: Path, count: int, *, seed: int = 0, sides: tuple[int, int] = (256, 512),
                     quality: int = 90) -> list[Path]:
    """`count` JPEGs in root/c0 and root/c1: crops of the sample photos at random places, rescaled
    to random sides in `sides` (inclusive). Returns the paths, in the order made."""
    import cv2
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % 2]
        h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        crop_h = int(min(photo.shape[0], photo.shape[1] * h / w) * rng.uniform(0.5, 1.0))
        crop_w = int(crop_h * w / h)
        y = int(rng.integers(0, photo.shape[0] - crop_h + 1))
        x = int(rng.integers(0, photo.shape[1] - crop_w + 1))
        img = cv2.resize(photo[y:y + crop_h, x:x + crop_w], (w, h), interpolation=cv2.INTER_AREA)
        path = root / f"c{i % 2}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=quality)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# one core: decoders, and the decode's share of a worker's time
# ---------------------------------------------------------------------------------------------

def decoder_costs(paths: list[Path], *, seconds: float, size: DecodeSize | None) -> dict[str, float]:
    """Milliseconds per image of each way to decode these files to RGB, on one core."""
    import cv2
    import simplejpeg
    from PIL import Image

    cv2.setNumThreads(0)
    blobs = [p.read_bytes() for p in paths[:200]]
    state = {"i": 0}

    def one(decode: Any) -> Any:
        def run() -> int:
            decode(blobs[state["i"] % len(blobs)])
            state["i"] += 1
            return 1
        return run

    def pillow_draft2(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))
            return np.asarray(im.convert("RGB"))

    fns = {
        "pillow": one(lambda b: pillow_rgb(io.BytesIO(b))),
        "pillow_draft_1/2": one(pillow_draft2),
        "cv2.imdecode": one(lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB)),
        "cv2.imdecode_1/2": one(lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)),
        "simplejpeg": one(lambda b: simplejpeg.decode_jpeg(b, "RGB")),
        "simplejpeg_1/2": one(lambda b: simplejpeg.decode_jpeg(b, "RGB", min_factor=2, min_height=1, min_width=1)),
        "simplejpeg_fastdct": one(lambda b: simplejpeg.decode_jpeg(b, "RGB", fastdct=True, fastupsample=True)),
    }
    rates = compare_rates(fns, seconds=seconds, rounds=5)
    return {name: 1e3 / rate for name, rate in rates.items()}


def folder_facts(paths: list[Path], size: DecodeSize | None, *, sample: int = 200) -> dict[str, Any]:
    """What the README says of these files: their decoded size (the decoded layout's memory), how
    many decode at 1/2 or less at the declared size, whether the decoders give Pillow's bytes
    (on `sample` files), what fast DCT changes, and what reading a header costs."""
    import time

    import cv2
    import simplejpeg
    from PIL import Image

    from augsvc.datasets.decode import dct_scale, probe

    headers = [probe(p.read_bytes()) for p in paths]
    decoded_mb = sum(h.height * h.width * 3 for h in headers) / 1e6
    scaled_down = sum(dct_scale(h.height, h.width, size) > 1 for h in headers) if size else 0
    blobs = [p.read_bytes() for p in paths[:sample]]
    same_simplejpeg = same_cv2 = 0
    fast_diff, fast_changed = [], []
    for b in blobs:
        want = pillow_rgb(io.BytesIO(b))
        same_simplejpeg += int(np.array_equal(simplejpeg.decode_jpeg(b, "RGB"), want))
        by_cv2 = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB)
        same_cv2 += int(by_cv2 is not None and np.array_equal(by_cv2, want))
        fast = simplejpeg.decode_jpeg(b, "RGB", fastdct=True, fastupsample=True).astype(np.int16)
        diff = np.abs(fast - want)
        fast_diff.append(float(diff.mean()))
        fast_changed.append(float((diff > 0).mean()))

    def per_header_us(read: Any) -> float:
        start = time.perf_counter()
        for b in blobs:
            read(b)
        return 1e6 * (time.perf_counter() - start) / len(blobs)

    def pillow_header(b: bytes) -> Any:
        with Image.open(io.BytesIO(b)) as im:
            return im.size

    return {"decoded_mb": decoded_mb, "scaled_down_at_size": scaled_down, "sample": len(blobs),
            "same_as_pillow": {"simplejpeg": same_simplejpeg, "cv2.imdecode": same_cv2},
            "fastdct_mean_levels": float(np.mean(fast_diff)), "fastdct_changed_share": float(np.mean(fast_changed)),
            "header_us": {"simplejpeg": per_header_us(simplejpeg.decode_jpeg_header),
                          "pillow": per_header_us(pillow_header)}}


def albumentations_compose() -> Any:
    """(a)'s pipeline: TRAIN_SPEC the usual albumentations way."""
    from augsvc._albumentations import albumentations as A

    return A.Compose([
        A.RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.8),
    ])


def pillow_rgb(path: str | io.BytesIO) -> np.ndarray:
    """(a)'s decode: Pillow, converted to RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def worker_share(folder: Path, *, seconds: float, batch: int, size: DecodeSize | None) -> dict[str, float]:
    """Milliseconds per image on one core, measured interleaved: a worker's job (`worker`: a
    batch of the folder's files read by a worker's dataset reader of the encoded layout, at the
    declared size if any, as a worker does (`DatasetReader.gather_deferred` and
    `augment_batch(read=)`) — each random crop's region of the JPEG, RGBX into the reader's
    reused buffer, decoded just before its warp — and augmented with TRAIN_SPEC by the fused
    engine), its two parts apart (`decode`; `decode_whole`:
    whole images; `augment` of decoded images), and what (a) does per image (Pillow decode and the
    albumentations Compose)."""
    import cv2

    from augsvc.datasets import attach, load_dataset
    from augsvc.engine import augment_batch, source_boxes

    cv2.setNumThreads(0)
    batches = [np.arange(k * batch, (k + 1) * batch) for k in range(4)]
    out = np.empty((batch, 224, 224, 3), np.uint8)
    compose = albumentations_compose()
    state = {"k": 0}
    with load_dataset("bench", str(folder), layout="encoded", decode_size=size) as ds:
        readers = [attach(ds.handle()) for _ in range(5)]  # 4 holding a batch each, 1 that decodes
        images: list[Any] = []  # views of the readers' buffers: dropped before the readers close
        try:
            images.extend(readers[k].gather(ids, copy=False) for k, ids in enumerate(batches))
            blobs = [Path(readers[4].path(int(i))).read_bytes() for ids in batches for i in ids]

            def worker_job() -> int:  # a worker's job: each image decoded (its crop's region) just before its warp
                ids = batches[state["k"] % 4]
                images, read = readers[4].gather_deferred(ids)
                augment_batch(images, TRAIN_SPEC, seed=0, epoch=state["k"], sample_ids=ids, out=out, read=read)
                state["k"] += 1
                return batch

            def decode_batch() -> int:  # the decoding alone: the random crops' regions (`decode_region`)
                ids = batches[state["k"] % 4]
                images, read = readers[4].gather_deferred(ids)
                boxes = source_boxes(TRAIN_SPEC, seed=0, epoch=state["k"], sample_ids=ids,
                                     heights=np.array([im.shape[0] for im in images]),
                                     widths=np.array([im.shape[1] for im in images]))
                assert read is not None and boxes is not None  # the encoded layout decodes; the spec crops first
                for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                    read(k, (x0, y0, x1, y1))
                state["k"] += 1
                return batch

            def decode_whole() -> int:
                readers[4].gather(batches[state["k"] % 4], copy=False)
                state["k"] += 1
                return batch

            def augment() -> int:
                k = state["k"] % 4
                augment_batch(images[k], TRAIN_SPEC, seed=0, epoch=state["k"], sample_ids=batches[k], out=out)
                state["k"] += 1
                return batch

            def dataloader_items() -> int:
                k = state["k"] % 4
                for b in blobs[k * batch:(k + 1) * batch]:
                    compose(image=pillow_rgb(io.BytesIO(b)))
                state["k"] += 1
                return batch

            rates = compare_rates({"worker": worker_job, "decode": decode_batch, "decode_whole": decode_whole,
                                   "augment": augment, "dataloader_item": dataloader_items},
                                  seconds=seconds, rounds=5)
        finally:
            images.clear()
            for reader in readers:
                reader.close()
    ms = {name: 1e3 / rate for name, rate in rates.items()}
    return {**ms, "decode_share": ms["decode"] / (ms["decode"] + ms["augment"]),
            "one_core_ratio": ms["dataloader_item"] / ms["worker"]}


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------

def _dataloader(paths: list[Path], *, workers: int, batch: int, prefetch: int) -> Any:
    """(a): a map-style dataset that reads each file with Pillow and applies albumentations."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Files(Dataset[tuple[torch.Tensor, int]]):
        def __init__(self) -> None:
            self.paths = [str(p) for p in paths]
            self.compose: Any = None

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            if self.compose is None:  # built in the worker process
                self.compose = albumentations_compose()
            out = self.compose(image=pillow_rgb(self.paths[i]))["image"]
            return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), i % 2

    from .e2e import _worker_init

    return DataLoader(Files(), batch_size=batch, shuffle=True, num_workers=workers, worker_init_fn=_worker_init,
                      persistent_workers=True, prefetch_factor=max(1, prefetch // workers))


@contextlib.contextmanager
def _dali_window(python: str, folder: Path, *, batch: int, threads: int) -> Iterator[Window]:
    """(c): a window over DALI's CPU pipeline, which runs in a process of `python` (another venv)."""
    script = Path(__file__).with_name("jpeg_dali.py")
    proc = subprocess.Popen([python, str(script), "--folder", str(folder), "--batch", str(batch),
                             "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    try:
        if stdout.readline().strip() != "ready":
            raise RuntimeError(f"the DALI pipeline did not start under {python} (exit status {proc.wait(60)})")

        def window(seconds: float) -> tuple[float, float]:
            stdin.write(f"run {seconds} 2\n")  # 2: DALI's default prefetch queue depth
            stdin.flush()
            n, elapsed = stdout.readline().split()
            return float(n), float(elapsed)

        yield window
    finally:
        with contextlib.suppress(OSError):
            stdin.write("\n")
            stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def end_to_end(folder: Path, paths: list[Path], *, workers: int, batch: int, seconds: float, rounds: int,
               size: DecodeSize | None, layouts: tuple[str, ...], dali_python: str | None = None) -> dict[str, Any]:
    """Images/s into the loop of (a), of (b) per layout, full-size and at the declared size, and of
    (c) when `dali_python` is given."""
    import torch

    from trainer_client.client import AugmentClient
    from trainer_client.embedded import EmbeddedServer
    from trainer_client.stream import AugmentedStream

    from .e2e import _batch_window, _forever

    prefetch = 6
    datasets, extra = {}, ["--max-batch-mb", "64", "--cache-budget-mb", str(8 << 10)]
    for layout in layouts:
        for sized in ([False, True] if size is not None else [False]):
            name = f"{layout}_{'sized' if sized else 'full'}"
            datasets[name] = str(folder)
            extra += ["--layout", f"{name}={layout}"] + (["--decode-size", f"{name}={size}"] if sized else [])
    torch.set_num_threads(1)
    loader = _dataloader(paths, workers=workers, batch=batch, prefetch=prefetch)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(EmbeddedServer(datasets=datasets, workers=workers, extra_args=extra,
                                                    start_timeout=600))
        client = stack.enter_context(AugmentClient(server.target))
        load_s = time.perf_counter() - started
        infos = {d.name: d for d in client.list_datasets()}
        windows: dict[str, Window] = {"dataloader": _batch_window(_forever(lambda _: loader), lambda _: None,
                                                                  skip=prefetch)}
        gens: list[Any] = []
        for name in datasets:
            stream = AugmentedStream(client, name, TRAIN_SPEC, batch_size=batch, seed=0, prefetch=prefetch)

            def epoch_of(epoch: int, stream: AugmentedStream = stream) -> AugmentedStream:
                stream.set_epoch(epoch)
                return stream

            gens.append(_forever(epoch_of))
            windows[name] = _batch_window(gens[-1], lambda _: None, skip=prefetch)
        if dali_python:
            windows["dali"] = stack.enter_context(_dali_window(dali_python, folder, batch=batch, threads=workers))
        for window in windows.values():
            window(min(2.0, seconds / rounds))  # warm-up: workers started, page cache filled
        rates = interleaved_rates(windows, seconds=seconds, rounds=rounds, settle=True)
        for gen in gens:
            gen.close()
        layout_of = {name: infos[name].layout for name in datasets}
    return {"rates": rates, "vs_dataloader": {k: v / rates["dataloader"] for k, v in rates.items()},
            "layouts": layout_of, "server_start_s": load_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jpeg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per candidate")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per candidate")
    parser.add_argument("--decode-size", default="shorter:224", help="the declared size of the sized rows "
                        "('none' for full-size rows only)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--skip-one-core", action="store_true", help="only the end-to-end comparison")
    parser.add_argument("--folder", help="use (or make) the JPEG folder here instead of a temporary one")
    parser.add_argument("--facts-only", action="store_true", help="the folder's facts (sizes, decoders' bytes), "
                        "no timing windows")
    parser.add_argument("--dali-python", help="(c): the Python of a venv with NVIDIA DALI "
                        "(pip install nvidia-dali-cuda120), which runs DALI's CPU pipeline beside the others")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    size = None if args.decode_size == "none" else DecodeSize.parse(args.decode_size)
    with tempfile.TemporaryDirectory(prefix="augsvc-jpeg-") as tmp:
        folder = Path(args.folder or tmp)
        paths = sorted(folder.glob("c*/*.jpg"))
        if len(paths) != args.images:
            paths = make_jpeg_folder(folder, args.images)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} JPEGs, {mb:.0f} MB, 256-512 px a side ({machine()}; {JPEG_DECODER})")
        result: dict[str, Any] = {"images": len(paths), "encoded_mb": mb, "workers": args.workers,
                                  "batch": args.batch, "decode_size": str(size), "decoder": JPEG_DECODER}
        facts = result["facts"] = folder_facts(paths, size)
        print(f"decoded: {facts['decoded_mb']:.0f} MB; at decode size {size}: {facts['scaled_down_at_size']} of "
              f"{len(paths)} files decode at 1/2 or less; on {facts['sample']} files, the same bytes as Pillow: "
              f"simplejpeg {facts['same_as_pillow']['simplejpeg']}, cv2.imdecode "
              f"{facts['same_as_pillow']['cv2.imdecode']}; fast DCT + upsampling: mean "
              f"{facts['fastdct_mean_levels']:.2f} levels, {100 * facts['fastdct_changed_share']:.0f}% of values "
              f"changed; a header read: simplejpeg {facts['header_us']['simplejpeg']:.1f} us, Pillow "
              f"{facts['header_us']['pillow']:.1f} us")
        if args.facts_only:
            write_json(args.json, {"benchmark": "jpeg", **result})
            return 0
        if not args.skip_one_core:
            result["decoders_ms"] = decoder_costs(paths, seconds=args.seconds / 2, size=size)
            print("one core, ms per image: " + ", ".join(f"{k} {v:.3f}" for k, v in result["decoders_ms"].items()))
            for label, s in [("full size", None), (f"decode size {size}", size)] if size else [("full size", None)]:
                share = worker_share(folder, seconds=args.seconds / 2, batch=args.batch, size=s)
                result[f"worker_{'sized' if s else 'full'}"] = share
                print(f"one core, ms per image at {label}: augsvc worker {share['worker']:.3f} = decode "
                      f"{share['decode']:.3f} (whole images {share['decode_whole']:.3f}) + augment "
                      f"{share['augment']:.3f} (decode share {100 * share['decode_share']:.0f}%) measured apart, "
                      f"less the cache's saving together; (a) Pillow + albumentations "
                      f"{share['dataloader_item']:.3f}: (a) / worker {share['one_core_ratio']:.2f}x")
        e2e = end_to_end(folder, paths, workers=args.workers, batch=args.batch, seconds=args.seconds,
                         rounds=args.rounds, size=size, layouts=tuple(args.layouts), dali_python=args.dali_python)
        result.update(e2e)
    print(f"end to end, images/s into the loop, W={args.workers}, batch {args.batch} "
          f"(augsvc server ready in {e2e['server_start_s']:.1f}s)")
    for name, rate in e2e["rates"].items():
        if name in ("dataloader", "dali"):
            what = ("(a) DataLoader + Pillow + albumentations" if name == "dataloader" else
                    f"(c) NVIDIA DALI, CPU pipeline, {args.workers} threads")
        else:
            what = f"(b) augsvc, layout {e2e['layouts'][name]}, " + ("full-size decode" if name.endswith("full")
                                                                     else f"decode size {size}")
        print(f"  {what:<60} {rate:>7.0f}  {e2e['vs_dataloader'][name]:.2f}x")
    write_json(args.json, {"benchmark": "jpeg", **result})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())
