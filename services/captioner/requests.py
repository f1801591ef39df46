"""The captioner's requests, each given as the fields its client sent (proto field names;
absent fields are left out), checked in full before anything is read or loaded and turned
into the job captioning.py runs. InvalidInput lists every bad field at once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.captioner import options as opts
from services.captioner.audio import DEFAULT_AUDIO_PROMPT, AudioOptions
from services.common.errors import Violations
from services.common.settings import Settings

MAX_BATCH_IMAGES = 512
MAX_BATCH_SIZE = 64
DEFAULT_BATCH_SIZE = 8
AUDIO_INPUTS = ("audio_path", "audio_url", "video_path", "video_url")
# The audio settings a request may set; a caption request names them with an audio_ prefix.
_AUDIO_SETTINGS = ("max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "repetition_penalty",
                   "target_sample_rate", "max_audio_seconds")


@dataclass(frozen=True)
class CaptionJob:
    """One image or video; a video's frames are captioned as one batch, its audio on request."""

    source: opts.Source
    options: opts.VisionOptions
    num_frames: int
    sample_method: str
    combine_method: str
    audio_model_path: str
    audio_options: AudioOptions | None  # None: no audio caption


@dataclass(frozen=True)
class BatchJob:
    sources: list[opts.Source]
    options: opts.VisionOptions
    batch_size: int


@dataclass(frozen=True)
class AudioJob:
    source: opts.Source
    model_path: str  # empty: LORAMESH_AUDIO_MODEL or the default
    options: AudioOptions


def caption_job(fields: Mapping[str, Any], settings: Settings) -> CaptionJob:
    bad = Violations()
    source = opts.one_source(bad, {name: fields.get(name) for name in opts.INPUTS})
    options = opts.vision_options(bad, fields, settings.models)
    count, sample_method, combine_method = opts.video_settings(bad, fields, source,
                                                               settings.media.max_video_frames)
    audio_options = _audio_options(bad, fields, "audio_", options.seed) if fields.get("do_audio") else None
    opts.check_model_path(bad, fields.get("model_path"), "model_path", settings.model_roots)
    opts.check_model_path(bad, fields.get("audio_model_path"), "audio_model_path", settings.model_roots)
    bad.raise_if_any()
    return CaptionJob(source, options, count, sample_method, combine_method, fields.get("audio_model_path", ""),
                      audio_options)


def batch_job(fields: Mapping[str, Any], settings: Settings) -> BatchJob:
    bad = Violations()
    sources = [opts.Source(f"image_paths[{i}]", p, is_url=False, is_video=False)
               for i, p in enumerate(fields.get("image_paths", ()))]
    sources += [opts.Source(f"image_urls[{i}]", u, is_url=True, is_video=False)
                for i, u in enumerate(fields.get("image_urls", ()))]
    if bad.require(bool(sources), "image_paths", "at least one image path or URL is required"):
        bad.require(len(sources) <= MAX_BATCH_IMAGES, "image_paths",
                    f"at most {MAX_BATCH_IMAGES} images per call (got {len(sources)})")
    nested = fields.get("options", {})
    options = opts.vision_options(bad, nested, settings.models, prefix="options.")
    opts.check_model_path(bad, nested.get("model_path"), "options.model_path", settings.model_roots)
    # 0 asks for the default, as an unset batch_size does.
    batch_size = bad.integer("batch_size", fields.get("batch_size") or None, DEFAULT_BATCH_SIZE, 1, MAX_BATCH_SIZE)
    bad.raise_if_any()
    return BatchJob(sources, options, batch_size)


def audio_job(fields: Mapping[str, Any], settings: Settings) -> AudioJob:
    bad = Violations()
    source = opts.one_source(bad, {name: fields.get(name) for name in AUDIO_INPUTS})
    options = _audio_options(bad, fields, "", bad.integer("seed", fields.get("seed")))
    opts.check_model_path(bad, fields.get("model_path"), "model_path", settings.model_roots)
    bad.raise_if_any()
    return AudioJob(source, fields.get("model_path", ""), options)


def _audio_options(bad: Violations, fields: Mapping[str, Any], prefix: str, seed: int | None) -> AudioOptions:
    """AudioOptions from `<prefix>prompt`, `<prefix>max_new_tokens`, ...; bad ones go to `bad`."""
    given = {name: fields[prefix + name] for name in _AUDIO_SETTINGS if fields.get(prefix + name) is not None}
    options = AudioOptions(**given, prompt=fields.get(prefix + "prompt") or DEFAULT_AUDIO_PROMPT, seed=seed)
    options.check(prefix, bad)
    return options
