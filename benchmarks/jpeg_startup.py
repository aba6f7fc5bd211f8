"""`python -m benchmarks.jpeg_startup`: how fast, and in how much memory, `augsvc serve` starts on
a large image folder.

Makes a folder of `--files` JPEGs in `--classes` class sub-folders as hard links to a few real
ones (crops of the sample photos, 256-512 px: too many for the default cache budget, so the
folder is served as files), starts `augsvc serve --dataset big=FOLDER`, and reports the seconds
until its ready line, the dataset's layout and shared-memory segment (the path table), and the
server's peak resident memory beside that of the same server started without the dataset. The
page cache is warm (the links were just made): a cold disk adds its reads of the headers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from augsvc.launcher import ServeProcess
from augsvc.procfs import status_kb
from augsvc.shm import segments_of

from .common import machine, write_json
from .jpeg import make_jpeg_folder


def make_linked_folder(root: Path, files: int, classes: int, sources: list[Path]) -> None:
    """`files` hard links to `sources`, spread over `classes` sub-folders of `root`."""
    for c in range(classes):
        (root / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        os.link(sources[i % len(sources)], root / f"class{i % classes:04d}" / f"img{i:07d}.jpg")


def start(args: list[str], timeout: float) -> tuple[ServeProcess, float]:
    started = time.perf_counter()
    server = ServeProcess(args, env={**os.environ, "AUGSVC_LOG_LEVEL": "INFO"})
    server.wait_ready(timeout)
    return server, time.perf_counter() - started


def measure(folder: Path | None, tmp: Path, timeout: float) -> dict[str, Any]:
    """Start a server (on `folder`, or with no dataset), and read its figures once ready."""
    args = ["--unix", str(tmp / f"s{time.monotonic_ns()}.sock"), "--workers", "2"]
    if folder is not None:
        args += ["--dataset", f"big={folder}"]
    server, seconds = start(args, timeout)
    try:
        segments = {n: os.stat(f"/dev/shm/{n}").st_size for n in segments_of(server.pid) if n.endswith("_ds")}
        layout = next((line.split("layout ")[1].split(" ")[0] for line in server.log_tail if "layout " in line), None)
        return {"ready_s": seconds, "peak_rss_mb": status_kb(server.pid, "VmHWM") / 1024,
                "rss_mb": status_kb(server.pid, "VmRSS") / 1024, "shmem_mb": status_kb(server.pid, "RssShmem") / 1024,
                "dataset_segment_mb": sum(segments.values()) / 1e6, "layout": layout}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=8, help="distinct JPEGs the links point to")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="augsvc-startup-") as tmp_name:
        tmp = Path(tmp_name)
        sources = make_jpeg_folder(tmp / "sources", args.sources)
        t = time.perf_counter()
        make_linked_folder(tmp / "big", args.files, args.classes, sources)
        print(f"{args.files} files in {args.classes} folders (hard links to {args.sources} JPEGs) made in "
              f"{time.perf_counter() - t:.1f}s ({machine()})")
        bare = measure(None, tmp, args.timeout)
        big = measure(tmp / "big", tmp, args.timeout)
    beyond = big["peak_rss_mb"] - bare["peak_rss_mb"] - big["dataset_segment_mb"] * 1e6 / (1 << 20)
    print(f"augsvc serve without a dataset: ready in {bare['ready_s']:.1f}s, peak RSS {bare['peak_rss_mb']:.0f} MB")
    print(f"augsvc serve --dataset big=<{args.files} files>: ready in {big['ready_s']:.1f}s, layout {big['layout']}, "
          f"path table {big['dataset_segment_mb']:.1f} MB in shared memory, peak RSS {big['peak_rss_mb']:.0f} MB "
          f"(now {big['rss_mb']:.0f} MB, of which shared {big['shmem_mb']:.0f} MB)")
    print(f"memory beyond the path table: {beyond:.0f} MB (peak RSS minus the bare server's, minus the table)")
    write_json(args.json, {"benchmark": "jpeg_startup", "files": args.files, "classes": args.classes,
                           "bare": bare, "dataset": big, "beyond_path_table_mb": beyond})
    return 0


if __name__ == "__main__":
    sys.exit(main())
