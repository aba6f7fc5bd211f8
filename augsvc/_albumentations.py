"""The one place augsvc imports albumentations (and sets NO_ALBUMENTATIONS_UPDATE).

albumentations 2.0.8 imports its PyTorch adapters (and so all of torch) whenever torch is
installed, and asks the network for updates unless NO_ALBUMENTATIONS_UPDATE is set. The service
needs neither: blocking `albumentations.pytorch` keeps torch out of servers and workers (its
import sits in a `suppress(ImportError)` there), which DESIGN requires and which saves seconds
and hundreds of MB per worker. Worker processes inherit the variable from the forkserver, which
imports this module first.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.modules.setdefault("albumentations.pytorch", None)  # type: ignore[arg-type]

import albumentations  # noqa: E402
from albumentations.augmentations.crops import functional as fcrops  # noqa: E402
from albumentations.augmentations.geometric import functional as fgeometric  # noqa: E402
from albumentations.augmentations.pixel import functional as fpixel  # noqa: E402

__all__ = ["albumentations", "fcrops", "fgeometric", "fpixel"]
