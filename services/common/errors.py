"""Errors domain code raises; the gRPC layer maps each to a status code (server.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class ServiceError(Exception):
    """Base class: the message is shown to the client as is."""


class InvalidInput(ServiceError):
    """A request field is wrong. Each violation names the field and what is allowed."""

    def __init__(self, field: str, description: str, *more: tuple[str, str]):
        self.violations = [(field, description), *more]
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.violations))


class TooLarge(InvalidInput):
    """A request field, or the whole request, is larger than a limit: HTTP 413 for REST
    clients, INVALID_ARGUMENT naming the field for gRPC ones."""

    http_status = 413


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


class UpstreamError(Unavailable):
    """A remote service the request goes through (CivitAI, the Hugging Face Hub) is
    unreachable or answered wrongly: HTTP 502 for REST clients, UNAVAILABLE for gRPC ones."""

    http_status = 502


class Violations:
    """Collects every bad field of a request so the client sees them all at once. The checks
    below are the one way every service validates a request field: each returns the value
    to use (the default when the field is absent) and records what is wrong with the field
    named as the client sent it ("prompts[0].sample_steps")."""

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

    def require(self, condition: bool, field: str, description: str) -> bool:
        """Records `description` for `field` unless `condition` holds; returns `condition`."""
        if not condition:
            self.add(field, description)
        return condition

    def integer(self, field: str, value: Any, default: Any = None, low: int | None = None,
                high: int | None = None) -> Any:
        """An integer within [low, high]; 64-bit integers arrive as strings from proto JSON."""
        if value is None:
            return default
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            self.add(field, f"must be an integer (got {value!r})")
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.add(field, f"must be an integer (got {value!r})")
            return default
        self._within(field, number, low, high, f"{number}")
        return number

    def number(self, field: str, value: Any, default: Any = None, low: float | None = None,
               high: float | None = None) -> Any:
        """A finite JSON number within [low, high] (a string is not one)."""
        if value is None:
            return default
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        if not math.isfinite(number):
            self.add(field, f"must be a number (got {value!r})")
            return default
        self._within(field, number, low, high, f"{number:g}")
        return number

    def choice(self, field: str, value: Any, allowed: Iterable[str], default: Any = None) -> Any:
        """One of `allowed`; absent or empty gives `default`."""
        if value is None or value == "":
            return default
        allowed = tuple(allowed)
        if value not in allowed:
            self.add(field, f"must be one of {', '.join(map(str, allowed))} (got {value!r})")
            return default
        return value

    def text(self, field: str, value: Any, required: bool = False, max_length: int | None = None) -> str:
        """A string; `required` refuses an empty or blank one."""
        if value is None:
            value = ""
        if not isinstance(value, str):
            self.add(field, f"must be a string (got {type(value).__name__})")
            return ""
        if required and not value.strip():
            self.add(field, "is required")
        elif max_length is not None and len(value) > max_length:
            self.add(field, f"must be at most {max_length} characters (got {len(value)})")
        return value

    def _within(self, field: str, number: float, low: float | None, high: float | None, shown: str) -> None:
        if low is not None and high is not None and not low <= number <= high:
            self.add(field, f"must be between {low:g} and {high:g} (got {shown})")
        elif low is not None and number < low:
            self.add(field, f"must be at least {low:g} (got {shown})")
        elif high is not None and number > high:
            self.add(field, f"must be at most {high:g} (got {shown})")
