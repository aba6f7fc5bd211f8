"""The generated stubs match the .proto (STYLE habit 7) and the public API is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import augsvc

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_names() -> None:
    required = {"load_spec", "augment_batch", "epoch_batches", "SpecError", "Spec"}
    assert required <= set(augsvc.__all__)
    assert len(augsvc.__all__) == len(set(augsvc.__all__))
    for name in augsvc.__all__:
        assert hasattr(augsvc, name), name


def test_error_tree() -> None:
    assert issubclass(augsvc.SpecError, ValueError)
    assert issubclass(augsvc.SpecError, augsvc.AugsvcError)
    assert issubclass(augsvc.InvalidInputError, ValueError)
    assert issubclass(augsvc.LimitExceededError, augsvc.AugsvcError)
