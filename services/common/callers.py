"""Who is calling, as the gateway vouches for it: the subject of the verified JWT (Envoy's
jwt_authn copies the `sub` claim into SUBJECT_HEADER after removing any value the client
sent) or the X-Key the gateway accepted. A resource created through one of them belongs to
that caller, and only that caller sees it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SUBJECT_HEADER = "x-loramesh-subject"
API_KEY_HEADER = "x-key"


def caller(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """"user:<sub>" for a bearer token, "key:<digest>" for an X-Key (the key itself is never
    stored), "" for a call that reached the service without either (not through the gateway)."""
    values = {key.lower(): value for key, value in (metadata or ()) if isinstance(value, str)}
    if values.get(SUBJECT_HEADER):
        return f"user:{values[SUBJECT_HEADER]}"
    if values.get(API_KEY_HEADER):
        return "key:" + hashlib.sha256(values[API_KEY_HEADER].encode()).hexdigest()[:24]
    return ""
