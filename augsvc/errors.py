"""The one exception tree of augsvc, and its one mapping to gRPC status codes.

    AugsvcError
     ├── SpecError            (also ValueError)  invalid augmentation spec      INVALID_ARGUMENT
     ├── InvalidInputError    (also ValueError)  bad tensor, image or request   INVALID_ARGUMENT
     ├── NotFoundError        (also LookupError) unknown dataset                NOT_FOUND
     ├── LimitExceededError                      image side, batch bytes, load  RESOURCE_EXHAUSTED
     ├── WorkerUnavailableError                  a worker died; retry           UNAVAILABLE
     ├── UnauthenticatedError                    missing or wrong token         UNAUTHENTICATED
     └── CancelledError                          the caller went away           CANCELLED

Messages name the field and the allowed values, e.g.
``transforms[0].rotate.limit_range: 400 is outside [-180, 180]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class AugsvcError(Exception):
    """Base of every error augsvc raises on purpose."""

    #: Name of the grpc.StatusCode this error maps to.
    status_code_name = "INTERNAL"


class SpecError(AugsvcError, ValueError):
    """An augmentation spec is invalid; the message starts with the offending path."""

    status_code_name = "INVALID_ARGUMENT"


class InvalidInputError(AugsvcError, ValueError):
    """A tensor, image or request field is malformed (shape, dtype, size, encoding, range)."""

    status_code_name = "INVALID_ARGUMENT"


class NotFoundError(AugsvcError, LookupError):
    """A named dataset does not exist on this server."""

    status_code_name = "NOT_FOUND"


class LimitExceededError(AugsvcError):
    """A configured limit (image side, batch bytes, in-flight work) would be exceeded."""

    status_code_name = "RESOURCE_EXHAUSTED"


class WorkerUnavailableError(AugsvcError):
    """A worker process died while working; the pool replaces it and the call may be retried."""

    status_code_name = "UNAVAILABLE"


class UnauthenticatedError(AugsvcError):
    """The bearer token is missing or wrong."""

    status_code_name = "UNAUTHENTICATED"


class CancelledError(AugsvcError):
    """The caller cancelled or its deadline passed; the work was dropped."""

    status_code_name = "CANCELLED"


#: Longest status message sent, in characters. Messages quote what the client sent (a dataset
#: name, a dtype); grpc percent-encodes them into the grpc-message trailer (up to 12 bytes per
#: character), and clients refuse trailers over 8-16 KiB with RESOURCE_EXHAUSTED, which would
#: hide the real status code.
MAX_MESSAGE_CHARS = 512


def _clip(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS - 40]}... ({len(message)} characters, cut)"


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (status code, message): augsvc errors keep their code, others INTERNAL."""
    import grpc

    if isinstance(exc, AugsvcError):
        return grpc.StatusCode[exc.status_code_name], _clip(str(exc))
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
