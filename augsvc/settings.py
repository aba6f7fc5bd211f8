"""`ServerSettings`: everything `augsvc serve` can configure, in one object the server's parts share."""

from __future__ import annotations

from dataclasses import dataclass, field

from .validation import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_SIDE, Limits

__all__ = ["ServerSettings"]


@dataclass
class ServerSettings:
    """Everything `augsvc serve` can configure; defaults suit one trainer on one host."""

    workers: int | None = None                 # None: the CPU quota this process may use
    datasets: dict[str, str] = field(default_factory=dict)   # name -> source
    builtin_side: int = 32
    cache_budget_bytes: int = 2 << 30           # per dataset: decoded if its pixels fit, else encoded, else files
    decode_sizes: dict[str, str] = field(default_factory=dict)  # name -> "shorter:256" | "max:512"
    layouts: dict[str, str] = field(default_factory=dict)       # name -> "decoded" | "encoded" | "files"
    on_bad_file: str = "fail"                  # files whose header cannot be read: "fail" | "skip"
    verify: bool = False                       # decode every file at start
    max_image_side: int = DEFAULT_MAX_SIDE
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    max_inflight: int | None = None            # jobs queued or running in the pool
    max_concurrent_rpcs: int = 64
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    token: str | None = None
    insecure: bool = False                     # allow plaintext beyond loopback
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    grace_seconds: float = 10.0
    # Close client connections after this long so round_robin clients re-resolve DNS and see
    # pods an autoscaler added (None: keep connections).
    max_connection_age_seconds: float | None = None
    # Let clients on this host (unix socket or loopback peers) receive pixels through shared
    # memory they create (StreamBatchesRequest.shm_segments) instead of the gRPC stream.
    shared_memory: bool = True

    @property
    def max_message_bytes(self) -> int:
        # A batch plus its labels and ids, with room for the encoding.
        return self.max_batch_bytes + (1 << 20) + self.max_batch_bytes // 16

    @property
    def limits(self) -> Limits:
        """The limits every request is checked against."""
        return Limits(max_image_side=self.max_image_side, max_batch_bytes=self.max_batch_bytes)
