"""Audio captioning: decoding the audio track of a file into a mono waveform, and captioning
it with an audio language model held by the residency manager. Knows nothing about gRPC."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from services.captioner.options import MAX_PROMPT_CHARS, above_zero
from services.common.errors import FailedPrecondition, InvalidInput, NotFound, Violations
from services.common.residency import Freed, Residency, module_bytes
from services.common.settings import MediaLimits

DEFAULT_AUDIO_MODEL = "mispeech/midashenglm-7b-0804-fp8"
DEFAULT_AUDIO_PROMPT = (
    "Provide a concise but detailed caption of the audio. Describe any speech (content summary if clear), "
    "speaker count, perceived gender/age, tone/emotion, language/accent, and notable non-speech sounds such as "
    "music (genre/instruments/tempo/mood) or environmental noises. If there is no speech, focus on the audio "
    "events and atmosphere."
)

# Audio language models whose classes ship with transformers; anything else needs the repo's own code.
_NATIVE_MODEL_TYPES = frozenset({"qwen2_audio"})


@dataclass(frozen=True)
class AudioOptions:
    prompt: str = DEFAULT_AUDIO_PROMPT
    max_new_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.9
    num_beams: int = 1
    do_sample: bool = True
    repetition_penalty: float | None = None
    target_sample_rate: int = 16000
    max_audio_seconds: float | None = None
    seed: int | None = None

    def check(self, prefix: str = "", bad: Violations | None = None) -> None:
        """Records every bad field in `bad`, or raises one InvalidInput listing them all when
        none is given, so a client fixes them all in one go. `prefix` lets a request that mixes
        image and audio options name its own fields."""
        checks = Violations() if bad is None else bad
        checks.text(prefix + "prompt", self.prompt, required=True, max_length=MAX_PROMPT_CHARS)
        checks.integer(prefix + "max_new_tokens", self.max_new_tokens, low=1, high=4096)
        checks.number(prefix + "temperature", self.temperature, low=0.0, high=2.0)
        above_zero(checks, prefix + "top_p", self.top_p, high=1.0)
        checks.integer(prefix + "num_beams", self.num_beams, low=1, high=16)
        above_zero(checks, prefix + "repetition_penalty", self.repetition_penalty)
        checks.integer(prefix + "target_sample_rate", self.target_sample_rate, low=8000, high=48000)
        above_zero(checks, prefix + "max_audio_seconds", self.max_audio_seconds)
        if bad is None:
            checks.raise_if_any()


@dataclass
class AudioClip:
    samples: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    duration_seconds: float  # after the max_audio_seconds cut


def decode_audio(source: Path | bytes, field: str, *, target_sample_rate: int, max_seconds: float | None,
                 limits: MediaLimits) -> AudioClip | None:
    """The first audio stream as mono float32 at `target_sample_rate`, decoding no further than
    `max_seconds` or the service's duration limit. None when there is no audio stream at all,
    so a silent video can be reported as such rather than as a broken file."""
    cap = limits.max_video_seconds if max_seconds is None else min(max_seconds, limits.max_video_seconds)
    max_samples = max(1, int(round(cap * target_sample_rate)))
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InvalidInput(field, f"is not a readable audio or video file ({exc})") from exc
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        # Channels are averaged here rather than by FFmpeg, whose downmix adds them at +3 dB and
        # would push correlated stereo past [-1, 1].
        resampler = av.AudioResampler(format="fltp", rate=target_sample_rate)
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                total += _collect(resampler.resample(frame), chunks)
                if total >= max_samples:
                    break
            else:
                total += _collect(resampler.resample(None), chunks)
        except (av.FFmpegError, OSError, ValueError) as exc:
            if not total:
                raise InvalidInput(field, f"is not a readable audio or video file ({exc})") from exc
    if not total:
        raise InvalidInput(field, "has an audio stream with no decodable samples")
    samples = np.concatenate(chunks)[:max_samples]
    np.clip(samples, -1.0, 1.0, out=samples)
    return AudioClip(samples=samples, sample_rate=target_sample_rate,
                     duration_seconds=len(samples) / target_sample_rate)


def _collect(frames: list[av.AudioFrame], into: list[np.ndarray]) -> int:
    count = 0
    for frame in frames:
        array = frame.to_ndarray().astype(np.float32, copy=False)
        array = array.mean(axis=0, dtype=np.float32) if frame.format.is_planar else array.reshape(-1)
        into.append(array)
        count += len(array)
    return count


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """The model's feature extractor only accepts its own rate; reuse FFmpeg's resampler for it."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None, :],
                                       format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    chunks: list[np.ndarray] = []
    _collect(resampler.resample(frame), chunks)
    _collect(resampler.resample(None), chunks)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


@dataclass
class _AudioModel:
    model: Any
    processor: Any
    device: str


class AudioCaptioner:
    """Captions audio clips; models load on first use and stay in the residency manager,
    which may evict them, so every call fetches its model again."""

    def __init__(self, residency: Residency, device: str):
        self._residency = residency
        self._device = device
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def caption(self, clip: AudioClip, model_path: str, options: AudioOptions) -> str:
        import torch

        name = f"audio:{model_path}"
        loaded: _AudioModel = self._residency.get(name, lambda: self._load(model_path))
        with self._lock:
            self._names.add(name)
        inputs = self._inputs(loaded, clip, options.prompt)
        kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "num_beams": options.num_beams}
        # Temperature 0 is the limit of sampling: greedy decoding (transformers refuses 0 itself).
        if options.do_sample and options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs["do_sample"] = False
        if options.repetition_penalty is not None:
            kwargs["repetition_penalty"] = options.repetition_penalty
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, **kwargs)
        sequence = output.sequences if hasattr(output, "sequences") else output
        prompt_ids = inputs["input_ids"][0]
        new_tokens = sequence[0]
        # Some remote-code models return only the generated tokens; the rest echo the prompt first.
        if len(new_tokens) >= len(prompt_ids) and torch.equal(new_tokens[: len(prompt_ids)].cpu(), prompt_ids.cpu()):
            new_tokens = new_tokens[len(prompt_ids):]
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def unload(self) -> list[Freed]:
        """Frees every audio model this captioner loaded (ones already evicted are skipped)."""
        with self._lock:
            names, self._names = sorted(self._names), set()
        return [freed for name in names if (freed := self._residency.unload(name)) is not None]

    def _inputs(self, loaded: _AudioModel, clip: AudioClip, prompt: str) -> dict[str, Any]:
        import torch

        processor = loaded.processor
        extractor = getattr(processor, "feature_extractor", None)
        rate = int(getattr(extractor, "sampling_rate", None) or clip.sample_rate)
        samples = clip.samples if rate == clip.sample_rate else _resample(clip.samples, clip.sample_rate, rate)
        # The encoder sees one fixed window; longer audio is captioned from its start.
        window = getattr(extractor, "n_samples", None)
        if window:
            samples = samples[:window]
        messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                                 {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], audio=[samples], sampling_rate=rate, return_tensors="pt")
        dtype = loaded.model.dtype
        out: dict[str, Any] = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to(loaded.device)
            out[key] = value.to(dtype) if value.is_floating_point() else value
        return out

    def _load(self, model_path: str) -> tuple[_AudioModel, str, int]:
        import torch
        import transformers

        from services.common.devices import default_dtype

        local = Path(model_path).expanduser()
        looks_local = local.is_absolute() or model_path.startswith((".", "~"))
        if looks_local and not local.is_dir():
            raise NotFound(f"model_path: no such model folder: {model_path}")
        if local.is_dir() and not (local / "config.json").is_file():
            raise NotFound(f"model_path: {model_path} has no config.json; it is not a transformers model folder")
        source = str(local) if local.is_dir() else model_path
        dtype = default_dtype(torch.device(self._device))
        try:
            config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=True)
        except OSError as exc:
            raise NotFound(f"model_path: audio model {model_path!r} was not found locally, in the Hugging Face "
                           f"cache or on the hub ({exc})") from exc
        except ValueError as exc:
            raise FailedPrecondition(f"model_path: {model_path!r} is not a loadable audio model ({exc})") from exc
        try:
            if config.model_type in _NATIVE_MODEL_TYPES:
                model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(source, dtype=dtype)
                processor = transformers.AutoProcessor.from_pretrained(source)
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=True)
                processor = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=True)
        except OSError as exc:
            raise NotFound(f"model_path: files of audio model {model_path!r} are missing ({exc})") from exc
        except (ValueError, ImportError, KeyError) as exc:
            raise FailedPrecondition(f"model_path: audio model {model_path!r} could not be loaded ({exc})") from exc
        model = model.to(self._device).eval()
        return _AudioModel(model, processor, self._device), self._device, module_bytes(model)
