"""Frames of a video for captioning: N evenly spaced over the whole video ("uniform"),
or the first N ("first"), decoded in one pass."""

from __future__ import annotations

import io
from pathlib import Path

import av

from services.common.errors import InvalidInput
from services.common.media import Frame
from services.common.settings import MediaLimits


def sample_frames(source: Path | bytes, field: str, count: int, method: str, limits: MediaLimits) -> list[Frame]:
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (av.FFmpegError, OSError) as exc:
        raise InvalidInput(field, f"is not a readable video ({exc})") from exc
    with container:
        if not container.streams.video:
            raise InvalidInput(field, "has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if stream.width * stream.height > limits.max_image_pixels:
            raise InvalidInput(field, f"video frames are {stream.width}x{stream.height}; the limit is "
                                      f"{limits.max_image_pixels} pixels")
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        wanted = _wanted_indices(_frame_count(container, stream, rate, limits), count, method)
        wanted_set = set(wanted)
        frames: list[Frame] = []
        try:
            for index, frame in enumerate(container.decode(stream)):
                time_s = float(frame.time) if frame.time is not None else index / rate
                if time_s > limits.max_video_seconds or index > wanted[-1]:
                    break
                if index in wanted_set:
                    frames.append(Frame(index, time_s, frame.to_image()))
        except (av.FFmpegError, OSError) as exc:
            if not frames:
                raise InvalidInput(field, f"is not a readable video ({exc})") from exc
    if not frames:
        raise InvalidInput(field, "has no decodable video frames")
    return frames


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
