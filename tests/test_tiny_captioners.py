"""The tiny captioning models reload offline with the classes the captioning service uses
for real weights, generate a few tokens, and do so deterministically when greedy; through the
service's own captioners their captions follow the input, so swapped inputs would show."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from tinymodels import captioners as tiny_captioners  # noqa: E402
from tinymodels.__main__ import BUILDERS  # noqa: E402


def _picture(size=(96, 72), seed=1) -> Image.Image:
    """A non-square, non-uniform picture, so resizing and normalising are exercised."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


def _distinct_pictures() -> list[Image.Image]:
    """Plain red and plain blue, blue stripes, a grey ramp and four random pictures."""
    stripes = np.zeros((60, 80, 3), dtype=np.uint8)
    stripes[:, ::8] = (30, 30, 220)
    ramp = np.repeat(np.linspace(0, 255, 80, dtype=np.uint8)[None, :, None], 60, axis=0).repeat(3, axis=2)
    return [Image.new("RGB", (80, 60), (220, 30, 30)), Image.new("RGB", (80, 60), (30, 30, 220)),
            Image.fromarray(stripes), Image.fromarray(ramp)] + [_picture(seed=seed) for seed in (2, 3, 4, 5)]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _built(tmp_path_factory, build, model_class):
    folder = build(tmp_path_factory.mktemp(build.__name__))
    return folder, model_class.from_pretrained(folder).eval(), transformers.AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def florence2(tmp_path_factory):
    return _built(tmp_path_factory, tiny_captioners.build_florence2, transformers.Florence2ForConditionalGeneration)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return _built(tmp_path_factory, tiny_captioners.build_llava, transformers.LlavaForConditionalGeneration)


@pytest.fixture(scope="module")
def audio_lm(tmp_path_factory):
    return _built(tmp_path_factory, tiny_captioners.build_audio_lm, transformers.Qwen2AudioForConditionalGeneration)


def _generates_repeatably(model, processor, inputs) -> None:
    """Greedy generation gives the same few new tokens twice, and they decode."""
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)
    new_tokens = first[0, inputs["input_ids"].shape[1]:]
    assert 0 < len(new_tokens) <= 8
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_builders_are_registered():
    assert BUILDERS["florence2"] is tiny_captioners.build_florence2
    assert BUILDERS["llava"] is tiny_captioners.build_llava
    assert BUILDERS["audio-lm"] is tiny_captioners.build_audio_lm


def test_florence2_layout_and_processor(florence2):
    folder, model, processor = florence2
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(_files(folder))
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5_000_000
    assert type(processor).__name__ == "Florence2Processor"
    assert model.config.image_token_id == processor.image_token_id


@pytest.mark.parametrize("task", ["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_florence2_generates_deterministically(florence2, task, num_beams):
    _, model, processor = florence2
    image = _picture()
    inputs = processor(text=task, images=image, return_tensors="pt")
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=8, num_beams=num_beams, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=8, num_beams=num_beams, do_sample=False)
    assert torch.equal(first, second)
    assert first.shape[1] > 1
    text = processor.batch_decode(first, skip_special_tokens=False)[0]
    parsed = processor.post_process_generation(text, task=task, image_size=image.size)
    assert isinstance(parsed[task], str)
    assert "<s>" not in parsed[task] and "</s>" not in parsed[task]


def test_llava_chat_template_and_generation(llava):
    folder, model, processor = llava
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(_files(folder))
    messages = [
        {"role": "system", "content": "You are a helpful image captioner."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write a descriptive caption."}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count("<image>") == 1
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    inputs = processor(text=[prompt], images=[_picture()], return_tensors="pt")
    grid = tiny_captioners.LLAVA_IMAGE_SIZE // tiny_captioners.LLAVA_PATCH_SIZE
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == grid * grid
    _generates_repeatably(model, processor, inputs)


def test_audio_lm_processor_and_generation(audio_lm):
    folder, model, processor = audio_lm
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(_files(folder))
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                             {"type": "text", "text": "Describe this sound."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>" in prompt
    t = np.arange(2 * 16000) / 16000
    waveform = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    inputs = processor(text=prompt, audio=[waveform], sampling_rate=16000, return_tensors="pt")
    assert inputs["input_features"].shape[1] == model.config.audio_config.num_mel_bins
    assert int((inputs["input_ids"] == model.config.audio_token_index).sum()) == 50
    _generates_repeatably(model, processor, inputs)


def test_builders_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = load_file(tiny_captioners.build_llava(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(tiny_captioners.build_llava(tmp_path / "b", seed=3) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- through the captioning service's own loading and generation ----


def _vision_captioner():
    from services.captioner.vision import VisionCaptioner
    from services.common.residency import Residency

    return VisionCaptioner(Residency(), torch.device("cpu"))


@pytest.mark.parametrize(("task", "num_beams"), [("<DETAILED_CAPTION>", 3), ("<CAPTION>", 1)])
def test_florence2_captions_follow_the_picture(florence2, task, num_beams):
    """The service's defaults (beam search, up to the decoder's positions) and greedy: each
    picture gets its own caption, the same picture the same one, and a swap shows."""
    from services.captioner.options import VisionOptions

    folder, _, _ = florence2
    options = VisionOptions(model_path=str(folder), task=task, num_beams=num_beams)
    captioner = _vision_captioner()
    pictures = _distinct_pictures()
    captions = captioner.caption(pictures + [pictures[0]], options)
    assert all(captions)
    assert len(set(captions[:-1])) == len(pictures), captions
    assert captions[-1] == captions[0]
    assert captioner.caption([pictures[1], pictures[0]], options) == [captions[1], captions[0]]


@pytest.mark.parametrize("temperature", [0.6, 0.0])
def test_joycaption_captions_follow_the_picture(llava, temperature):
    """Seeded sampling as the service defaults to, and greedy: with the same seed, different
    pictures give different captions from their first few words, and the same picture the
    same caption."""
    from services.captioner.options import JOYCAPTION, VisionOptions

    folder, _, _ = llava
    options = VisionOptions(model_type=JOYCAPTION, model_path=str(folder), max_new_tokens=6,
                            temperature=temperature, seed=0)
    captioner = _vision_captioner()
    pictures = _distinct_pictures()
    # One picture a call, so each is generated from the same seeded state.
    captions = [captioner.caption([picture], options)[0] for picture in pictures]
    assert all(captions)
    assert len(set(captions)) == len(pictures), captions
    assert captioner.caption([pictures[2]], options) == [captions[2]]


@pytest.mark.parametrize("do_sample", [True, False])
def test_audio_lm_captions_follow_the_clip(audio_lm, do_sample):
    """Seeded sampling (the service's default) and greedy: different clips give different
    captions, the same clip the same one."""
    from services.captioner.audio import AudioCaptioner, AudioClip, AudioOptions
    from services.common.residency import Residency

    folder, _, _ = audio_lm
    t = np.arange(2 * 16000) / 16000
    # Two tones, a rising sweep and a click train.
    waves = [0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 3000 * t),
             0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t), 0.8 * (np.arange(len(t)) % 4000 < 40)]
    clips = [AudioClip(w.astype(np.float32), 16000, 2.0) for w in waves]
    options = AudioOptions(max_new_tokens=16, do_sample=do_sample, seed=0)
    captioner = AudioCaptioner(Residency(), "cpu")
    captions = [captioner.caption(clip, str(folder), options) for clip in clips]
    assert all(captions)
    assert len(set(captions)) == len(clips), captions
    assert captioner.caption(clips[1], str(folder), options) == captions[1]
