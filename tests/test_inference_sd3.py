"""SD3 / SD3.5 on the generation server, through the gateway: the document's SD3.5 Large load
and generation examples on the tiny models root, images equal to the plain diffusers
StableDiffusion3Pipeline, and skip-layer guidance (honoured for SD3, refused elsewhere)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

from services.inference import model_loading, samplers
from tests.conftest import violated_fields
from tests.test_inference_server import png, txt2img, wait_job
from tinymodels import diffusion as tiny_diffusion
from tinymodels.diffusion import write_safetensors

# The document's "Load SD3.5 Large with text encoders" body, as written.
SD35_LOAD = {
    "model_name": "sd3.5_large.safetensors",
    "model_type": "checkpoint",
    "clip_l": "clip_l.safetensors",
    "clip_g": "clip_g.safetensors",
    "t5xxl": "t5xxl_fp16.safetensors",
    "options": {"keep_clip_on_cpu": True},
}
PROMPT = "a lovely cat holding a sign says \"Stable diffusion 3.5 Large\""


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sd3_loaded(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        r = client.post("/models/load", json=SD35_LOAD)
        assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain diffusers on the pipeline the tiny SD3.5 files were written from (seed 1)."""
    folder = tiny_diffusion.build_sd3(tmp_path_factory.mktemp("sd3-reference"), seed=1)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_the_sd3_checkpoint_is_detected_with_or_without_its_prefix(inference_models, tmp_path):
    assert model_loading.detect_architecture(inference_models["sd3"]) == "SD3"
    assert model_loading.sd3_layer_count(inference_models["sd3"]) == 3
    # A transformer-only export (ComfyUI's "diffusion_models" files) under bare MMDiT keys.
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(inference_models["sd3"]).items()
            if k.startswith("model.diffusion_model.")}
    assert "joint_blocks.0.x_block.attn.qkv.weight" in bare and "x_embedder.proj.weight" in bare
    path = write_safetensors(bare, tmp_path / "sd3_transformer.safetensors")
    assert model_loading.detect_architecture(path) == "SD3"
    assert model_loading.sd3_layer_count(path) == 3


def test_the_documented_sd35_example_loads_and_generates_the_asked_size(client, sd3_loaded, outputs_dir):
    assert sd3_loaded["success"] is True and sd3_loaded["model_type"] == "checkpoint"
    assert sd3_loaded["loaded_components"] == {
        "vae": None, "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors",
        "t5xxl": "t5xxl_fp16.safetensors", "controlnet": None, "llm": None, "llm_vision": None}
    health = client.get("/health").json()
    assert health["model_architecture"] == "SD3" and health["model_name"] == "sd3.5_large.safetensors"

    # The document's "Generate with SD3.5" body, as written.
    r = client.post("/txt2img", json={"prompt": PROMPT, "width": 1024, "height": 1024, "steps": 20,
                                      "cfg_scale": 4.5, "sampler": "euler"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "completed", job
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 20
    with Image.open(outputs_dir / job["outputs"][0]) as image:
        assert image.size == (1024, 1024)
    assert job["params"]["slg_scale"] == 0.0 and job["params"]["skip_layers"] == [7, 8, 9]


def test_same_seed_same_bytes_equal_to_plain_diffusers(client, sd3_loaded, outputs_dir, reference):
    body = {"prompt": "a red cat", "negative_prompt": "blurry", "width": 96, "height": 64, "steps": 6,
            "cfg_scale": 4.5, "seed": 77}
    first = txt2img(client, **body)
    second = txt2img(client, **body)
    assert first["status"] == second["status"] == "completed", first
    first_bytes = (outputs_dir / first["outputs"][0]).read_bytes()
    assert first_bytes == (outputs_dir / second["outputs"][0]).read_bytes()
    assert Image.open(io.BytesIO(first_bytes)).size == (96, 64)

    expected = reference("a red cat", negative_prompt="blurry", width=96, height=64, num_inference_steps=6,
                         guidance_scale=4.5, generator=torch.Generator("cpu").manual_seed(77)).images[0]
    assert first_bytes == png_bytes(expected)
    other_seed = txt2img(client, **{**body, "seed": 78})
    assert (outputs_dir / other_seed["outputs"][0]).read_bytes() != first_bytes


def test_skip_layer_guidance_changes_the_image_as_diffusers_does(client, sd3_loaded, outputs_dir, reference):
    body = {"prompt": "a red cat", "width": 64, "height": 64, "steps": 8, "cfg_scale": 4.5, "seed": 5}
    plain = txt2img(client, **body, slg_scale=0)
    guided = txt2img(client, **body, slg_scale=2.5, skip_layers=[1])
    assert plain["status"] == guided["status"] == "completed", guided
    guided_bytes = (outputs_dir / guided["outputs"][0]).read_bytes()
    assert guided_bytes != (outputs_dir / plain["outputs"][0]).read_bytes()
    params = guided["params"]
    assert (params["slg_scale"], params["skip_layers"], params["slg_start"], params["slg_end"]) == \
        (2.5, [1], 0.01, 0.2)

    expected = reference("a red cat", width=64, height=64, num_inference_steps=8, guidance_scale=4.5,
                         generator=torch.Generator("cpu").manual_seed(5), skip_guidance_layers=[1],
                         skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.01,
                         skip_layer_guidance_stop=0.2).images[0]
    assert guided_bytes == png_bytes(expected)


def test_every_listed_sampler_pair_draws_an_image(client, sd3_loaded, outputs_dir):
    """The flow-matching pairs offered for SD3 are the pairs that run; no sampler means euler."""
    pairs = sorted(samplers.supported("SD3"))
    assert ("euler", "discrete") in pairs and ("euler", "smoothstep") in pairs
    assert samplers.canonical("SD3", None, None) == ("euler", "discrete")
    for sampler, scheduler in pairs:
        job = txt2img(client, steps=3, seed=3, sampler=sampler, scheduler=scheduler)
        assert job["status"] == "completed", (sampler, scheduler, job)
        with Image.open(outputs_dir / job["outputs"][0]) as image:
            pixels = np.asarray(image, float)
        assert np.isfinite(pixels).all() and pixels.std() > 1.0, (sampler, scheduler)


def test_bad_skip_layer_guidance_and_samplers_are_refused_by_name(client, sd3_loaded, media_dir):
    before = client.get("/queue").json()["total_count"]
    cases = [
        ({"slg_scale": 2.5, "skip_layers": [1, 3]}, "/txt2img", ["skip_layers"]),
        ({"slg_scale": 2.5}, "/txt2img", ["skip_layers"]),  # the document's [7, 8, 9] is beyond 3 layers
        ({"slg_scale": 2.5, "skip_layers": [0], "slg_start": 0.5, "slg_end": 0.2}, "/txt2img", ["slg_end"]),
        ({"slg_scale": 2.5, "skip_layers": [0], "cfg_scale": 1.0}, "/txt2img", ["slg_scale"]),
        ({"slg_scale": -1}, "/txt2img", ["slg_scale"]),
        ({"slg_scale": 2.5, "skip_layers": [0], "init_image_base64": png(Image.new("RGB", (64, 64)))},
         "/img2img", ["slg_scale"]),
        ({"sampler": "euler_a"}, "/txt2img", ["sampler"]),
        ({"width": 72}, "/txt2img", ["width"]),
    ]
    for extra, route, fields in cases:
        r = client.post(route, json={"prompt": "x", "width": 64, "height": 64, "steps": 4, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert violated_fields(r) == fields, (extra, r.text)
    r = client.post("/txt2img", json={"prompt": "x", "slg_scale": 2.5, "skip_layers": [5]})
    assert "layers 0 to 2" in r.json()["message"] and "error" in r.json()
    assert client.get("/queue").json()["total_count"] == before
    # img2img without skip-layer guidance runs (the SD3 image-to-image pipeline).
    init = png(Image.new("RGB", (64, 64), (200, 30, 30)))
    r = client.post("/img2img", json={"prompt": "x", "init_image_base64": init, "width": 64, "height": 64,
                                      "steps": 4, "strength": 0.5, "seed": 1})
    assert r.status_code == 202, r.text
    assert wait_job(client, r.json()["job_id"])["status"] == "completed"


def test_architectures_and_models_list_sd3(client, sd3_loaded):
    arch = client.get("/architectures").json()
    assert arch["architectures"]["SD3"] == {
        "display_name": "Stable Diffusion 3/3.5", "requiredComponents": ["clip_l", "clip_g", "t5xxl"],
        "optionalComponents": ["vae", "lora", "controlnet"],
        "generationDefaults": {"width": 1024, "height": 1024, "steps": 20, "cfg_scale": 4.5}}
    assert arch["current_architecture"] == "SD3"
    listing = client.get("/models").json()
    loaded = [m for m in listing["checkpoints"] if m["name"] == "sd3.5_large.safetensors"]
    assert len(loaded) == 1 and loaded[0]["is_loaded"] is True
    assert {"clip_l.safetensors", "clip_g.safetensors"} <= {m["name"] for m in listing["clip"]}
    assert "t5xxl_fp16.safetensors" in {m["name"] for m in listing["t5"]}
    assert listing["loaded_model"] == "sd3.5_large.safetensors"


def test_skip_layer_guidance_on_an_sdxl_model_is_refused_naming_the_field(client):
    """Last in this file: it swaps the loaded model."""
    r = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"})
    assert r.status_code == 200, r.text
    r = client.post("/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2, "slg_scale": 2.5,
                                      "skip_layers": [7, 8, 9]})
    assert r.status_code == 400, r.text
    assert violated_fields(r) == ["slg_scale"] and "SD3" in r.json()["message"]
    assert txt2img(client, slg_scale=0, skip_layers=[7, 8, 9], slg_start=0.01, slg_end=0.2)["status"] == "completed"
