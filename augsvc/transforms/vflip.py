"""`vflip`: mirror top-bottom with probability p (exact: whole pixels move). No magnitude."""

from __future__ import annotations

from .base import Mirror

TRANSFORM = Mirror("vflip", axis=0)
