"""Qwen-Image on the generation server, through the gateway: the document's Qwen-Image load and
generation examples on the tiny models root (transformer as city96's Q8_0 GGUF or Comfy-Org's
safetensors, Wan-layout VAE, Qwen2.5-VL text encoder in its release layout), images equal to
the plain diffusers QwenImagePipeline's, cfg_scale as true classifier-free guidance, LoRAs, and
the requests it refuses (by field, before anything loads or queues)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from PIL import Image
from safetensors.torch import load_file

from services.common.settings import ModelSources
from services.inference import model_loading
from services.inference.gguf_files import inspect
from services.inference.model_files import ModelsRoot
from tests.conftest import violated_fields, write_random_lora
from tests.test_inference_control import load
from tests.test_inference_server import png, wait_job
from tinymodels import diffusion as tiny_diffusion
from tinymodels.diffusion import write_safetensors

# The document's "Load Qwen-Image with LLM text encoder" body, its Qwen2.5-VL encoder named as
# the .safetensors release.
QWEN_LOAD = {
    "model_name": "qwen-image-Q8_0.gguf",
    "model_type": "diffusion",
    "vae": "qwen_image_vae.safetensors",
    "llm": "qwen_2.5_vl_7b.safetensors",
    "options": {"offload_to_cpu": True, "flash_attn": True, "flow_shift": 3.0},
}
# The same model with the unquantized transformer (Comfy-Org's safetensors).
QWEN_SAFETENSORS_LOAD = {**QWEN_LOAD, "model_name": "qwen_image_tiny.safetensors"}
# The document's "Generate with Qwen-Image" body, smaller (64x64 instead of 1024x1024).
TXT2IMG_EXAMPLE = {
    "prompt": "A beautiful Chinese woman wearing a T-shirt with the QWEN logo is smiling at the camera",
    "width": 64,
    "height": 64,
    "steps": 20,
    "cfg_scale": 2.5,
    "sampler": "euler",
}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain diffusers on the pipeline the tiny Qwen-Image files were written from (seed 1),
    with the load's flow_shift 3.0 (a fixed shift instead of the resolution-dependent one)."""
    folder = tiny_diffusion.build_qwen_image(tmp_path_factory.mktemp("qwen-image-reference"), seed=1)
    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0,
                                                                 use_dynamic_shifting=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(client: httpx.Client, outputs_dir, **body) -> tuple[dict, bytes]:
    r = client.post("/txt2img", json={**TXT2IMG_EXAMPLE, "steps": 6, **body})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "completed", job
    return job, (outputs_dir / job["outputs"][0]).read_bytes()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------- files and detection


def test_the_transformer_files_are_detected_in_the_layouts_people_download(inference_models, tmp_path):
    path = inference_models["qwen_image"]
    keys = set(load_file(path))
    assert {"img_in.weight", "txt_in.weight", "txt_norm.weight", "transformer_blocks.0.img_mod.1.weight",
            "transformer_blocks.0.attn.add_q_proj.weight", "transformer_blocks.1.img_mlp.net.0.proj.weight",
            "norm_out.linear.weight", "proj_out.weight"} <= keys
    assert model_loading.detect_architecture(path) == "Qwen-Image"
    # city96's GGUF: the same names, linear weights in Q8_0, tagged "qwen_image".
    gguf = inspect(inference_models["qwen_image_gguf"])
    assert set(gguf.tensor_names) == keys and gguf.tensor_types["Q8_0"] > 0
    assert model_loading.detect_architecture(inference_models["qwen_image_gguf"]) == "Qwen-Image"
    # A ComfyUI export carries the model.diffusion_model. prefix.
    prefixed = write_safetensors({"model.diffusion_model." + k: v for k, v in load_file(path).items()},
                                 tmp_path / "qwen_image_prefixed.safetensors")
    assert model_loading.detect_architecture(prefixed) == "Qwen-Image"
    # ... and loads as the bare file does (the components not named come from the config folder).
    (tmp_path / "diffusion_models").mkdir()
    prefixed.rename(tmp_path / "diffusion_models" / prefixed.name)
    plan = model_loading.plan_load(ModelsRoot(tmp_path), {"model_name": prefixed.name, "model_type": "diffusion"})
    pipe = model_loading.load_pipeline(plan, "cpu", torch.float32,
                                       ModelSources(qwen_image_config=str(inference_models["qwen_image_config"])))
    assert type(pipe).__name__ == "QwenImagePipeline"
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in load_file(path).items())
    # The text encoder in Qwen2.5-VL's release layout, the VAE in Wan's.
    llm = set(load_file(inference_models["qwen_image_llm"]))
    assert "model.layers.0.self_attn.q_proj.weight" in llm and "visual.blocks.0.attn.qkv.weight" in llm
    assert "decoder.middle.0.residual.0.gamma" in set(load_file(inference_models["qwen_image_vae"]))


# --------------------------------------------------------------------------- the document's examples


def test_the_documented_example_loads_and_generates_the_asked_size(client, outputs_dir):
    loaded = load(client, QWEN_LOAD)
    assert loaded["success"] is True and loaded["model_type"] == "diffusion"
    assert loaded["loaded_components"] == {
        "vae": "qwen_image_vae.safetensors", "clip_l": None, "clip_g": None, "t5xxl": None, "controlnet": None,
        "llm": "qwen_2.5_vl_7b.safetensors", "llm_vision": None}
    health = client.get("/health").json()
    assert health["model_architecture"] == "Qwen-Image" and health["model_name"] == "qwen-image-Q8_0.gguf"
    assert health["loaded_components"]["llm"] == "qwen_2.5_vl_7b.safetensors"

    r = client.post("/txt2img", json=TXT2IMG_EXAMPLE)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "completed", job
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 20
    assert job["params"]["cfg_scale"] == 2.5 and job["params"]["sampler"] == "euler"
    with Image.open(outputs_dir / job["outputs"][0]) as image:
        assert image.size == (64, 64)
        assert np.asarray(image, float).std() > 1.0


def test_architectures_and_models_list_qwen_image(client):
    load(client, QWEN_SAFETENSORS_LOAD)
    arch = client.get("/architectures").json()
    assert arch["architectures"]["Qwen-Image"] == {
        "display_name": "Qwen-Image", "requiredComponents": ["llm", "vae"], "optionalComponents": ["lora", "controlnet"],
        "generationDefaults": {"width": 1024, "height": 1024, "steps": 20, "cfg_scale": 2.5}}
    assert arch["current_architecture"] == "Qwen-Image"
    listing = client.get("/models").json()
    names = {m["name"]: m for m in listing["diffusion_models"]}
    assert names["qwen_image_tiny.safetensors"]["is_loaded"] is True
    assert names["qwen-image-Q8_0.gguf"]["is_loaded"] is False
    assert "qwen_2.5_vl_7b.safetensors" in {m["name"] for m in listing["llm"]}
    assert "qwen_image_vae.safetensors" in {m["name"] for m in listing["vae"]}


# --------------------------------------------------------------------------- images


def test_same_seed_same_bytes_equal_to_plain_diffusers(client, outputs_dir, reference):
    load(client, QWEN_SAFETENSORS_LOAD)
    body = {"prompt": "a red cat", "negative_prompt": "blurry", "width": 96, "height": 64, "steps": 6,
            "cfg_scale": 2.5, "seed": 77}
    first, first_bytes = generate(client, outputs_dir, **body)
    _, second_bytes = generate(client, outputs_dir, **body)
    assert first_bytes == second_bytes
    assert Image.open(io.BytesIO(first_bytes)).size == (96, 64)

    # cfg_scale is diffusers' true_cfg_scale against the negative prompt.
    expected = reference("a red cat", negative_prompt="blurry", true_cfg_scale=2.5, width=96, height=64,
                         num_inference_steps=6, generator=torch.Generator("cpu").manual_seed(77)).images[0]
    assert first_bytes == png_bytes(expected)
    _, other_seed = generate(client, outputs_dir, **{**body, "seed": 78})
    assert other_seed != first_bytes


def test_cfg_scale_guides_against_the_empty_negative_prompt_and_1_turns_it_off(client, outputs_dir, reference):
    load(client, QWEN_SAFETENSORS_LOAD)
    body = {"prompt": "a red cat", "seed": 5}
    _, guided = generate(client, outputs_dir, **body, cfg_scale=4.0)
    _, unguided = generate(client, outputs_dir, **body, cfg_scale=1.0)
    assert guided != unguided
    args = {"width": 64, "height": 64, "num_inference_steps": 6}
    assert guided == png_bytes(reference("a red cat", negative_prompt="", true_cfg_scale=4.0, **args,
                                         generator=torch.Generator("cpu").manual_seed(5)).images[0])
    assert unguided == png_bytes(reference("a red cat", true_cfg_scale=1.0, **args,
                                           generator=torch.Generator("cpu").manual_seed(5)).images[0])


def test_the_image_follows_the_prompt(client, outputs_dir):
    load(client, QWEN_SAFETENSORS_LOAD)
    _, cat = generate(client, outputs_dir, prompt="a red cat", seed=9)
    _, landscape = generate(client, outputs_dir, prompt="a green mountain landscape at night", seed=9)
    assert np.abs(pixels(cat) - pixels(landscape)).mean() > 2.0


def test_the_q8_0_gguf_transformer_draws_nearly_the_safetensors_image(client, outputs_dir):
    body = {"prompt": "a red cat", "seed": 11}
    load(client, QWEN_SAFETENSORS_LOAD)
    _, full = generate(client, outputs_dir, **body)
    load(client, QWEN_LOAD)
    _, quantized = generate(client, outputs_dir, **body)
    difference = np.abs(pixels(full) - pixels(quantized)).mean()
    assert 0.0 < difference < 3.0, difference


def kohya_lora(diffusers_lora: dict) -> dict:
    """A diffusers-layout LoRA (`transformer.<module>.lora_A.weight`) in kohya's layout, as
    ComfyUI-era trainers save Qwen-Image LoRAs: `lora_unet_<module with _>.lora_down/lora_up`
    and an alpha equal to the rank (scale 1)."""
    out = {}
    for key, value in diffusers_lora.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        flat = "lora_unet_" + module.replace(".", "_")
        down = kind.startswith("A")
        out[flat + (".lora_down.weight" if down else ".lora_up.weight")] = value
        if down:
            out[flat + ".alpha"] = torch.tensor(float(value.shape[0]))
    return out


def test_a_lora_in_the_prompt_changes_the_image(client, outputs_dir, inference_models):
    loras = inference_models["loras"]
    lora = write_random_lora(inference_models["qwen_image_config"], loras / "qwen_image_style.safetensors", seed=3)
    write_safetensors(kohya_lora(load_file(lora)), loras / "qwen_image_style_kohya.safetensors")
    load(client, QWEN_SAFETENSORS_LOAD)
    _, plain = generate(client, outputs_dir, prompt="a red cat", seed=4)
    job, styled = generate(client, outputs_dir, prompt="a red cat <lora:qwen_image_style:1.0>", seed=4)
    assert np.abs(pixels(plain) - pixels(styled)).mean() > 1.0
    assert job["params"]["prompt"] == "a red cat <lora:qwen_image_style:1.0>"
    # The same LoRA in kohya's layout draws the same image.
    assert generate(client, outputs_dir, prompt="a red cat <lora:qwen_image_style_kohya:1.0>", seed=4)[1] == styled
    # Without the tag the adapter is off again.
    assert generate(client, outputs_dir, prompt="a red cat", seed=4)[1] == plain


# --------------------------------------------------------------------------- refusals


def test_bad_loads_are_refused_naming_the_field(client):
    before = client.get("/health").json()
    cases = [
        ({**QWEN_LOAD, "clip_l": "clip_l.safetensors"}, ["clip_l"], "Qwen-Image models have no clip_l"),
        ({**QWEN_LOAD, "model_type": "checkpoint"}, ["model_type"], 'model_type "diffusion"'),
        ({**QWEN_LOAD, "options": {"prediction": "eps"}}, ["options.prediction"], "Qwen-Image"),
        ({**QWEN_LOAD, "llm": "no_such_encoder.safetensors"}, ["llm"], "no_such_encoder"),
        # Z-Image's Qwen3 encoder is not the Qwen2.5-VL Qwen-Image reads prompts with.
        ({**QWEN_LOAD, "llm": "qwen_3_4b.safetensors"}, ["llm"], "qwen_3_4b.safetensors is not a Qwen2.5-VL"),
    ]
    for body, fields, words in cases:
        r = client.post("/models/load", json=body)
        assert r.status_code in (400, 404), (body, r.text)
        assert violated_fields(r) == fields or r.status_code == 404, (body, r.text)
        assert words in r.json()["message"], (body, r.text)
    assert client.get("/health").json()["model_name"] == before["model_name"]


def test_bad_generation_fields_are_refused_by_name(client):
    load(client, QWEN_SAFETENSORS_LOAD)
    before = client.get("/queue").json()["total_count"]
    cases = [
        ({"sampler": "euler_a"}, ["sampler"]),
        ({"width": 72}, ["width"]),
        ({"slg_scale": 2.5}, ["slg_scale"]),
        ({"cfg_scale": -1}, ["cfg_scale"]),
        ({"distilled_guidance": 5.0, "eta": 0.5}, ["distilled_guidance", "eta"]),
    ]
    for extra, fields in cases:
        r = client.post("/txt2img", json={**TXT2IMG_EXAMPLE, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert violated_fields(r) == fields, (extra, r.text)
    assert client.get("/queue").json()["total_count"] == before
    # The documented defaults of those fields are accepted.
    r = client.post("/txt2img", json={**TXT2IMG_EXAMPLE, "steps": 2, "distilled_guidance": 3.5, "eta": 0.0})
    assert r.status_code == 202, r.text
    assert wait_job(client, r.json()["job_id"])["status"] == "completed"


def test_img2img_and_easycache_run_on_qwen_image(client, outputs_dir):
    load(client, QWEN_SAFETENSORS_LOAD)
    init = png(Image.new("RGB", (64, 64), (200, 30, 30)))
    r = client.post("/img2img", json={**TXT2IMG_EXAMPLE, "steps": 4, "init_image_base64": init, "strength": 0.5,
                                      "seed": 1})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "completed", job
    redder = pixels((outputs_dir / job["outputs"][0]).read_bytes())
    _, plain = generate(client, outputs_dir, steps=4, seed=1)
    # Half the schedule starts from the red picture: the result keeps more of its red.
    assert (redder[..., 0] - redder[..., 1]).mean() > (pixels(plain)[..., 0] - pixels(plain)[..., 1]).mean()

    _, cached = generate(client, outputs_dir, seed=1, easycache=True, easycache_threshold=0.2)
    _, full = generate(client, outputs_dir, seed=1)
    assert pixels(cached).std() > 1.0 and np.abs(pixels(cached) - pixels(full)).mean() < 20.0
