"""Regenerate the checked-in gRPC stubs in augsvc/v1/ from protos/ (the only way they change).

Uses the grpcio-tools pinned in pyproject's `dev` extra. `--check` regenerates into a temporary
folder and exits 1 when the result differs from what is checked in.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "augsvc" / "v1"
GENERATED = ("augment_pb2.py", "augment_pb2.pyi", "augment_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / "augsvc" / "v1" / "augment.proto"),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (Path(tmp) / "augsvc" / "v1" / name).read_text()
            # Stubs live inside the augsvc package: make the generated import package-relative.
            text = re.sub(r"^from augsvc\.v1 import augment_pb2", "from . import augment_pb2", text,
                          flags=re.M)
            (out_dir / name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_PACKAGE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in GENERATED if not filecmp.cmp(Path(tmp) / n, OUT_PACKAGE / n, shallow=False)]
    if stale:
        print("stale generated stubs: " + ", ".join(stale) + " (run: python scripts/gen_protos.py)")
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
