"""Frame sampling on a video whose frames show their own index, and captioning that holds
one batch of decoded images or frames at a time."""

from __future__ import annotations

import numpy as np
import pytest

from services.captioner import requests
from services.captioner.captioning import FRAMES_PER_BATCH, Captioning
from services.captioner.frames import sample_frames, wanted_frames
from services.common import media
from services.common.errors import InvalidInput
from services.common.residency import Residency
from services.common.settings import MediaLimits, Settings
from tests.conftest import write_counting_video, write_image, write_tone
from tests.test_tagger_api import Alive, counted_frames


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
    frames = list(sample_frames(video, "video_path", wanted_frames(video, "video_path", count, method, MediaLimits()),
                                MediaLimits()))
    assert [f.index for f in frames] == expected
    assert [shown_index(f.image) for f in frames] == expected


def test_a_file_without_a_video_stream_is_refused(tmp_path):
    with pytest.raises(InvalidInput) as caught:
        wanted_frames(write_tone(tmp_path / "tone.wav"), "video_path", 4, "uniform", MediaLimits())
    assert caught.value.violations == [("video_path", "has no video stream")]


@pytest.fixture
def captioning(models_dir, tmp_path):
    settings = Settings.load("captioner", {"LORAMESH_MEDIA_ROOTS": str(tmp_path),
                                           "LORAMESH_MODEL_ROOTS": str(models_dir),
                                           "LORAMESH_FLORENCE2_MODEL": str(models_dir / "florence2")})
    return settings, Captioning(settings, Residency())


def test_a_long_video_is_captioned_a_batch_of_frames_at_a_time(captioning, tmp_path, monkeypatch):
    settings, captioner = captioning
    frames = Alive()
    monkeypatch.setattr(media, "Frame", counted_frames(frames))
    video = write_counting_video(tmp_path / "long.mp4", frames=3 * FRAMES_PER_BATCH + 2)
    job = requests.caption_job({"video_path": str(video), "num_frames": 3 * FRAMES_PER_BATCH + 2,
                                "max_new_tokens": 4}, settings)
    progress = []
    result = captioner.caption(job, on_batch=lambda done, total: progress.append((done, total)))
    assert [f.frame_index for f in result.frames] == list(range(3 * FRAMES_PER_BATCH + 2))
    assert frames.peak <= FRAMES_PER_BATCH + 1
    total = 3 * FRAMES_PER_BATCH + 2
    assert progress == [(FRAMES_PER_BATCH, total), (2 * FRAMES_PER_BATCH, total), (3 * FRAMES_PER_BATCH, total),
                        (total, total)]


def test_a_batch_request_holds_one_batch_of_decoded_images(captioning, tmp_path, monkeypatch):
    settings, captioner = captioning
    alive = Alive()
    decode = media.decode_image

    def counted(*args, **kwargs):
        image = decode(*args, **kwargs)
        alive.add(image)
        return image

    monkeypatch.setattr(media, "decode_image", counted)
    paths = [str(write_image(tmp_path / f"picture{i}.png", (48, 40), seed=i)) for i in range(10)]
    job = requests.batch_job({"image_paths": paths, "batch_size": 3, "options": {"max_new_tokens": 4}}, settings)
    batched = captioner.caption_batch(job)
    assert alive.peak <= 3 + 1
    one_by_one = [captioner.caption_batch(requests.batch_job(
        {"image_paths": [p], "options": {"max_new_tokens": 4}}, settings)).captions[0] for p in paths]
    assert batched.captions == one_by_one


def test_a_batch_request_has_a_documented_size_limit(captioning, tmp_path):
    settings, _ = captioning
    paths = [str(tmp_path / f"picture{i}.png") for i in range(requests.MAX_BATCH_IMAGES + 1)]
    with pytest.raises(InvalidInput) as caught:
        requests.batch_job({"image_paths": paths}, settings)
    assert caught.value.violations == [("image_paths", f"at most {requests.MAX_BATCH_IMAGES} images per call "
                                                       f"(got {requests.MAX_BATCH_IMAGES + 1})")]
