"""Errors domain code raises; the gRPC layer maps each to a status code (server.py)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: the message is shown to the client as is."""


class InvalidInput(ServiceError):
    """A request field is wrong. Each violation names the field and what is allowed."""

    def __init__(self, field: str, description: str, *more: tuple[str, str]):
        self.violations = [(field, description), *more]
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.violations))


class NotFound(ServiceError):
    """A named thing (file, session, job) does not exist."""


class AlreadyExists(ServiceError):
    """A thing with that id exists already."""


class FailedPrecondition(ServiceError):
    """The request is valid but the system is not in a state to run it."""


class ResourceExhausted(ServiceError):
    """Memory, queue or size limits were hit."""


class Unavailable(ServiceError):
    """A dependency (NATS, a download) is unreachable; retrying may help."""


class Violations:
    """Collects every bad field of a request so the client sees them all at once."""

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self._items.append((field, description))

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidInput(*self._items[0], *self._items[1:])
