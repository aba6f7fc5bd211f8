"""Coverage-guided fuzzing (atheris, optional) of the code that reads untrusted bytes before any
worker sees them: request parsing and validation on the server (Spec.from_proto, the tensor
checks, sample ids, the epoch plan) and the client's zero-copy reply parser (augsvc.wire).

Any exception other than the documented ones (augsvc errors, protobuf DecodeError, and the
ValueError the wire parser raises for truncated input) is a finding. Run it directly::

    python tests/reliability/reliability_atheris.py -runs=200000 -max_len=4096

or through the slow test test_reliability_limits.py::test_atheris_request_parsers (skipped when
atheris is not installed; it is not a project dependency).
"""

from __future__ import annotations

import os
import sys

import atheris

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

with atheris.instrument_imports():
    import numpy as np
    from google.protobuf.message import DecodeError

    from augsvc.datasets import check_sample_ids
    from augsvc.errors import AugsvcError
    from augsvc.plan import epoch_batches
    from augsvc.spec import Spec
    from augsvc.tensors import decode_tensor
    from augsvc.v1 import augment_pb2 as pb
    from augsvc.wire import parse_reply

MAX_SIDE = 4096
MAX_BYTES = 64 << 20
NUM_SAMPLES = 1797


def augment_request(body: bytes) -> None:
    msg = pb.AugmentRequest.FromString(body)
    Spec.from_proto(msg.spec)
    decode_tensor(msg.images, max_side=MAX_SIDE, max_bytes=MAX_BYTES)


def stream_request(body: bytes) -> None:
    msg = pb.StreamBatchesRequest.FromString(body)
    spec = Spec.from_proto(msg.spec)
    assert spec.output_size is None or max(spec.output_size) <= 4096
    ids = np.array(msg.sample_ids, np.uint64)
    population = check_sample_ids(ids, NUM_SAMPLES) if len(ids) else NUM_SAMPLES
    if msg.batch_size:
        plan = epoch_batches(
            population,
            msg.batch_size,
            seed=msg.seed,
            epoch=msg.epoch,
            shuffle=msg.shuffle if msg.HasField("shuffle") else True,
            drop_last=msg.drop_last,
        )
        assert sum(len(b) for b in plan) <= (len(ids) or NUM_SAMPLES)


def reply(body: bytes, message_type: type) -> None:
    message, images = parse_reply(body, message_type)
    assert images.dtype == np.uint8 and images.ndim == 4


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 3)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if kind == 0:
            augment_request(body)
        elif kind == 1:
            stream_request(body)
        elif kind == 2:
            reply(body, pb.Batch)
        else:
            reply(body, pb.AugmentResponse)
    except (AugsvcError, DecodeError):
        pass
    except ValueError as exc:
        if kind < 2:  # the request side raises augsvc errors only
            raise
        if "varint" not in str(exc) and "wire type" not in str(exc) and "past the end" not in str(exc):
            raise


def main(argv: list[str]) -> None:
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
