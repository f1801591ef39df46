"""The `input` list of a tag request: path strings or objects with per-item overrides,
validated in full before any file is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.errors import Violations
from services.common.media import IMAGE_EXTENSIONS, extension

# The documented video extensions of the tagger.
VIDEO_EXTENSIONS = (".mp4", ".webm", ".gifv", ".gif")
MEDIA_TYPES = ("image", "video")
MAX_INPUTS = 256
MAX_FRAME_INTERVAL_S = 3600.0

DEFAULT_FRAME_INTERVAL = 0.25
DEFAULT_MAX_FRAME_COUNT = 50
DEFAULT_GENERAL_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85

# Object keys, with the camelCase spellings clients may send.
_FIELDS = {
    "media_path": "media_path", "mediaPath": "media_path",
    "media_url": "media_url", "mediaUrl": "media_url",
    "media_type": "media_type", "mediaType": "media_type",
    "frame_interval": "frame_interval", "frameInterval": "frame_interval",
    "max_frame_count": "max_frame_count", "maxFrameCount": "max_frame_count",
    "general_threshold": "general_threshold", "generalThreshold": "general_threshold",
    "character_threshold": "character_threshold", "characterThreshold": "character_threshold",
}


@dataclass(frozen=True)
class TagItem:
    key: str  # the path or URL as the client wrote it; the answer is keyed by it
    field: str  # where it sits in the request, for error messages
    is_url: bool
    media_type: str  # "image" or "video"
    frame_interval: float = DEFAULT_FRAME_INTERVAL
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT
    general_threshold: float = DEFAULT_GENERAL_THRESHOLD
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD


def parse_inputs(raw: Any, max_frames: int) -> list[TagItem]:
    """TagItems for a decoded JSON `input`; raises InvalidInput listing every bad field."""
    bad = Violations()
    if raw is None:
        bad.add("input", "is required: a list of paths or objects with media_path or media_url")
    elif not isinstance(raw, list):
        bad.add("input", f"must be a list of paths or objects, not {_json_type(raw)}")
    elif not raw:
        bad.add("input", "must not be empty")
    elif len(raw) > MAX_INPUTS:
        bad.add("input", f"has {len(raw)} items; at most {MAX_INPUTS} are allowed per request")
    bad.raise_if_any()
    items = [_parse_item(value, f"input[{i}]", max_frames, bad) for i, value in enumerate(raw)]
    bad.raise_if_any()
    return items  # type: ignore[return-value]


def _parse_item(value: Any, where: str, max_frames: int, bad: Violations) -> TagItem | None:
    if isinstance(value, str):
        value = {"media_path": value}
    elif not isinstance(value, dict):
        bad.add(where, f"must be a path string or an object, not {_json_type(value)}")
        return None
    fields: dict[str, Any] = {}
    for key, item in value.items():
        name = _FIELDS.get(key)
        if name is None:
            bad.add(f"{where}.{key}", f"unknown field; allowed: {', '.join(sorted(set(_FIELDS.values())))}")
        else:
            fields[name] = item
    path, url = fields.get("media_path"), fields.get("media_url")
    if path is not None and url is not None:
        bad.add(where, "provide either media_path or media_url, not both")
        return None
    if path is None and url is None:
        bad.add(where, "media_path or media_url is required")
        return None
    source_field = f"{where}.{'media_url' if url is not None else 'media_path'}"
    source = url if url is not None else path
    bad.text(source_field, source, required=True)
    if not isinstance(source, str) or not source.strip():
        return None
    media_type = _media_type(fields.get("media_type"), source, is_url=url is not None, where=where, bad=bad)
    frame_interval = bad.number(f"{where}.frame_interval", fields.get("frame_interval"), DEFAULT_FRAME_INTERVAL,
                                high=MAX_FRAME_INTERVAL_S)
    bad.require(frame_interval > 0, f"{where}.frame_interval", f"must be greater than 0 (got {frame_interval:g})")
    options = {
        "frame_interval": frame_interval,
        "max_frame_count": bad.integer(f"{where}.max_frame_count", fields.get("max_frame_count"),
                                       DEFAULT_MAX_FRAME_COUNT, low=1, high=max_frames),
        "general_threshold": bad.number(f"{where}.general_threshold", fields.get("general_threshold"),
                                        DEFAULT_GENERAL_THRESHOLD, low=0.0, high=1.0),
        "character_threshold": bad.number(f"{where}.character_threshold", fields.get("character_threshold"),
                                          DEFAULT_CHARACTER_THRESHOLD, low=0.0, high=1.0),
    }
    if media_type is None:
        return None
    # Any bad option is already recorded, and parse_inputs raises before this item is used.
    return TagItem(key=source, field=source_field, is_url=url is not None, media_type=media_type, **options)


def _media_type(given: Any, source: str, *, is_url: bool, where: str, bad: Violations) -> str | None:
    """The media_type the item names, else the one its extension implies."""
    if given not in (None, ""):
        return bad.choice(f"{where}.media_type", given, MEDIA_TYPES)
    ext = extension(source)
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS or (is_url and not ext):
        return "image"
    bad.add(
        where,
        f"unsupported extension {ext or '(none)'!r}; images: {', '.join(sorted(IMAGE_EXTENSIONS))}; "
        f"videos: {', '.join(VIDEO_EXTENSIONS)} (or set media_type)",
    )
    return None


def _json_type(value: Any) -> str:
    return {dict: "an object", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
