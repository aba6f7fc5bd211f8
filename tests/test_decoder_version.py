"""Same bytes on every server needs the same JPEG decoder: servers report theirs, and the client
warns when its endpoints differ."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from helpers.servers import serve

from augsvc.datasets import JPEG_DECODER
from augsvc.server import ServerSettings
from augsvc.v1 import augment_pb2 as pb
from trainer_client import AugmentClient
from trainer_client.client import DecoderMismatchWarning


def test_server_reports_its_pinned_decoder() -> None:
    from importlib.metadata import requires, version

    pins = [r for r in requires("augsvc") or [] if r.startswith("simplejpeg")]
    assert pins == [f"simplejpeg=={version('simplejpeg')}"]  # pinned exactly
    with serve(ServerSettings(workers=1)) as s:
        assert s.stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30).decoder == JPEG_DECODER
        with AugmentClient(s.target) as client:
            assert client.server_info().decoder == JPEG_DECODER


def _info_server(decoder: str) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(
        lambda _req, _ctx: pb.ServerInfo(version="x", workers=1, hostname="h", pid=len(decoder), decoder=decoder),
        request_deserializer=pb.ServerInfoRequest.FromString, response_serializer=pb.ServerInfo.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("augsvc.v1.Augmenter",
                                                                          {"GetServerInfo": handler})])
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    return server, target


@pytest.fixture
def endpoints() -> Iterator[list[str]]:
    started = [_info_server(d) for d in ("simplejpeg 1.9.0", "simplejpeg 1.9.0", "simplejpeg 1.8.2")]
    yield [target for _, target in started]
    for server, _ in started:
        server.stop(0)


def test_client_warns_when_endpoints_decode_differently(endpoints: list[str]) -> None:
    with AugmentClient(endpoints[:2]) as same, warnings.catch_warnings():
        warnings.simplefilter("error", DecoderMismatchWarning)
        assert [i.decoder for i in same.server_infos()] == ["simplejpeg 1.9.0"] * 2
    with AugmentClient(endpoints) as mixed, pytest.warns(DecoderMismatchWarning, match="simplejpeg 1.8.2"):
        mixed.server_infos()
    with AugmentClient(endpoints[1:]) as client:  # one answer at a time (server_info) is noted too
        with warnings.catch_warnings():
            warnings.simplefilter("error", DecoderMismatchWarning)
            client.server_info()
        with pytest.warns(DecoderMismatchWarning):
            client.server_info()
