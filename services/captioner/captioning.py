"""What the captioner's routes do once their request is checked: read the input, sample
video frames, caption them, add the audio caption when asked, and time each stage.

Images and video frames are decoded a batch at a time, as the captioner takes them, and
let go before the next batch: memory follows the batch, not the request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image

from services.captioner import audio as audio_lm
from services.captioner.frames import sample_frames, wanted_frames
from services.captioner.options import Source, VisionOptions, combine
from services.captioner.requests import DEFAULT_BATCH_SIZE, AudioJob, BatchJob, CaptionJob
from services.captioner.vision import VisionCaptioner
from services.common import media
from services.common.devices import pick_device
from services.common.errors import InvalidInput
from services.common.residency import Freed, Residency
from services.common.settings import Settings

Progress = Callable[[int, int], None]
# A video's frames are decoded and captioned this many at a time (the batch route's default),
# so a 500-frame request holds 8 frames and their activations at once, not 500.
FRAMES_PER_BATCH = DEFAULT_BATCH_SIZE


@dataclass
class Timings:
    load_seconds: float = 0.0
    decode_seconds: float = 0.0
    generate_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class FrameCaption:
    frame_index: int
    timestamp_seconds: float
    caption: str


@dataclass
class AudioResult:
    caption: str
    has_audio: bool
    model_path: str
    duration_seconds: float = 0.0
    sample_rate: int = 0
    message: str = ""


@dataclass
class CaptionResult:
    caption: str
    options: VisionOptions
    frames: list[FrameCaption] = field(default_factory=list)
    audio: AudioResult | None = None
    timings: Timings = field(default_factory=Timings)


@dataclass
class BatchResult:
    captions: list[tuple[str, str]]  # (the path or URL as the client sent it, its caption), in order
    options: VisionOptions
    timings: Timings


class Captioning:
    def __init__(self, settings: Settings, residency: Residency):
        self.settings = settings
        device = pick_device(settings.device)
        self.vision = VisionCaptioner(residency, device)
        self.audio = audio_lm.AudioCaptioner(residency, str(device))

    def read(self, source: Source):
        return media.read_source(source.value, source.field, is_url=source.is_url, roots=self.settings.media_roots,
                                 limits=self.settings.media)

    def caption(self, job: CaptionJob, on_batch: Progress | None = None) -> CaptionResult:
        started = time.perf_counter()
        timings = Timings()
        source, options, limits = job.source, job.options, self.settings.media
        raw = self.read(source)
        frames: list[tuple[int, float]] = []  # (index, time) of each video frame, as it is decoded
        if source.is_video:
            wanted = wanted_frames(raw, source.field, job.num_frames, job.sample_method, limits)

            def pictures() -> Iterator[Image.Image]:
                for frame in sample_frames(raw, source.field, wanted, limits):
                    frames.append((frame.index, frame.time_s))
                    yield frame.image

            images, total, batch_size = pictures(), len(wanted), FRAMES_PER_BATCH
        else:
            images, total, batch_size = [media.decode_image(raw, source.field, limits)], 1, 1
        timings.decode_seconds = time.perf_counter() - started
        timings.load_seconds = self._timed_load(lambda: self.vision.load(options))
        captions = self._caption(images, options, batch_size, on_batch, total, timings)
        result = CaptionResult(caption=combine(captions, job.combine_method) if source.is_video else captions[0],
                               options=options)
        if source.is_video:
            result.frames = [FrameCaption(i, t, c) for (i, t), c in zip(frames, captions, strict=True)]
        if job.audio_options is not None:
            result.audio = self.caption_audio(raw, source.field, job.audio_model_path, job.audio_options, timings)
        timings.total_seconds = time.perf_counter() - started
        result.timings = timings
        return result

    def caption_batch(self, job: BatchJob, on_batch: Progress | None = None) -> BatchResult:
        started = time.perf_counter()
        timings = Timings()
        images = (media.decode_image(self.read(s), s.field, self.settings.media) for s in job.sources)
        timings.load_seconds = self._timed_load(lambda: self.vision.load(job.options))
        captions = self._caption(images, job.options, job.batch_size, on_batch, len(job.sources), timings)
        timings.total_seconds = time.perf_counter() - started
        return BatchResult([(s.value, c) for s, c in zip(job.sources, captions, strict=True)], job.options, timings)

    def caption_audio_file(self, job: AudioJob) -> tuple[AudioResult, Timings]:
        """The audio route: an audio file, or a video's audio track (a video without one is refused)."""
        timings = Timings()
        result = self.caption_audio(self.read(job.source), job.source.field, job.model_path, job.options, timings)
        if not result.has_audio:
            raise InvalidInput(job.source.field, "has no audio track")
        timings.total_seconds = timings.decode_seconds + timings.generate_seconds
        return result, timings

    def caption_audio(self, raw, field_name: str, model_path: str, options: audio_lm.AudioOptions,
                      timings: Timings) -> AudioResult:
        """The caption of `raw`'s audio; its decode and generate time add to `timings`."""
        model_path = model_path or self.settings.models.audio or audio_lm.DEFAULT_AUDIO_MODEL
        decoding = time.perf_counter()
        clip = audio_lm.decode_audio(raw, field_name, target_sample_rate=options.target_sample_rate,
                                     max_seconds=options.max_audio_seconds, limits=self.settings.media)
        timings.decode_seconds += time.perf_counter() - decoding
        if clip is None:
            return AudioResult("", False, model_path, message="video has no audio track")
        generating = time.perf_counter()
        caption = self.audio.caption(clip, model_path, options)
        timings.generate_seconds += time.perf_counter() - generating
        return AudioResult(caption, True, model_path, clip.duration_seconds, clip.sample_rate)

    def _caption(self, images: Iterable[Image.Image], options: VisionOptions, batch_size: int,
                 on_batch: Progress | None, total: int, timings: Timings) -> list[str]:
        """Captions `images` (decoded as they are taken), splitting the time between decoding
        and generating."""
        decoded = timings.decode_seconds
        generating = time.perf_counter()
        captions = self.vision.caption(_timed(images, timings), options, batch_size, on_batch, total)
        timings.generate_seconds = time.perf_counter() - generating - (timings.decode_seconds - decoded)
        return captions

    @staticmethod
    def _timed_load(load) -> float:
        started = time.perf_counter()
        load()
        return time.perf_counter() - started

    def unload_vision(self) -> list[Freed]:
        return self.vision.unload()

    def unload_audio(self) -> list[Freed]:
        return self.audio.unload()


def _timed(images: Iterable[Image.Image], timings: Timings) -> Iterator[Image.Image]:
    """`images`, with the time spent producing each added to timings.decode_seconds."""
    pending = iter(images)
    while True:
        started = time.perf_counter()
        image = next(pending, None)
        timings.decode_seconds += time.perf_counter() - started
        if image is None:
            return
        yield image
