"""trainer_client: the PyTorch side of augsvc — a client, an exactly-once stream of augmented
batches, a regularized CNN, and a training loop that watches for overfitting. The only package
that imports torch.

The public names are imported on first use, so that `trainer_client.device` (torch only) can be
used — and tests/test_gpu.py run — on a machine that has torch but not the service's packages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from augsvc.errors import StreamError

    from .client import AugmentClient, DatasetInfo, DecoderMismatchWarning, ServerInfo, TLSConfig
    from .device import DeviceFeed
    from .stream import AugmentedStream
    from .world import World

__all__ = ["AugmentClient", "AugmentedStream", "DatasetInfo", "DecoderMismatchWarning", "DeviceFeed", "ServerInfo",
           "StreamError", "TLSConfig", "World"]

_HOMES = {"AugmentClient": ".client", "DatasetInfo": ".client", "ServerInfo": ".client", "TLSConfig": ".client",
          "DecoderMismatchWarning": ".client",
          "AugmentedStream": ".stream", "DeviceFeed": ".device", "World": ".world", "StreamError": "augsvc.errors"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trainer_client' has no attribute {name!r}")
    module = importlib.import_module(home, __name__) if home.startswith(".") else importlib.import_module(home)
    value = getattr(module, name)
    globals()[name] = value
    return value
