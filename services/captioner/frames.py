"""Frames of a video for captioning: N evenly spaced over the whole video ("uniform"),
or the first N ("first"). Which frames is settled first (the video's checks happen there);
they are then decoded in one pass, one at a time as the caller takes them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av

from services.common.media import Frame, iter_frames, open_video
from services.common.settings import MediaLimits


def wanted_frames(source: Path | bytes, field: str, count: int, method: str, limits: MediaLimits) -> list[int]:
    """The indices of the frames to caption, in order."""
    with open_video(source, field, limits) as (container, stream, rate):
        return _wanted_indices(_frame_count(container, stream, rate, limits), count, method)


def sample_frames(source: Path | bytes, field: str, wanted: list[int], limits: MediaLimits) -> Iterator[Frame]:
    """The `wanted` frames, decoded as they are taken (a video may hold fewer than its
    header says: the frames end where it does)."""
    wanted_set, last = set(wanted), wanted[-1]
    with open_video(source, field, limits) as (container, stream, rate):
        yield from iter_frames(container, stream, rate, field, limits,
                               lambda index, _time: None if index > last else index in wanted_set)


def _frame_count(container, stream, rate: float, limits: MediaLimits) -> int:
    """Frames in the stream (within the duration limit): the header's count, else its
    duration times its rate."""
    count = stream.frames
    if not count:
        duration = float(stream.duration * stream.time_base) if stream.duration else \
            (container.duration / av.time_base if container.duration else 0.0)
        count = int(round(duration * rate))
    return max(1, min(count, int(limits.max_video_seconds * rate) + 1))


def _wanted_indices(total: int, count: int, method: str) -> list[int]:
    if method == "first" or count >= total:
        return list(range(min(count, total)))
    # Evenly spaced from the first frame to the last.
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]
