"""Transport security: TLS / mutual-TLS credentials and the bearer-token interceptor.

The token check runs before a request is deserialized, so a caller without the token costs no
augmentation work; the comparison is constant-time (hmac.compare_digest). The health service
stays open so that probes need no secret.
"""

from __future__ import annotations

import hmac
import ipaddress
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, clients must present a certificate it signed (mTLS)."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                       require_client_auth=True)


def is_local_address(address: str) -> bool:
    """True for unix sockets and loopback hosts, where plaintext is allowed by default."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_target(target: str) -> bool:
    """`is_local_address` of a client's target, read through gRPC's target forms
    (``dns:///host:port``, ``dns://server/host:port``, ``ipv4:``, ``ipv6:``)."""
    if target.startswith(("ipv4:", "ipv6:")):
        target = target[5:]
    elif target.startswith("dns:"):
        target = target[4:]
        if target.startswith("//"):  # dns://[dns server]/host:port
            target = target[2:].partition("/")[2]
    return is_local_address(target)


def is_local_peer(peer: str) -> bool:
    """True when a call's peer (`ServicerContext.peer()`: "unix:...", "ipv4:127.0.0.1:5000",
    "ipv6:[::1]:5000") is on this host by way of a unix socket or loopback."""
    peer = urllib.parse.unquote(peer)  # grpcio writes "ipv6:%5B::1%5D:5000"
    for scheme in ("ipv4:", "ipv6:"):
        if peer.startswith(scheme):
            return is_local_address(peer[len(scheme):])
    return peer.startswith("unix:")


def _abort_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token "
                      "(send metadata 'authorization: Bearer <token>')")

    # Same arity as the real method, but the request is never deserialized.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        if not token:
            raise ValueError("token: empty; expected a non-empty secret")
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        method = details.method or ""
        if method.startswith(HEALTH_PREFIX):
            return continuation(details)
        sent = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                sent = value.encode() if isinstance(value, str) else bytes(value)
        if hmac.compare_digest(sent, self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:  # no such method: UNIMPLEMENTED, and no metric label of the caller's choosing
            return None
        if self._on_reject:
            self._on_reject(method.rsplit("/", 1)[-1])  # the servicer's name for it, as its own metrics use
        return _abort_handler(handler)
