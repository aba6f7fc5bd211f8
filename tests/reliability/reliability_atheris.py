"""Coverage-guided fuzzing (atheris, optional) of the code that reads untrusted bytes before any
worker sees them: the server's request parsers (augsvc.jobs: the spec, the tensor checks, sample
ids, the epoch plan and batch range) and the client's zero-copy reply parser (augsvc.wire).

Any exception other than the documented ones (augsvc errors, protobuf DecodeError, and the
ValueError the wire parser raises for truncated input) is a finding. Run it directly::

    python tests/reliability/reliability_atheris.py -runs=200000 -max_len=4096

or through the slow test test_reliability_limits.py::test_atheris_request_parsers (skipped when
atheris is not installed; it is not a project dependency).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import numpy as np
    from google.protobuf.message import DecodeError

    from augsvc.datasets import load_dataset
    from augsvc.errors import AugsvcError
    from augsvc.jobs import augment_request, batch_range, parse_stream_batches, parser
    from augsvc.plan import PlanCache
    from augsvc.v1 import augment_pb2 as pb
    from augsvc.validation import Limits
    from augsvc.wire import parse_reply

LIMITS = Limits()
DATASETS = {"digits": load_dataset("digits", "builtin:digits")}
PLANS = PlanCache()
parse_augment = parser(pb.AugmentRequest)


def augment(body: bytes) -> None:
    job, _payload = augment_request(parse_augment(body), LIMITS)
    assert job.sample_ids.dtype == np.uint64


def stream_request(body: bytes) -> None:
    batches = batch_range(parse_stream_batches(body), DATASETS, LIMITS, PLANS)
    for k in batches.indices[:4]:
        assert batches.job(k).sample_ids.max(initial=0) < batches.dataset.num_samples


def reply(body: bytes, message_type: type) -> None:
    message, images = parse_reply(body, message_type)
    assert images.dtype == np.uint8 and images.ndim == 4


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 3)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if kind == 0:
            augment(body)
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
