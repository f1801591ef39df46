"""Frame sampling on a video whose frames show their own index."""

from __future__ import annotations

import numpy as np
import pytest

from services.captioner.frames import sample_frames
from services.common.errors import InvalidInput
from services.common.settings import MediaLimits
from tests.conftest import write_counting_video, write_tone


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_counting_video(tmp_path_factory.mktemp("frames") / "counting.mp4", frames=40)


def shown_index(image) -> int:
    return round(float(np.asarray(image, dtype=np.float32).mean()) / 5)


@pytest.mark.parametrize(("method", "count", "expected"), [
    ("uniform", 5, [0, 10, 20, 29, 39]),
    ("uniform", 1, [0]),
    ("uniform", 100, list(range(40))),
    ("first", 3, [0, 1, 2]),
])
def test_frames_are_the_ones_asked_for(video, method, count, expected):
    frames = sample_frames(video, "video_path", count, method, MediaLimits())
    assert [f.index for f in frames] == expected
    assert [shown_index(f.image) for f in frames] == expected


def test_a_file_without_a_video_stream_is_refused(tmp_path):
    with pytest.raises(InvalidInput) as caught:
        sample_frames(write_tone(tmp_path / "tone.wav"), "video_path", 4, "uniform", MediaLimits())
    assert caught.value.violations == [("video_path", "has no video stream")]
