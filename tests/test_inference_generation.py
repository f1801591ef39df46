"""The generation engine on tiny SD1.5, SDXL, Flux, Flux Kontext and Z-Image pipelines: every
catalog model draws the asked size reproducibly and exactly as plain diffusers does, LoRAs
hot-swap without reloading anything, img2img/inpainting work, progress and cancellation
reach the caller, and requests a model cannot run are refused with what would work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FluxPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    ZImagePipeline,
)
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from PIL import Image
from safetensors.torch import save_file

from services.common import architectures
from services.common.errors import InvalidInput, Violations
from services.common.residency import Residency
from services.common.settings import Settings
from services.inference import catalog, pipelines, samplers
from services.inference.generation import Cancelled, LoraWeight, check_image
from services.inference.job_spec import ImageSpec
from services.inference.pipelines import LoadedPipeline, PipelineHost
from tinymodels import diffusion as tiny_diffusion

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FOLDERS = {"sd15": "sd15", "sdxl": "sdxl", "flux": "flux", "flux_kontext": "flux", "zimage_turbo": "zimage"}


def _lora_state(module: torch.nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A random (non-zero) LoRA on `module`'s `targets`, as peft saves it."""
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), module)
    return get_peft_model_state_dict(module)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a thread team, and a team spinning on a busy machine
    makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generation")
    folders = {
        "sd15": tiny_diffusion.build_sd15(root / "sd15"),
        "sdxl": tiny_diffusion.build_sdxl(root / "sdxl"),
        "flux": tiny_diffusion.build_flux(root / "flux"),
        "zimage": tiny_diffusion.build_zimage(root / "zimage"),
    }
    # Two SDXL LoRAs in the layouts the trainer writes: diffusers/peft keys (UNet only) and
    # kohya's lora_unet_/lora_te1_ keys with alphas (UNet and first text encoder).
    donor = tiny_diffusion.tiny_sdxl_pipeline(0)
    unet = _lora_state(donor.unet, ["to_q", "to_k", "to_v", "to_out.0"], seed=1)
    save_file({f"unet.{k}": v.contiguous() for k, v in unet.items()}, root / "peft_lora.safetensors")
    donor = tiny_diffusion.tiny_sdxl_pipeline(0)
    unet = _lora_state(donor.unet, ["to_q", "to_v", "proj_in", "proj_out"], seed=2)
    text = _lora_state(donor.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], seed=3)
    kohya = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in unet.items()},
                                         **{f"text_encoder.{k}": v for k, v in text.items()}})
    kohya = {k: torch.tensor(4.0) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    save_file(kohya, root / "kohya_lora.safetensors")
    folders["peft_lora"] = root / "peft_lora.safetensors"
    folders["kohya_lora"] = root / "kohya_lora.safetensors"
    return folders


@pytest.fixture(scope="module")
def models_env(built):
    with pytest.MonkeyPatch.context() as patch:
        for model_id, folder in FOLDERS.items():
            patch.setenv(f"LORAMESH_MODEL_{model_id.upper()}", str(built[folder]))
        yield


def model_sources():
    """LORAMESH_MODEL_* as the service reads them at start-up."""
    return Settings.load().models


def load(model_id: str) -> LoadedPipeline:
    model = catalog.CATALOG[model_id]
    return LoadedPipeline(model_id, model.architecture,
                          catalog.load_catalog_pipeline(model, model_sources(), torch.device("cpu"), torch.float32,
                                                        None))


@pytest.fixture(scope="module")
def sdxl(models_env) -> LoadedPipeline:
    return load("sdxl")


def penultimate_clip_layer(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    return pipe.text_encoder.final_layer_norm(hidden)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def draw(loaded: LoadedPipeline, progress: list | None = None, images: dict | None = None, **fields) -> Image.Image:
    fields = {"prompt": "a red disc on a blue background", "width": 64, "height": 64, "steps": 3, "seed": 5,
              **fields}
    return loaded.generate(ImageSpec(**fields),
                           lambda step, total: progress is not None and progress.append((step, total)), images or {})


# The video models make videos: tests/test_inference_wan22.py.
@pytest.mark.parametrize("model_id", [i for i, model in catalog.CATALOG.items() if not model.is_video_model])
def test_every_catalog_image_model_draws_the_asked_size_reproducibly(models_env, built, model_id):
    model = catalog.CATALOG[model_id]
    assert catalog.model_source(model, model_sources()) == str(built[FOLDERS[model_id]])
    loaded = load(model_id)
    width, height = 64, 3 * model.resolution_divisor  # not square: width and height both reach the model
    control = {"ctrl_0": Image.new("RGB", (40, 40), (200, 30, 30))} if model.requires_control_image else {}
    request = dict(width=width, height=height, guidance_scale=model.default_guidance_scale,
                   control="ctrl_0" if control else None, images=control)
    violations = Violations()
    check_image(model.architecture, ImageSpec("x", width=width, height=height, control=request["control"]), violations)
    assert not violations
    first = draw(loaded, **request)
    again = draw(loaded, **request)
    other_seed = draw(loaded, **request, seed=6)
    assert first.size == (width, height)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other_seed.tobytes()
    assert pixels(first).std() > 1.0


def test_base_model_defaults_to_the_hub_id_without_an_override(monkeypatch):
    monkeypatch.delenv("LORAMESH_MODEL_FLUX", raising=False)
    assert catalog.model_source(catalog.CATALOG["flux"], model_sources()) == "black-forest-labs/FLUX.1-dev"
    monkeypatch.setenv("LORAMESH_MODEL_FLUX", "someone/flux-finetune")
    assert catalog.model_source(catalog.CATALOG["flux"], model_sources()) == "someone/flux-finetune"


def test_images_equal_the_plain_diffusers_pipeline_with_the_same_arguments(models_env, built, sdxl):
    generator = lambda: torch.Generator("cpu").manual_seed(5)  # noqa: E731
    common = dict(prompt="a red disc", width=64, height=48, num_inference_steps=4)

    plain = StableDiffusionXLPipeline.from_pretrained(built["sdxl"])
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = EulerAncestralDiscreteScheduler.from_config(plain.scheduler.config)
    expected = plain(**common, negative_prompt="blurry", guidance_scale=6.0, generator=generator()).images[0]
    ours = draw(sdxl, prompt="a red disc", negative_prompt="blurry", width=64, height=48, steps=4,
                guidance_scale=6.0)
    assert ours.tobytes() == expected.tobytes()

    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, algorithm_type="dpmsolver++",
                                                              solver_order=2, use_karras_sigmas=True)
    expected = plain(**common, guidance_scale=6.0, generator=generator()).images[0]
    ours = draw(sdxl, prompt="a red disc", width=64, height=48, steps=4, guidance_scale=6.0,
                sampler="dpm++2m", scheduler="karras")
    assert ours.tobytes() == expected.tobytes()

    # sd.cpp's clip_skip 3 on SDXL (two layers dropped) is diffusers' clip_skip 1 there.
    expected = plain(**common, guidance_scale=6.0, clip_skip=1, generator=generator()).images[0]
    ours = draw(sdxl, prompt="a red disc", width=64, height=48, steps=4, guidance_scale=6.0, clip_skip=3,
                sampler="dpm++2m", scheduler="karras")
    assert ours.tobytes() == expected.tobytes()

    # SD1.5's clip_skip 2: the penultimate CLIP layer through the final layer norm, for the
    # prompt and the (empty) negative prompt alike.
    plain15 = StableDiffusionPipeline.from_pretrained(built["sd15"])
    plain15.set_progress_bar_config(disable=True)
    plain15.scheduler = EulerAncestralDiscreteScheduler.from_config(plain15.scheduler.config)
    with torch.no_grad():
        embeds = [penultimate_clip_layer(plain15, text) for text in ("a red disc", "")]
        expected = plain15(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], width=64, height=48,
                           num_inference_steps=4, guidance_scale=7.0, generator=generator()).images[0]
    sd15 = load("sd15")
    ours = draw(sd15, prompt="a red disc", width=64, height=48, steps=4, guidance_scale=7.0, clip_skip=2)
    assert ours.tobytes() == expected.tobytes()
    default = draw(sd15, prompt="a red disc", width=64, height=48, steps=4, guidance_scale=7.0)
    assert ours.tobytes() != default.tobytes()
    assert draw(sd15, prompt="a red disc", width=64, height=48, steps=4, guidance_scale=7.0,
                clip_skip=1).tobytes() == default.tobytes()

    # Flux: guidance_scale is the distilled guidance; the T5 prompt length is the tokenizer's.
    plain_flux = FluxPipeline.from_pretrained(built["flux"])
    plain_flux.set_progress_bar_config(disable=True)
    expected = plain_flux(**common, guidance_scale=4.0, generator=generator()).images[0]
    ours = draw(load("flux"), prompt="a red disc", width=64, height=48, steps=4, guidance_scale=4.0)
    assert ours.tobytes() == expected.tobytes()

    # Z-Image: the guidance reaches diffusers as it is (the /v1 API's promise; the generation
    # server turns its cfg_scale into this first, submissions.parse_server).
    plain_zimage = ZImagePipeline.from_pretrained(built["zimage"])
    plain_zimage.set_progress_bar_config(disable=True)
    zimage = load("zimage_turbo")
    for guidance in (0.0, 1.0):
        expected = plain_zimage(**common | {"height": 64}, guidance_scale=guidance, generator=generator()).images[0]
        ours = draw(zimage, prompt="a red disc", width=64, height=64, steps=4, guidance_scale=guidance)
        assert ours.tobytes() == expected.tobytes()


def test_vae_tiling_of_one_image_decodes_in_tiles_and_leaves_the_model_as_loaded(built, sdxl):
    untiled = draw(sdxl, width=128, height=128)
    tiled = draw(sdxl, width=128, height=128, vae_tiling=[64, 64, 0.25])
    assert tiled.size == untiled.size and tiled.tobytes() != untiled.tobytes()
    assert np.abs(pixels(tiled) - pixels(untiled)).mean() < 40  # the same picture, blended at the seams
    assert not sdxl.pipe.vae.use_tiling
    assert draw(sdxl, width=128, height=128).tobytes() == untiled.tobytes()


def test_loras_hot_swap_without_reloading_and_scale_zero_is_the_base_model(built, sdxl, monkeypatch):
    loads = []
    original = sdxl.pipe.load_lora_weights
    monkeypatch.setattr(sdxl.pipe, "load_lora_weights", lambda *a, **k: (loads.append(a[0]), original(*a, **k))[1])
    unet = sdxl.pipe.unet
    peft_lora, kohya_lora = built["peft_lora"], built["kohya_lora"]

    sdxl.set_loras([])
    base = draw(sdxl)
    sdxl.set_loras([LoraWeight(peft_lora, 1.0)])
    peft_full = draw(sdxl)
    sdxl.set_loras([LoraWeight(peft_lora, 0.5)])
    peft_half = draw(sdxl)
    sdxl.set_loras([LoraWeight(peft_lora, 0.0)])
    peft_zero = draw(sdxl)
    assert len(loads) == 1  # a changed scale only re-weights
    assert np.abs(pixels(peft_full) - pixels(base)).mean() > 1.0
    assert peft_half.tobytes() not in (base.tobytes(), peft_full.tobytes())
    assert peft_zero.tobytes() == base.tobytes()

    sdxl.set_loras([LoraWeight(kohya_lora, 1.0)])
    kohya_full = draw(sdxl)
    assert np.abs(pixels(kohya_full) - pixels(base)).mean() > 1.0
    sdxl.set_loras([LoraWeight(peft_lora, 1.0)])
    assert draw(sdxl).tobytes() == peft_full.tobytes()  # switching back: the same adapter, same image
    sdxl.set_loras([LoraWeight(peft_lora, 0.8), LoraWeight(kohya_lora, 0.8)])
    both = draw(sdxl)
    assert both.tobytes() not in (base.tobytes(), peft_full.tobytes(), kohya_full.tobytes())
    sdxl.set_loras([])
    assert draw(sdxl).tobytes() == base.tobytes()
    assert len(loads) == 2 and sdxl.pipe.unet is unet  # each file loaded once, base model never reloaded
    assert len(sdxl.adapters()) == 2


def test_the_least_recently_used_adapters_make_room(built, sdxl, monkeypatch, tmp_path):
    sdxl.set_loras([])
    base = draw(sdxl)
    sdxl.set_loras([LoraWeight(built["peft_lora"], 1.0)])
    peft_image = draw(sdxl)
    monkeypatch.setattr(pipelines, "MAX_ADAPTERS", 1)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(built["peft_lora"].read_bytes())
    sdxl.set_loras([LoraWeight(copy, 1.0)])  # another file: loaded, the others unloaded
    assert len(sdxl.adapters()) == 1 and draw(sdxl).tobytes() == peft_image.tobytes()
    sdxl.set_loras([LoraWeight(built["peft_lora"], 1.0)])
    assert len(sdxl.adapters()) == 1 and draw(sdxl).tobytes() == peft_image.tobytes()
    sdxl.set_loras([])
    assert draw(sdxl).tobytes() == base.tobytes()


def test_a_missing_or_foreign_lora_file_is_refused(tmp_path, sdxl):
    from services.common.errors import NotFound

    with pytest.raises(NotFound, match="missing.safetensors"):
        sdxl.set_loras([LoraWeight(tmp_path / "missing.safetensors", 1.0)])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"something.else.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(InvalidInput) as caught:
        sdxl.set_loras([LoraWeight(foreign, 1.0)])
    assert caught.value.violations[0][0] == "loras"
    sdxl.set_loras([])
    assert draw(sdxl).size == (64, 64)


@pytest.mark.parametrize("model_id", ["sd15", "flux", "zimage_turbo"])
def test_img2img_and_inpainting_give_the_asked_size_and_run_fewer_steps(models_env, model_id):
    loaded = load(model_id)
    guidance = catalog.CATALOG[model_id].default_guidance_scale
    init = Image.new("RGB", (100, 70), (30, 160, 60))
    mask = Image.new("L", (100, 70), 0)
    mask.paste(255, (20, 20, 60, 50))
    for mask_image in (None, mask):
        steps: list = []
        image = draw(loaded, steps, steps=4, width=64, height=32 if model_id == "sd15" else 48,
                     guidance_scale=guidance, init="init", mask="mask" if mask_image else None, strength=0.5,
                     images={"init": init, "mask": mask})
        assert image.size == (64, 32 if model_id == "sd15" else 48)
        assert steps == [(1, 2), (2, 2)]
    assert loaded.variant("img2img").transformer is loaded.pipe.transformer if model_id != "sd15" else True


def test_on_step_reports_every_step_and_cancelling_stops_the_run(sdxl):
    steps: list = []
    draw(sdxl, steps, steps=4)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    steps = []
    draw(sdxl, steps, steps=3, sampler="heun")  # second-order: 2n - 1 model evaluations
    assert steps == [(i, 5) for i in range(1, 6)]

    seen = []

    def cancel_at_two(step, total):
        seen.append(step)
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        sdxl.generate(ImageSpec("a disc", width=64, height=64, steps=10), cancel_at_two)
    assert seen == [1, 2]


def test_unsupported_sampler_pairs_are_refused_with_the_pairs_that_work(sdxl):
    with pytest.raises(InvalidInput) as caught:
        draw(sdxl, sampler="ipndm")
    field, description = caught.value.violations[0]
    assert field == "sampler"
    assert "euler_a with discrete" in description and "dpm++2m with discrete, karras" in description

    violations = Violations()
    samplers.check("Flux", "euler_a", "discrete", violations, "prompts[0].sampler", "prompts[0].scheduler")
    samplers.check("Flux", "euler", "ays", violations, "prompts[1].sampler", "prompts[1].scheduler")
    samplers.check("Flux", "flowmatch", "simple", violations)  # the /v1 alias
    samplers.check("SDXL", "flowmatch", "discrete", violations, "prompts[2].sampler")
    samplers.check("SDXL", "euler", "wobbly", violations, "s", "prompts[3].scheduler")
    fields = [field for field, _ in violations._items]
    assert fields == ["prompts[0].sampler", "prompts[1].scheduler", "prompts[2].sampler", "prompts[3].scheduler"]
    assert all("euler with discrete" in d for _, d in violations._items[:2])
    assert architectures.SDXL.default_sampler == ("euler_a", "discrete")
    assert architectures.ZIMAGE.default_sampler == ("euler", "discrete")
    assert len(samplers.SAMPLERS) == 12 and len(samplers.SCHEDULERS) == 9


def test_every_listed_sampler_pair_draws_an_image(models_env):
    """The pairs offered are the pairs that run: each draws a finite, non-blank picture."""
    for model_id in ("sd15", "zimage_turbo"):
        loaded = load(model_id)
        guidance = catalog.CATALOG[model_id].default_guidance_scale
        for sampler, scheduler in samplers.supported(loaded.architecture):
            image = pixels(draw(loaded, steps=2, sampler=sampler, scheduler=scheduler, guidance_scale=guidance))
            assert np.isfinite(image).all() and image.std() > 1.0, (model_id, sampler, scheduler)
    assert ("euler", "smoothstep") in samplers.supported("Z-Image")


def test_check_request_flags_what_the_architecture_cannot_do():
    def fields(architecture: str, **request) -> list[str]:
        violations = Violations()
        check_image(architecture, ImageSpec("x", **request), violations, prefix="prompts[0].")
        return [field for field, _ in violations._items]

    assert fields("SDXL", width=72, height=64) == []
    assert fields("Flux", width=72, height=64) == ["prompts[0].width"]
    assert fields("Z-Image", width=64, height=40) == ["prompts[0].height"]
    assert fields("SD1.5", width=512, height=500) == ["prompts[0].height"]
    assert fields("Flux", width=64, height=64, clip_skip=2) == ["prompts[0].clip_skip"]
    assert fields("Flux", width=64, height=64, clip_skip=-1) == []
    assert fields("SDXL", width=64, height=64, clip_skip=1) == ["prompts[0].clip_skip"]
    assert fields("SDXL", width=64, height=64, control="ctrl_0") == ["prompts[0].control"]
    assert fields("SDXL", width=64, height=64, mask="mask") == ["prompts[0].mask"]
    assert fields("Flux Kontext", width=64, height=64, init="init") == ["prompts[0].init"]
    assert fields("SD1.5", width=64, height=64, sampler="tcd", scheduler="karras") == ["prompts[0].scheduler"]
    assert fields("SD1.5", width=64, height=64, init="init", steps=4, strength=0.2) == ["prompts[0].strength"]
    assert fields("SD1.5", width=64, height=64, init="init", steps=4, strength=0.25) == []


def test_the_host_keeps_one_pipeline_that_vram_free_releases(models_env):
    residency = Residency()
    host = PipelineHost(torch.device("cpu"), torch.float32, residency)
    loads = []

    def loader(model_id):
        def load_pipeline():
            loads.append(model_id)
            model = catalog.CATALOG[model_id]
            return catalog.load_catalog_pipeline(model, model_sources(), torch.device("cpu"), torch.float32, None)
        return load_pipeline

    first = host.get("sd15", "SD1.5", loader("sd15"))
    assert host.get("sd15", "SD1.5", loader("sd15")) is first and loads == ["sd15"]
    assert host.loaded() is first
    assert [(r.name, r.device) for r in residency.resident()] == [("sd15", "cpu")]
    assert residency.total_bytes > 0

    second = host.get("flux", "Flux", loader("flux"))
    assert [r.name for r in residency.resident()] == ["flux"] and host.loaded() is second

    freed = residency.free_all()  # what /vram/free does
    assert [f.name for f in freed] == ["flux"] and host.loaded() is None
    host.get("flux", "Flux", loader("flux"))
    assert loads == ["sd15", "flux", "flux"]
    assert host.unload().name == "flux" and host.loaded() is None and residency.resident() == []


def test_a_lora_the_trainer_saved_in_kohya_layout_hot_swaps_in(built, sdxl, tmp_path):
    from services.trainer.engine import RunInputs, TrainingRun
    from services.trainer.job_config import parse_job_config

    dataset = tiny_diffusion.build_dataset(tmp_path / "dataset", count=4)
    job = parse_job_config({"job": "extension", "config": {"name": "run", "process": [{
        "type": "diffusion_trainer", "training_folder": str(tmp_path), "device": "cpu", "trigger_word": "TOK",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "fp32", "save_format": "safetensors"},
        "datasets": [{"folder_path": str(dataset), "resolution": [64], "caption_dropout_rate": 0.0}],
        "train": {"batch_size": 2, "steps": 2, "lr": 2e-2, "optimizer": "adamw", "seed": 7,
                  "train_text_encoder": True, "text_encoder_lr": 1e-3, "gradient_checkpointing": False},
        "model": {"name_or_path": str(built["sdxl"]), "arch": "sdxl"},
    }]}})
    run = TrainingRun(job, RunInputs(model_source=str(built["sdxl"]), single_file_config=None,
                                     training_folder=tmp_path, dataset_folders=[dataset], mask_folders=[None],
                                     device="cpu"), max_steps=2)
    run.load()
    for _ in range(2):
        run.train_step()
    checkpoint = run.save_checkpoint().path

    sdxl.set_loras([])
    base = draw(sdxl, prompt="TOK, a disc")
    sdxl.set_loras([LoraWeight(checkpoint, 1.0)])
    assert np.abs(pixels(draw(sdxl, prompt="TOK, a disc")) - pixels(base)).mean() > 0.5
    sdxl.set_loras([LoraWeight(checkpoint, 0.0)])
    assert draw(sdxl, prompt="TOK, a disc").tobytes() == base.tobytes()
    sdxl.set_loras([])
