"""augsvc: image data augmentation as a gRPC service.

Public API (DESIGN.md): `load_spec`, `Spec`, `augment_batch`, `epoch_batches`, and the error
tree rooted at `AugsvcError` (`SpecError` for every invalid spec).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the real import is lazy (__getattr__ below); type checkers see the signature
    from .engine import augment_batch

from .errors import (
    AugsvcError,
    CancelledError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    RemoteError,
    SpecError,
    StreamError,
    UnauthenticatedError,
    UnavailableError,
    WorkerUnavailableError,
)
from .plan import epoch_batches
from .spec import Spec, load_spec

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The engine (OpenCV, albumentations) loads on first use, so `augsvc health` and the CLI
    # start fast and light.
    if name == "augment_batch":
        from .engine import augment_batch

        return augment_batch
    raise AttributeError(f"module 'augsvc' has no attribute {name!r}")

__all__ = [
    "AugsvcError",
    "CancelledError",
    "InvalidInputError",
    "LimitExceededError",
    "NotFoundError",
    "RemoteError",
    "Spec",
    "SpecError",
    "StreamError",
    "UnauthenticatedError",
    "UnavailableError",
    "WorkerUnavailableError",
    "__version__",
    "augment_batch",
    "epoch_batches",
    "load_spec",
]
