"""The one exception tree of augsvc, and its one mapping to gRPC status codes in each direction.

    AugsvcError                                                                  status code
     ├── SpecError            (also ValueError)   invalid augmentation spec      INVALID_ARGUMENT
     ├── InvalidInputError    (also ValueError)   bad tensor, image or request   INVALID_ARGUMENT
     │    └── BadSampleError                      a dataset file does not decode INVALID_ARGUMENT
     ├── NotFoundError        (also LookupError)  unknown dataset                NOT_FOUND
     ├── LimitExceededError                       image side, batch bytes, load  RESOURCE_EXHAUSTED
     ├── UnavailableError                         server unreachable; retry      UNAVAILABLE
     │    └── WorkerUnavailableError              a worker died; retry           UNAVAILABLE
     ├── UnauthenticatedError                     missing or wrong token         UNAUTHENTICATED
     ├── CancelledError                           the caller went away           CANCELLED
     ├── RemoteError                              any other status of a call     the code it got
     └── StreamError          (also RuntimeError) a stream's epoch failed        its cause's code

`grpc_status(exc)` maps an exception to the status a server sends; `error_from_status(code,
details)` is its mirror on the client: the error of this tree for a status a call ended with.
Messages name the field and the allowed values, e.g.
``transforms[0].rotate.limit_range: 400 is outside [-180, 180]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import grpc


class AugsvcError(Exception):
    """Base of every error augsvc raises on purpose.

    `code()` and `details()` give the status it stands for, with the accessors of
    `grpc.RpcError`, so code written against plain gRPC reads augsvc errors the same way."""

    #: Name of the grpc.StatusCode this error maps to.
    status_code_name = "INTERNAL"
    #: The message of the status a call ended with (`error_from_status`); None when raised here.
    _status_details: str | None = None

    def code(self) -> grpc.StatusCode:
        """The status code this error maps to."""
        import grpc

        return grpc.StatusCode[self.status_code_name]

    def details(self) -> str:
        """The status message: the server's, for an error a call ended with; else this error's."""
        return self._status_details if self._status_details is not None else _clip(str(self))


class SpecError(AugsvcError, ValueError):
    """An augmentation spec is invalid; the message starts with the offending path."""

    status_code_name = "INVALID_ARGUMENT"


class InvalidInputError(AugsvcError, ValueError):
    """A tensor, image or request field is malformed (shape, dtype, size, encoding, range)."""

    status_code_name = "INVALID_ARGUMENT"


class BadSampleError(InvalidInputError):
    """A sample of a served dataset does not decode (corrupt or truncated file); the message
    names the sample id and the dataset, never the file's path. Servers count these."""


class NotFoundError(AugsvcError, LookupError):
    """A named dataset does not exist on this server."""

    status_code_name = "NOT_FOUND"


class LimitExceededError(AugsvcError):
    """A configured limit (image side, batch bytes, in-flight work) would be exceeded."""

    status_code_name = "RESOURCE_EXHAUSTED"


class UnavailableError(AugsvcError):
    """The server cannot take the call now (unreachable, shutting down, a worker gone); retryable."""

    status_code_name = "UNAVAILABLE"


class WorkerUnavailableError(UnavailableError):
    """A worker process died while working; the pool replaces it and the call may be retried."""


class UnauthenticatedError(AugsvcError):
    """The bearer token is missing or wrong."""

    status_code_name = "UNAUTHENTICATED"


class CancelledError(AugsvcError):
    """The caller cancelled or its deadline passed; the work was dropped."""

    status_code_name = "CANCELLED"


class RemoteError(AugsvcError):
    """A call ended with a status that no class above stands for (INTERNAL, UNKNOWN,
    DEADLINE_EXCEEDED, ...); `code()` is the status it got."""


class StreamError(AugsvcError, RuntimeError):
    """An AugmentedStream could not deliver its epoch (a non-retryable status, retries exhausted,
    or a reply that contradicts the plan). When a status ended it, `code()` is that status and
    `__cause__` the error of this tree for it."""


#: The class `error_from_status` gives each status code; the others get RemoteError.
#: (INVALID_ARGUMENT cannot tell a bad spec from a bad tensor: both come back as InvalidInputError.)
_CLASS_BY_CODE: dict[str, type[AugsvcError]] = {
    cls.status_code_name: cls
    for cls in (InvalidInputError, NotFoundError, LimitExceededError, UnavailableError, UnauthenticatedError,
                CancelledError)
}

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
        return exc.code(), exc.details()
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def error_from_status(code: grpc.StatusCode | str, details: str | None) -> AugsvcError:
    """The error of this tree for a status a call ended with: the mirror of `grpc_status`.

    `code` is a grpc.StatusCode or its name. The error is also a `grpc.RpcError`, so callers that
    catch that (and read `.code()` / `.details()`) keep working; its message is "CODE: details"."""
    name = code if isinstance(code, str) else code.name
    exc = _with_rpc_error(_CLASS_BY_CODE.get(name, RemoteError))(f"{name}: {details or ''}")
    exc.status_code_name, exc._status_details = name, details or ""
    return exc


_RPC_ERROR_CLASSES: dict[type[AugsvcError], type[AugsvcError]] = {}


def _with_rpc_error(cls: type[AugsvcError]) -> type[AugsvcError]:
    """`cls` that is also a grpc.RpcError, one per class (made on first use: this module does not
    import grpc)."""
    made = _RPC_ERROR_CLASSES.get(cls)
    if made is not None:
        return made
    import grpc

    def __reduce__(self: AugsvcError) -> tuple[Any, ...]:  # pickle rebuilds it through the mapping
        return error_from_status, (self.status_code_name, self._status_details)

    made = cast(type[AugsvcError], type(cls.__name__, (cls, grpc.RpcError),
                                        {"__module__": __name__, "__qualname__": cls.__qualname__,
                                         "__reduce__": __reduce__}))
    return _RPC_ERROR_CLASSES.setdefault(cls, made)  # a thread that raced here gets the same class
