"""`python -m benchmarks.transport`: bytes/s of the gRPC path (a server streaming Batch messages of the
sizes we send, received and decoded by a client) against a raw loopback TCP socket moving the
same bytes, in the same run: plain grpcio messages (default and tuned options, TCP and unix
socket) and augsvc's own wire path (replies serialized once, parsed without copies)."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from augsvc.tensors import decode_tensor, encode_tensor
from augsvc.v1 import augment_pb2 as pb
from augsvc.v1 import augment_pb2_grpc as pb_grpc
from augsvc.wire import batch_bytes, parse_reply, serialize

from .common import machine, write_json

#: Channel/server options the service uses for large messages (see README, "Transport").
TUNED_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30),
                 ("grpc.http2.lookahead_bytes", 8 << 20), ("grpc.http2.bdp_probe", 1)]
DEFAULT_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


class _Streamer(pb_grpc.AugmenterServicer):
    """StreamBatches that sends freshly built messages of `size` bytes (as the server does)."""

    def __init__(self, size: int, seconds: float) -> None:
        side = max(1, int(np.sqrt(size / 3)))
        self.images = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), np.uint8)
        self.seconds = seconds

    def StreamBatches(self, request: Any, context: Any) -> Iterator[pb.Batch]:
        end = time.perf_counter() + self.seconds
        k = 0
        while time.perf_counter() < end and context.is_active():
            yield pb.Batch(batch_index=k, images=encode_tensor(self.images))
            k += 1


class _WireStreamer(_Streamer):
    """StreamBatches as augsvc serves it: each reply serialized once (augsvc.wire)."""

    def StreamBatches(self, request: Any, context: Any) -> Iterator[bytes]:  # type: ignore[override]
        end = time.perf_counter() + self.seconds
        k = 0
        while time.perf_counter() < end and context.is_active():
            yield batch_bytes(epoch=0, batch_index=k, images=self.images, labels=[], sample_ids=[])
            k += 1


def wire_rate(size: int, seconds: float, options: list[tuple[str, int]]) -> float:
    """The service's own path: replies serialized once, parsed into numpy views by the client."""
    server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
    handler = grpc.unary_stream_rpc_method_handler(
        _WireStreamer(size, seconds).StreamBatches, request_deserializer=pb.StreamBatchesRequest.FromString,
        response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "augsvc.v1.Augmenter", {"StreamBatches": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
            call = ch.unary_stream("/augsvc.v1.Augmenter/StreamBatches",
                                   request_serializer=pb.StreamBatchesRequest.SerializeToString,
                                   response_deserializer=parse_reply)
            received, start = 0, time.perf_counter()
            for _msg, images in call(pb.StreamBatchesRequest()):
                received += images.nbytes
            return received / (time.perf_counter() - start)
    finally:
        server.stop(0)


def grpc_rate(size: int, seconds: float, options: list[tuple[str, int]], unix: str | None = None) -> float:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
    pb_grpc.add_AugmenterServicer_to_server(_Streamer(size, seconds), server)
    address = f"unix:{unix}" if unix else "127.0.0.1:0"
    port = server.add_insecure_port(address)
    server.start()
    try:
        with grpc.insecure_channel(address if unix else f"127.0.0.1:{port}", options=options) as ch:
            stub = pb_grpc.AugmenterStub(ch)
            received, start = 0, time.perf_counter()
            for msg in stub.StreamBatches(pb.StreamBatchesRequest()):
                received += decode_tensor(msg.images).nbytes
            return received / (time.perf_counter() - start)
    finally:
        server.stop(0)


def socket_rate(size: int, seconds: float) -> float:
    """A plain loopback TCP stream of `size`-byte messages (a fresh buffer per message)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    payload = np.random.default_rng(0).integers(0, 256, size, np.uint8)

    def send() -> None:
        conn, _ = listener.accept()
        end = time.perf_counter() + seconds
        with conn:
            while time.perf_counter() < end:
                conn.sendall(payload.tobytes())
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    received, start = 0, time.perf_counter()
    buf = bytearray(size)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        view = memoryview(buf)
        while True:
            got = sock.recv_into(view)
            if not got:
                break
            received += got
    thread.join()
    listener.close()
    return received / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__)
    parser.add_argument("--sizes-kb", type=int, nargs="+", default=[64, 1024, 9408])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kb in args.sizes_kb:
            size = kb * 1024
            raw = socket_rate(size, args.seconds)
            default = grpc_rate(size, args.seconds, DEFAULT_OPTIONS)
            tuned = grpc_rate(size, args.seconds, TUNED_OPTIONS)
            unix = grpc_rate(size, args.seconds, TUNED_OPTIONS, unix=f"{tmp}/t.sock")
            wire = wire_rate(size, args.seconds, TUNED_OPTIONS)
            rows.append({"message_bytes": size, "socket": raw, "grpc_default": default, "grpc_tuned": tuned,
                         "grpc_tuned_unix": unix, "augsvc_wire": wire, "tuned_vs_socket": tuned / raw,
                         "wire_vs_socket": wire / raw})
    print(f"transport, MB/s received ({machine()})")
    print(f"{'message':>9} {'raw socket':>11} {'grpc default':>13} {'grpc tuned':>11} {'tuned unix':>11} "
          f"{'augsvc wire':>12} {'wire/socket':>12}")
    for r in rows:
        print(f"{r['message_bytes'] // 1024:>7}KB {r['socket'] / 1e6:>11.0f} {r['grpc_default'] / 1e6:>13.0f} "
              f"{r['grpc_tuned'] / 1e6:>11.0f} {r['grpc_tuned_unix'] / 1e6:>11.0f} {r['augsvc_wire'] / 1e6:>12.0f} "
              f"{r['wire_vs_socket']:>12.2f}")
    write_json(args.json, {"benchmark": "transport", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
