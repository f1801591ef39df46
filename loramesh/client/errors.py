"""One exception per gRPC status code, carrying the server's message and, for invalid
requests, each field violation of the `google.rpc.BadRequest` detail the services attach
(trailer `grpc-status-details-bin`)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "FieldViolation", "LorameshError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
    "OutOfRange", "PermissionDenied", "Unauthenticated", "ResourceExhausted", "Aborted", "Cancelled",
    "DeadlineExceeded", "Unimplemented", "Unavailable", "Internal", "UnknownError", "error_from_rpc",
]


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its path as sent (e.g. `input[0].general_threshold`) and
    what is allowed."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class LorameshError(Exception):
    """A call the mesh refused or could not answer. `code` is the gRPC status code,
    `message` the server's explanation, `violations` the bad fields (invalid requests)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, violations: tuple[FieldViolation, ...] = (), method: str = ""):
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)
        self.method = method  # e.g. "TaggerService.Tag"

    def __str__(self) -> str:
        return self.message or self.code.name


class InvalidArgument(LorameshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LorameshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LorameshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LorameshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(LorameshError):
    code = grpc.StatusCode.OUT_OF_RANGE


class PermissionDenied(LorameshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LorameshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(LorameshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(LorameshError):
    code = grpc.StatusCode.ABORTED


class Cancelled(LorameshError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(LorameshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(LorameshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(LorameshError):
    """The gateway, a service or NATS could not be reached; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(LorameshError):
    code = grpc.StatusCode.INTERNAL


class UnknownError(LorameshError):
    code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[LorameshError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, OutOfRange,
                              PermissionDenied, Unauthenticated, ResourceExhausted, Aborted, Cancelled,
                              DeadlineExceeded, Unimplemented, Unavailable, Internal)
}
_BY_CODE[grpc.StatusCode.DATA_LOSS] = Internal


def error_from_rpc(error: grpc.RpcError, method: str = "") -> LorameshError:
    """The exception for a failed call (sync or grpc.aio)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else "") or ""
    violations = _violations(_trailer(error, "grpc-status-details-bin"))
    return _BY_CODE.get(code, UnknownError)(message, violations, method)


def _trailer(error: grpc.RpcError, key: str) -> bytes | None:
    metadata = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for name, value in metadata or ():
        if name == key:
            return value
    return None


def _violations(raw: bytes | None) -> tuple[FieldViolation, ...]:
    if not raw:
        return ()
    status = status_pb2.Status.FromString(raw)
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return tuple(found)
