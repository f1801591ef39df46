"""Signed webhooks: a training task's JSON POSTed to its `webhook_url` when the task ends.

Each attempt checks the URL again and connects only to the address it checked (media's pinned
requests), so a host that starts resolving to a private address is refused, not reached.
A failed delivery is reported in the outcome and never raised: the task has ended either way."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import httpx

from services.common import media
from services.common.errors import InvalidInput, ServiceError
from services.common.settings import MediaLimits

SIGNATURE_HEADER = "X-Loramesh-Signature"  # "sha256=" + hex HMAC-SHA256(secret, body)
EVENT_HEADER = "X-Loramesh-Event"  # the terminal state, e.g. "COMPLETED"
DELIVERY_HEADER = "X-Loramesh-Delivery"  # the same id on every retry of one delivery, for dedupe

MAX_URL_CHARS = 2048
# The field a failed check names in an outcome's error.
URL_FIELD = "webhook_url"
# A receiver sees at most this much of why an attempt failed; a task record stays small.
MAX_ERROR_CHARS = 200
# One wait between attempts never exceeds this, however many attempts are configured.
MAX_WAIT_S = 600.0


def check_webhook_url(url: str, field: str, limits: MediaLimits) -> None:
    """Refuses anything but an http(s) URL of at most 2048 characters to a public address
    (any address when `limits.allow_private_urls`)."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(field, f"must be at most {MAX_URL_CHARS} characters (got {len(url)})")
    media.check_url(url, field, limits)


def sign(body: bytes, secret: str) -> str:
    """The signature header's value for `body`: "sha256=" and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header_value: str) -> bool:
    """Whether `header_value` is the signature of `body` under `secret`, compared in constant time."""
    return hmac.compare_digest(sign(body, secret).encode("ascii"), (header_value or "").encode("utf-8"))


@dataclass
class WebhookOutcome:
    """What became of one delivery: kept in the task record."""

    event: str
    delivered: bool
    attempts: int
    status_code: int | None  # of the last attempt's answer; None when there was none
    error: str  # why the last attempt failed; "" once delivered
    delivered_at: float | None  # Unix time of the accepted attempt

    def to_dict(self) -> dict:
        return asdict(self)


async def deliver(url: str, body: bytes, *, event: str, delivery_id: str, secret: str | None,
                  limits: MediaLimits, attempts: int, backoff_s: float, timeout_s: float,
                  sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> WebhookOutcome:
    """POSTs `body` until a 2xx answer or `attempts` attempts, waiting backoff_s, 2*backoff_s,
    4*backoff_s... between them. Redirects are not followed: a 3xx is a failed attempt."""
    headers = {"Content-Type": "application/json", EVENT_HEADER: event, DELIVERY_HEADER: delivery_id}
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    status_code: int | None = None
    error = ""
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                await sleep(min(backoff_s * 2 ** (attempt - 2), MAX_WAIT_S))
            status_code, error = await _attempt(client, url, body, headers, limits, timeout_s)
            if not error:
                return WebhookOutcome(event, True, attempt, status_code, "", time.time())
    return WebhookOutcome(event, False, attempts, status_code, error[:MAX_ERROR_CHARS], None)


async def _attempt(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
                   limits: MediaLimits, timeout_s: float) -> tuple[int | None, str]:
    """One POST within `timeout_s` in all (lookup included): (status code, "" when accepted
    or why not)."""
    try:
        async with asyncio.timeout(timeout_s):
            # The lookup blocks, so it runs off the event loop.
            target = await asyncio.to_thread(media.checked_target, url, URL_FIELD, limits)
            request = media.pinned_request(client, target, "POST", content=body, headers=headers)
            # The answer's body is never read: only its status matters.
            response = await client.send(request, stream=True)
            await response.aclose()
    except (TimeoutError, httpx.TimeoutException):
        return None, f"no answer within {timeout_s:g}s"
    except ServiceError as exc:  # the URL no longer passes the check
        return None, str(exc)
    except httpx.ConnectError as exc:
        return None, f"connection failed ({str(exc) or type(exc).__name__})"
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
        return None, f"request failed ({str(exc) or type(exc).__name__})"
    code = response.status_code
    if 200 <= code < 300:
        return code, ""
    if 300 <= code < 400:
        return code, f"HTTP {code} (redirects are not followed)"
    return code, f"HTTP {code}"
