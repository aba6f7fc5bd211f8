"""`augsvc serve | preview | health | bench`.

`serve` prints one JSON line on stdout once it accepts calls (`augsvc.launcher.ReadyLine`); its
logs go to stderr.

Every `serve` flag also reads an environment variable (AUGSVC_<FLAG>, e.g. AUGSVC_PORT,
AUGSVC_WORKERS; the repeatable flags AUGSVC_DATASETS="a=builtin:digits,b=/data/b.npz",
AUGSVC_DECODE_SIZES, AUGSVC_LAYOUTS; --no-shared-memory is AUGSVC_SHARED_MEMORY=0; booleans take
1/true/yes/on or 0/false/no/off), so containers are configured either way; flags win (a repeatable
flag replaces its variable's list). A bad value is a usage error of `serve` (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .procfs import start_time


def _env(name: str, default: Any = None) -> Any:
    """AUGSVC_<NAME>, or `default` where it is unset or empty (compose files often set VAR= to mean
    nothing). A flag's type converts it as it converts the flag's own value, so a bad value is a
    usage error of `serve` alone (exit 2), and a flag given on the command line wins."""
    value = os.environ.get(f"AUGSVC_{name.upper()}")
    return default if value in (None, "") else value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_bool(name: str, default: bool) -> bool:
    """AUGSVC_<NAME> as a boolean (1/true/yes/on or 0/false/no/off, any case); ValueError otherwise."""
    value = _env(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"AUGSVC_{name.upper()}={value!r} is not a boolean; expected one of {', '.join(_TRUE + _FALSE)}")


def _env_list(name: str) -> list[str]:
    return [item for item in (_env(name, "") or "").split(",") if item]


def _bounded(kind: type, low: float | None = None, high: float | None = None, what: str = "") -> Any:
    """An argparse type: `kind` within [low, high]."""
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} is outside {bounds}{what}")
        return value

    return convert


_PORT = _bounded(int, 0, 65535, " (0: any free port)")
_POSITIVE = _bounded(int, 1)
_NONNEGATIVE = _bounded(float, 0)


def _named(flag: str, args: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` flags as a dict; a name given twice is refused."""
    out: dict[str, str] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{flag} {arg!r}: expected NAME=VALUE")
        if name.strip() in out:
            raise ValueError(f"{flag}: {name.strip()!r} is given twice ({out[name.strip()]!r}, {value.strip()!r})")
        out[name.strip()] = value.strip()
    return out


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the augmentation service", description=(
        "Every flag also reads AUGSVC_<FLAG> (AUGSVC_PORT, AUGSVC_TOKEN_FILE, ...; the repeatable ones "
        "AUGSVC_DATASETS, AUGSVC_DECODE_SIZES and AUGSVC_LAYOUTS, comma-separated; --no-shared-memory is "
        "AUGSVC_SHARED_MEMORY=0); a flag on the command line wins over its variable."))
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_PORT, default=_env("port", 50051))
    p.add_argument("--unix", default=_env("unix"), help="serve on this unix socket path instead")
    p.add_argument("--workers", type=_POSITIVE, default=_env("workers"),
                   help="worker processes (default: the CPU quota this container may use)")
    p.add_argument("--dataset", action="append", metavar="NAME=SOURCE",
                   help="serve a dataset: an image folder (one sub-folder per class), a manifest (.csv rows "
                        "path,label or .jsonl), an .npz with images and labels, or builtin:digits (repeatable; "
                        "replaces AUGSVC_DATASETS)")
    p.add_argument("--builtin-side", type=int, default=_env("builtin_side", 32))
    p.add_argument("--cache-budget-mb", type=_bounded(int, 0), default=_env("cache_budget_mb", 2048),
                   help="per dataset: its decoded pixels in shared memory if they fit, else its files' bytes "
                        "if they fit, else only its file paths (default 2048)")
    p.add_argument("--decode-size", action="append", metavar="NAME=EDGE:SIDE",
                   help="decode dataset NAME's JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) whose result still "
                        "reaches SIDE on its shorter (EDGE=shorter) or longer (EDGE=max) side, e.g. "
                        "photos=shorter:256 (repeatable; replaces AUGSVC_DECODE_SIZES)")
    p.add_argument("--layout", action="append", metavar="NAME=LAYOUT",
                   help="hold dataset NAME as decoded, encoded or files whatever the cache budget (repeatable; "
                        "replaces AUGSVC_LAYOUTS)")
    p.add_argument("--on-bad-file", choices=["fail", "skip"], default=_env("on_bad_file", "fail"),
                   help="files whose header cannot be read: refuse to start, listing them (fail, the default), "
                        "or leave them out with a logged count (skip)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="decode every dataset file at start, so that corrupt data is found then (slow)")
    p.add_argument("--max-image-side", type=int, default=_env("max_image_side", 4096))
    p.add_argument("--max-batch-mb", type=int, default=_env("max_batch_mb", 64),
                   help="the most one batch's images may take, in a request or a reply (MiB); a batch's images "
                        "as a worker reads them, and each step's output before the last, may each take 16 times this")
    p.add_argument("--max-inflight", type=int, default=_env("max_inflight"))
    p.add_argument("--max-concurrent-rpcs", type=_POSITIVE, default=_env("max_concurrent_rpcs", 64))
    p.add_argument("--tls-cert", default=_env("tls_cert"))
    p.add_argument("--tls-key", default=_env("tls_key"))
    p.add_argument("--tls-client-ca", default=_env("tls_client_ca"), help="require client certificates")
    p.add_argument("--token-file", default=_env("token_file"), help="require 'authorization: Bearer <token>'")
    p.add_argument("--insecure", action="store_true", default=None, help="allow plaintext on a non-loopback address")
    p.add_argument("--metrics-port", type=_PORT, default=_env("metrics_port"))
    p.add_argument("--metrics-host", default=_env("metrics_host", "127.0.0.1"))
    p.add_argument("--grace", type=_NONNEGATIVE, default=_env("grace", 10.0),
                   help="seconds in-flight calls get to finish on SIGTERM")
    p.add_argument("--max-connection-age", type=_NONNEGATIVE, default=_env("max_connection_age", 0.0),
                   help="seconds before a client connection is closed, so round_robin clients re-resolve DNS "
                        "(0: never)")
    p.add_argument("--exit-with", metavar="PID[:START]", default=_env("exit_with"),
                   help="drain and exit once process PID is gone (an embedded server follows its trainer, also "
                        "when the trainer is SIGKILLed); START, its start time in /proc/PID/stat, tells it from a "
                        "later process that reuses the pid")
    p.add_argument("--no-shared-memory", dest="shared_memory", action="store_false", default=None,
                   help="always send pixels in the gRPC stream, even to clients on this host that offer "
                        "shared-memory segments")


def _owner(text: str | None) -> tuple[int, int | None] | None:
    """--exit-with's (pid, start time); the start time read now when not given."""
    if not text:
        return None
    pid, _, start = text.partition(":")
    try:
        return int(pid), int(start) if start else start_time(int(pid))
    except ValueError:
        raise ValueError(f"--exit-with: {text!r} is not PID or PID:START") from None


def _gone(owner: tuple[int, int | None]) -> bool:
    """The --exit-with process has exited (or its pid now belongs to a later process)."""
    return owner[1] is None or start_time(owner[0]) != owner[1]


def cmd_serve(args: argparse.Namespace) -> int:
    from .datasets import parse_dataset_arg
    from .launcher import ReadyLine
    from .server import ServerSettings, create_server

    owner = _owner(args.exit_with)
    if owner is not None and _gone(owner):
        print(f"augsvc serve: process {owner[0]} (--exit-with) is already gone", file=sys.stderr)
        return 0
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    if args.token_file and not token:  # an empty secret would serve everyone, silently
        raise ValueError(f"--token-file {args.token_file}: the file is empty; expected the token")
    datasets = [parse_dataset_arg(d) for d in (args.dataset if args.dataset is not None else _env_list("datasets"))]
    names = [name for name, _ in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"--dataset: {sorted({n for n in names if names.count(n) > 1})} given twice")
    settings = ServerSettings(
        workers=args.workers, datasets=dict(datasets),
        builtin_side=args.builtin_side, cache_budget_bytes=args.cache_budget_mb << 20,
        decode_sizes=_named("--decode-size", args.decode_size if args.decode_size is not None
                            else _env_list("decode_sizes")),
        layouts=_named("--layout", args.layout if args.layout is not None else _env_list("layouts")),
        on_bad_file=args.on_bad_file, verify=args.verify or _env_bool("verify", False),
        max_image_side=args.max_image_side, max_batch_bytes=args.max_batch_mb << 20,
        max_inflight=args.max_inflight, max_concurrent_rpcs=args.max_concurrent_rpcs,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, token=token,
        insecure=args.insecure or _env_bool("insecure", False), metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, grace_seconds=args.grace,
        max_connection_age_seconds=args.max_connection_age or None,
        shared_memory=args.shared_memory if args.shared_memory is not None else _env_bool("shared_memory", True))
    host = args.host if ":" not in args.host or args.host.startswith("[") else f"[{args.host}]"
    address = f"unix:{args.unix}" if args.unix else f"{host}:{args.port}"
    log = logging.getLogger("augsvc.serve")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining for up to %.1fs", signum, settings.grace_seconds)
        stop.set()

    # Handlers first: a SIGTERM that arrives just after the ready line still drains.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server, port = create_server(address, settings)
    except RuntimeError as exc:  # gRPC's "Failed to bind to address ..."
        if "bind" not in str(exc).lower():
            raise
        raise ValueError(f"cannot bind {address}: in use by another process, or not allowed here") from None
    server.start()
    where = address if args.unix else f"{host}:{port}"
    log.info("serving on %s with %d workers; datasets: %s", where, server.pool.worker_count,
             ", ".join(f"{ds.name} ({ds.num_samples} images, {ds.layout})" for ds in server.datasets.values())
             or "none")
    # The line on stdout that launchers (augsvc.launcher) and scripts wait for.
    ready = ReadyLine(address=where, host=None if args.unix else args.host, port=port,
                      pid=os.getpid(), workers=server.pool.worker_count, metrics_port=server.metrics_port,
                      datasets=tuple(server.datasets))
    print(ready.to_json(), flush=True)
    # Python runs signal handlers on the main thread only, between bytecodes: a SIGTERM that the
    # kernel hands to one of gRPC's threads would never wake an untimed wait here.
    while not stop.wait(0.5):
        if owner is not None and _gone(owner):
            log.info("process %d is gone: draining for up to %.1fs", owner[0], settings.grace_seconds)
            break
    server.stop()
    log.info("stopped")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key: give both (a client certificate for mutual TLS) or neither")
    if args.tls_ca or args.tls_cert:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        channel = grpc.secure_channel(args.target, creds)
    else:
        channel = grpc.insecure_channel(args.target)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.target}: {exc.code().name}: {exc.details()}")
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_preview(args: argparse.Namespace) -> int:
    from .preview import write_preview

    out = write_preview(args.spec, args.image, args.out, count=args.count, cols=args.cols, seed=args.seed)
    print(f"wrote {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .sizing import measure_spec, sizing_images

    images = sizing_images(image_path=args.image, side=args.side, channels=args.channels, batch=args.batch)
    result = measure_spec(args.spec, images, seconds=args.seconds)
    n, h, w, c = result.input_shape
    _, oh, ow, oc = result.output_shape
    print(f"{result.images_per_second:.0f} images/s per core ({1e6 / result.images_per_second:.0f} us per image): "
          f"spec {args.spec}, fused backend, batches of {n} {h}x{w}x{c} -> {oh}x{ow}x{oc}, one process")
    print("a worker process uses one core: workers needed = the images/s your trainers consume / this figure")
    return 0


def main(argv: list[str] | None = None) -> int:
    level = (os.environ.get("AUGSVC_LOG_LEVEL") or "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):  # getLevelName maps a known name to its number
        print(f"augsvc: AUGSVC_LOG_LEVEL={level!r} is not a logging level; using INFO", file=sys.stderr)
        level = "INFO"
    logging.basicConfig(level=level,
                        format='{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s",'
                               '"message":"%(message)s"}')
    parser = argparse.ArgumentParser(prog="augsvc", description="image augmentation as a gRPC service")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    p = sub.add_parser("health", help="check a server's health; exit 0 when SERVING")
    p.add_argument("--target", default=_env("target", "127.0.0.1:50051"))
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=_bounded(float, 0.001), default=3.0)
    p.add_argument("--tls-ca", default=_env("tls_ca"))
    p.add_argument("--tls-cert", default=_env("health_tls_cert"), help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=_env("health_tls_key"))
    p = sub.add_parser("preview", help="write a grid of augmented variants of one image")
    p.add_argument("--spec", required=True, help="spec file (.yaml/.json) or YAML/JSON text")
    p.add_argument("--image", default=None, help="image file (default: a built-in sample photo)")
    p.add_argument("--out", default="preview.png")
    p.add_argument("--count", type=_POSITIVE, default=11)
    p.add_argument("--cols", type=_POSITIVE, default=4)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("bench", help="images/s per core of a spec, to size a deployment")
    p.add_argument("--spec", required=True, help="spec file (.yaml/.json) or YAML/JSON text")
    p.add_argument("--image", default=None,
                   help="an image to augment, at its own size unless --side is given (default: crops of "
                        "the built-in sample photos)")
    p.add_argument("--side", type=_bounded(int, 1, 4096), default=None,
                   help="input images side x side (default 224 for the sample photos)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="1 (gray) or 3 (RGB) input channels (default: the image's own; 3 for the sample photos)")
    p.add_argument("--batch", type=_POSITIVE, default=64, help="images per batch (as a request's batch_size)")
    p.add_argument("--seconds", type=_bounded(float, 0.1), default=5.0, help="how long to measure")
    args = parser.parse_args(argv)
    handlers = {"serve": cmd_serve, "health": cmd_health, "preview": cmd_preview, "bench": cmd_bench}
    from .errors import AugsvcError

    try:
        return handlers[args.command](args)
    except (AugsvcError, ValueError, OSError) as exc:
        print(f"augsvc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
