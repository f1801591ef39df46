"""Audio captioning without gRPC: decoding audio out of audio and video files, checking the
options, and captioning with the tiny Qwen2-Audio model exactly as plain transformers would."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.captioner.audio import (  # noqa: E402
    DEFAULT_AUDIO_MODEL,
    DEFAULT_AUDIO_PROMPT,
    AudioCaptioner,
    AudioClip,
    AudioOptions,
    decode_audio,
)
from services.common.errors import FailedPrecondition, InvalidInput, NotFound  # noqa: E402
from services.common.residency import Residency  # noqa: E402
from services.common.settings import MediaLimits  # noqa: E402

LIMITS = MediaLimits()


def _tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.repeat(wave[None, :], channels, axis=0).astype(np.float32)


def _write_audio(container, stream, rate: int, seconds: float, sample_format: str) -> None:
    samples = _tone(seconds, rate, 2)
    chunk = 1024
    for start in range(0, samples.shape[1], chunk):
        part = samples[:, start:start + chunk]
        frame = av.AudioFrame.from_ndarray(part if sample_format == "fltp" else part.T.reshape(1, -1).copy(),
                                           format=sample_format, layout="stereo")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def _video_stream(container, fps: int = 10):
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    return stream


def _write_video(container, stream, seconds: float, fps: int = 10) -> None:
    for i in range(int(seconds * fps)):
        image = np.full((48, 64, 3), (i * 20) % 255, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    wav = folder / "tone.wav"
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=22050, layout="stereo")
        _write_audio(container, stream, 22050, 1.5, "flt")
    with_audio = folder / "with_audio.mp4"
    with av.open(str(with_audio), "w") as container:
        # Every stream exists before the first packet is written (the header goes out then).
        video = _video_stream(container)
        audio = container.add_stream("aac", rate=44100, layout="stereo")
        _write_video(container, video, 2.0)
        _write_audio(container, audio, 44100, 2.0, "fltp")
    silent = folder / "silent.mp4"
    with av.open(str(silent), "w") as container:
        _write_video(container, _video_stream(container), 1.0)
    garbage = folder / "garbage.mp3"
    garbage.write_bytes(b"this is not audio at all" * 40)
    return {"wav": wav, "mp4": with_audio, "silent": silent, "garbage": garbage}


def test_defaults_follow_the_seed():
    options = AudioOptions()
    assert DEFAULT_AUDIO_MODEL == "mispeech/midashenglm-7b-0804-fp8"
    assert DEFAULT_AUDIO_PROMPT.startswith("Provide a concise but detailed caption of the audio.")
    assert DEFAULT_AUDIO_PROMPT.endswith("focus on the audio events and atmosphere.")
    assert (options.max_new_tokens, options.temperature, options.top_p, options.num_beams) == (256, 0.2, 0.9, 1)
    assert options.do_sample and options.repetition_penalty is None and options.max_audio_seconds is None
    assert options.target_sample_rate == 16000
    options.check()


def test_wav_is_resampled_to_mono_at_the_target_rate(media):
    clip = decode_audio(media["wav"], "audio_path", target_sample_rate=16000, max_seconds=None, limits=LIMITS)
    assert clip.sample_rate == 16000
    assert clip.samples.ndim == 1 and clip.samples.dtype == np.float32
    assert clip.duration_seconds == pytest.approx(1.5, abs=0.02)
    assert len(clip.samples) == pytest.approx(1.5 * 16000, abs=320)
    assert float(np.abs(clip.samples).max()) == pytest.approx(0.3, abs=0.03)
    # Still a 440 Hz tone after resampling.
    spectrum = np.abs(np.fft.rfft(clip.samples))
    assert np.fft.rfftfreq(len(clip.samples), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=2)


def test_bytes_and_max_seconds(media):
    data = media["wav"].read_bytes()
    clip = decode_audio(data, "audio_url", target_sample_rate=8000, max_seconds=0.5, limits=LIMITS)
    assert clip.sample_rate == 8000
    assert len(clip.samples) == 4000
    assert clip.duration_seconds == pytest.approx(0.5)
    capped = decode_audio(data, "audio_url", target_sample_rate=8000, max_seconds=None,
                          limits=MediaLimits(max_video_seconds=0.25))
    assert len(capped.samples) == 2000


def test_video_audio_track_is_extracted(media):
    clip = decode_audio(media["mp4"], "video_path", target_sample_rate=16000, max_seconds=None, limits=LIMITS)
    assert clip.sample_rate == 16000 and clip.samples.ndim == 1
    assert clip.duration_seconds == pytest.approx(2.0, abs=0.1)
    assert np.abs(clip.samples).max() <= 1.0
    cut = decode_audio(media["mp4"], "video_path", target_sample_rate=16000, max_seconds=1.0, limits=LIMITS)
    assert cut.duration_seconds == pytest.approx(1.0)


def test_silent_video_has_no_audio(media):
    assert decode_audio(media["silent"], "video_path", target_sample_rate=16000, max_seconds=None,
                        limits=LIMITS) is None


@pytest.mark.parametrize("as_bytes", [False, True])
def test_garbage_is_invalid_input_naming_the_field(media, as_bytes):
    source = media["garbage"].read_bytes() if as_bytes else media["garbage"]
    with pytest.raises(InvalidInput) as info:
        decode_audio(source, "audio_url", target_sample_rate=16000, max_seconds=None, limits=LIMITS)
    assert info.value.violations[0][0] == "audio_url"
    assert "is not a readable audio or video file" in info.value.violations[0][1]


@pytest.mark.parametrize("changes, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 4097}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.1}, "top_p"),
    ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 17}, "num_beams"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"target_sample_rate": 4000}, "target_sample_rate"),
    ({"target_sample_rate": 96000}, "target_sample_rate"),
    ({"max_audio_seconds": 0.0}, "max_audio_seconds"),
])
def test_each_bad_option_is_named_with_the_prefix(changes, field):
    with pytest.raises(InvalidInput) as info:
        AudioOptions(**changes).check(prefix="audio_")
    assert [name for name, _ in info.value.violations] == ["audio_" + field]


def test_every_bad_option_is_reported_at_once():
    options = AudioOptions(temperature=3.0, top_p=0.0, num_beams=20, max_audio_seconds=-1)
    with pytest.raises(InvalidInput) as info:
        options.check()
    assert {name for name, _ in info.value.violations} == {"temperature", "top_p", "num_beams", "max_audio_seconds"}
    AudioOptions(temperature=0.0, top_p=1.0, repetition_penalty=1.1, max_audio_seconds=0.1).check("audio_")


# ---- captioning with the tiny Qwen2-Audio model ----

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def audio_lm(tmp_path_factory):
    from tinymodels import captioners as tiny_captioners

    return tiny_captioners.build_audio_lm(tmp_path_factory.mktemp("audio-lm"))


@pytest.fixture(scope="module")
def clip(media):
    return decode_audio(media["wav"], "audio_path", target_sample_rate=16000, max_seconds=None, limits=LIMITS)


GREEDY = AudioOptions(prompt="Describe this sound.", max_new_tokens=8, do_sample=False)


def test_greedy_caption_matches_plain_transformers(audio_lm, clip):
    residency = Residency()
    captioner = AudioCaptioner(residency, "cpu")
    first = captioner.caption(clip, str(audio_lm), GREEDY)
    second = captioner.caption(clip, str(audio_lm), GREEDY)
    assert isinstance(first, str) and first == second
    assert [r.name for r in residency.resident()] == [f"audio:{audio_lm}"]

    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(audio_lm).eval()
    processor = transformers.AutoProcessor.from_pretrained(audio_lm)
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                             {"type": "text", "text": "Describe this sound."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, audio=[clip.samples], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert first == expected

    freed = captioner.unload()
    assert [f.name for f in freed] == [f"audio:{audio_lm}"] and freed[0].nbytes > 0
    assert residency.resident() == []
    assert captioner.unload() == []


def test_sampling_with_a_seed_repeats_and_other_rates_and_long_clips_work(audio_lm, media):
    captioner = AudioCaptioner(Residency(), "cpu")
    # 22.05 kHz and 6 s: resampled to the model's rate and cut to its 4 s window.
    long = AudioClip(samples=np.tile(_tone(1.5, 22050, 1)[0], 4), sample_rate=22050, duration_seconds=6.0)
    options = AudioOptions(prompt="Describe this sound.", max_new_tokens=6, seed=7, temperature=0.9,
                           repetition_penalty=1.2)
    assert captioner.caption(long, str(audio_lm), options) == captioner.caption(long, str(audio_lm), options)
    beams = AudioOptions(prompt="Describe this sound.", max_new_tokens=6, do_sample=False, num_beams=2)
    assert isinstance(captioner.caption(long, str(audio_lm), beams), str)
    captioner.unload()


def test_missing_model_is_reported(tmp_path, clip):
    captioner = AudioCaptioner(Residency(), "cpu")
    with pytest.raises(NotFound, match="model_path"):
        captioner.caption(clip, str(tmp_path / "nope"), GREEDY)
    with pytest.raises(NotFound, match="config.json"):
        captioner.caption(clip, str(tmp_path), GREEDY)
    with pytest.raises((NotFound, FailedPrecondition), match="model_path"):
        captioner.caption(clip, "nobody/no-such-audio-model", GREEDY)
    assert captioner.unload() == []
