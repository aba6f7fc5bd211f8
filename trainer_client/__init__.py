"""trainer_client: the PyTorch side of augsvc — a client, an exactly-once stream of augmented
batches, a regularized CNN, and a training loop that watches for overfitting. The only package
that imports torch."""

from __future__ import annotations

from augsvc.errors import StreamError

from .client import AugmentClient, DatasetInfo, ServerInfo, TLSConfig
from .stream import AugmentedStream

__all__ = ["AugmentClient", "AugmentedStream", "DatasetInfo", "ServerInfo", "StreamError", "TLSConfig"]
