"""The tiny diffusion builders: each folder reloads offline through the same diffusers entry
points real weights use and generates deterministically; the single-file SDXL checkpoint
converts back to exactly the diffusers folder's weights; the dataset has the promised files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinymodels import diffusion as tiny_diffusion
from tinymodels.__main__ import BUILDERS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "TOK, a red disc on a blue background"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-diffusion")
    return {
        "sdxl": tiny_diffusion.build_sdxl(root / "sdxl"),
        "sd15": tiny_diffusion.build_sd15(root / "sd15"),
        "flux": tiny_diffusion.build_flux(root / "flux"),
        "single": tiny_diffusion.build_sdxl_single_file(root / "single" / "tiny-sdxl.safetensors"),
    }


def _pipeline_class(family: str):
    import diffusers

    return {"sdxl": diffusers.StableDiffusionXLPipeline, "sd15": diffusers.StableDiffusionPipeline,
            "flux": diffusers.FluxPipeline}[family]


def _generate(pipe, family: str, seed: int) -> Image.Image:
    import torch

    extra = {"max_sequence_length": 32, "guidance_scale": 3.5} if family == "flux" else {}
    result = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                  **extra)
    return result.images[0]


@pytest.mark.parametrize("family", ["sdxl", "sd15", "flux"])
def test_folder_reloads_and_generates_deterministically(built, family):
    pipe = _pipeline_class(family).from_pretrained(built[family])
    assert pipe.vae_scale_factor == 8

    first, again, other = (_generate(pipe, family, seed) for seed in (0, 0, 1))

    assert isinstance(first, Image.Image) and first.size == (64, 64)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_folders_have_the_real_layout(built):
    sdxl = built["sdxl"]
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json"):
        assert (sdxl / name).is_file(), name
    assert not (built["sd15"] / "safety_checker").exists()
    assert (built["flux"] / "tokenizer_2" / "tokenizer.json").is_file()
    assert (built["flux"] / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    total = sum(f.stat().st_size for f in sdxl.rglob("*") if f.is_file())
    assert total < 8_000_000


def test_schedulers_are_configured_like_the_real_models(built):
    import json

    sdxl = json.loads((built["sdxl"] / "scheduler" / "scheduler_config.json").read_text())
    assert sdxl["_class_name"] == "EulerDiscreteScheduler"
    assert (sdxl["beta_schedule"], sdxl["beta_start"], sdxl["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert (sdxl["steps_offset"], sdxl["timestep_spacing"]) == (1, "leading")
    flux = json.loads((built["flux"] / "scheduler" / "scheduler_config.json").read_text())
    assert flux["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (flux["shift"], flux["use_dynamic_shifting"], flux["base_shift"], flux["max_shift"]) == (3.0, True, 0.5, 1.15)
    assert (flux["base_image_seq_len"], flux["max_image_seq_len"]) == (256, 4096)


def test_tokenizers_keep_trigger_words_whole(built):
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(built["sdxl"] / "tokenizer")
    tokens = clip.convert_ids_to_tokens(clip("TOK, ohwx dog on a red background").input_ids)
    assert tokens == ["<|startoftext|>", "tok</w>", ",</w>", "ohwx</w>", "dog</w>", "on</w>", "a</w>", "red</w>",
                      "background</w>", "<|endoftext|>"]
    assert clip("zqxj unheard-of wörds").input_ids[-1] == clip.eos_token_id
    assert CLIPTokenizer.from_pretrained(built["sdxl"] / "tokenizer_2").pad_token == "!"

    t5 = AutoTokenizer.from_pretrained(built["flux"] / "tokenizer_2")
    ids = t5(PROMPT, padding="max_length", max_length=32, truncation=True).input_ids
    assert len(ids) == 32 and t5.eos_token_id in ids and t5.unk_token_id not in ids
    assert t5.convert_ids_to_tokens(t5("TOK ohwx").input_ids) == ["▁TOK", "▁ohwx", "</s>"]
    assert T5TokenizerFast.from_pretrained(built["flux"] / "tokenizer_2")(PROMPT).input_ids == t5(PROMPT).input_ids


def test_single_file_is_detected_as_sdxl_base(built):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    checkpoint = load_file(built["single"])
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in checkpoint)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in checkpoint)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in checkpoint)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in checkpoint
    assert not list(built["single"].parent.glob(".*.tmp"))
    assert built["single"].stat().st_mode & 0o044  # readable beyond the owner, unlike safetensors' default


def test_single_file_gets_its_extension(tmp_path):
    written = tiny_diffusion.build_sdxl_single_file(tmp_path / "model")
    assert written == tmp_path / "model.safetensors" and written.is_file()
    assert (tmp_path / "model-config" / "model_index.json").is_file()


def test_single_file_loads_exactly_the_folder_weights(built):
    import torch
    from diffusers import StableDiffusionXLPipeline

    config_dir = built["single"].parent / "tiny-sdxl-config"
    single = StableDiffusionXLPipeline.from_single_file(built["single"], config=str(config_dir),
                                                        torch_dtype=torch.float32)
    folder = StableDiffusionXLPipeline.from_pretrained(config_dir)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded, expected = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        unequal = [key for key in expected if not torch.equal(loaded[key], expected[key])]
        assert not unequal, (name, unequal[:5])
    assert dict(single.scheduler.config) == dict(folder.scheduler.config)

    image = _generate(single, "sdxl", 0)
    assert np.array_equal(np.asarray(image), np.asarray(_generate(folder, "sdxl", 0)))


def test_builds_are_deterministic(built):
    # The single-file builder wrote its config folder from the same seed as build_sdxl.
    config_dir = built["single"].parent / "tiny-sdxl-config"
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (config_dir / name).read_bytes() == (built["sdxl"] / name).read_bytes(), name


def test_dataset(tmp_path):
    out = tiny_diffusion.build_dataset(tmp_path / "data", seed=3, count=8)

    images = sorted(p for p in out.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) == 8 and {p.suffix for p in images} == {".png", ".jpg"}
    sizes = set()
    for path in images:
        with Image.open(path) as image:
            assert image.mode == "RGB" and all(48 <= side <= 128 for side in image.size)
            sizes.add(image.size)
        with Image.open(out / "masks" / f"{path.stem}.png") as mask:
            assert mask.mode == "L" and mask.size == image.size
            values = np.asarray(mask)
            assert set(np.unique(values)) == {0, 255}
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    captions = sorted(out.glob("*.txt"))
    assert len(captions) == 7
    assert all(c.read_text().startswith("TOK, a") and "background" in c.read_text() for c in captions)

    again = tiny_diffusion.build_dataset(tmp_path / "again", seed=3, count=8)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in images)


def test_registered_for_the_cli():
    for family in ("sdxl", "sd15", "flux", "sdxl-single-file", "dataset"):
        assert family in BUILDERS


def test_position_tables_are_as_long_as_the_real_models(tmp_path):
    """RoPE tables are no weights: the tiny transformers keep the real models' lengths, so the
    documented sizes and a long prompt fit (Wan at 720 px tall, Z-Image's 450-token prompt)."""
    import torch
    from diffusers import WanPipeline, ZImagePipeline

    wan = WanPipeline.from_pretrained(tiny_diffusion.build_wan21(tmp_path / "wan21"))
    frames = wan("a city at night", height=720, width=64, num_frames=5, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(1), output_type="np").frames[0]
    assert frames.shape == (5, 720, 64, 3)
    z_image = ZImagePipeline.from_pretrained(tiny_diffusion.build_zimage(tmp_path / "zimage"))
    prompt = " ".join(["a solitary woman sits on a weathered tree trunk in a quiet forest clearing"] * 30)
    image = z_image(prompt, height=688, width=64, num_inference_steps=1, guidance_scale=0.0,
                    generator=torch.Generator().manual_seed(1)).images[0]
    assert image.size == (64, 688)
