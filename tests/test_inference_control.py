"""ControlNet and EasyCache on the generation server, through the gateway on the tiny models
root: the documented ControlNet example (a ControlNet loaded with the model, a pre-processed
control image per request), equal to diffusers' own ControlNet pipeline; EasyCache on a Flux
transformer for one job only; and the requests that cannot be honoured."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    EulerAncestralDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageFilter

from tests.conftest import violated_fields
from tests.test_inference_server import txt2img, wait_job

SD15 = {"model_name": "SD1x/tiny-sd15.safetensors", "model_type": "checkpoint"}
SD15_CANNY = {**SD15, "controlnet": "control_v11p_sd15_canny.safetensors"}
FLUX = {"model_name": "tiny-flux.safetensors", "model_type": "diffusion", "vae": "tiny-flux-ae.safetensors",
        "clip_l": "tiny-clip_l.safetensors", "t5xxl": "tiny-t5xxl.safetensors"}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def load(client: httpx.Client, body: dict) -> dict:
    r = client.post("/models/load", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def b64png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random picture with a few shapes: something with edges to detect."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.BICUBIC)
    pixels = np.asarray(image).copy()
    for _ in range(3):
        x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        pixels[y:y + size[1] // 3, x:x + size[0] // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def canny_edges(image: Image.Image, low: float = 0.1, high: float = 0.25) -> Image.Image:
    """The Canny edge map a client sends as control_image_base64 (the seed's canny_edges.png):
    Gaussian smoothing, Sobel gradients, thinning to local maxima along the gradient, and
    hysteresis between the two thresholds (fractions of the strongest gradient)."""
    gray = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
    padded = np.pad(gray, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[1:-1, :-2]
                                                                        + padded[2:, :-2])
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[:-2, 1:-1]
                                                                        + padded[:-2, 2:])
    magnitude = np.hypot(gx, gy)
    magnitude /= magnitude.max() or 1.0
    direction = (np.round(np.arctan2(gy, gx) / (np.pi / 4)) % 4).astype(int)  # 0: -, 1: /, 2: |, 3: \
    m = np.pad(magnitude, 1)
    h, w = magnitude.shape
    neighbours = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    thin = np.zeros_like(magnitude, dtype=bool)
    for d, ((ay, ax), (by, bx)) in neighbours.items():
        a = m[1 + ay:1 + ay + h, 1 + ax:1 + ax + w]
        b = m[1 + by:1 + by + h, 1 + bx:1 + bx + w]
        thin |= (direction == d) & (magnitude >= a) & (magnitude >= b)
    strong, weak = thin & (magnitude >= high), thin & (magnitude >= low)
    edges = strong
    while True:  # weak pixels join when they touch an edge
        grown = np.pad(edges, 1)
        touching = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                touching |= grown[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        bigger = edges | (weak & touching)
        if (bigger == edges).all():
            break
        edges = bigger
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


def output(outputs_dir, job: dict) -> bytes:
    assert job["status"] == "completed", job
    return (outputs_dir / job["outputs"][0]).read_bytes()


def test_the_documented_controlnet_example_follows_the_control_image(client, outputs_dir, inference_models,
                                                                     tmp_path):
    loaded = load(client, SD15_CANNY)
    assert loaded["loaded_components"]["controlnet"] == "control_v11p_sd15_canny.safetensors"
    assert client.get("/health").json()["loaded_components"]["controlnet"] == "control_v11p_sd15_canny.safetensors"
    photo = picture((64, 96), seed=5)
    edges = canny_edges(photo)
    assert 0.02 < (np.asarray(edges) > 0).mean() < 0.5  # thin edges, not a blank or a filled image
    body = {"prompt": "a beautiful house, detailed architecture", "width": 64, "height": 96, "steps": 4,
            "cfg_scale": 7.0, "seed": 21, "sampler": "euler_a", "scheduler": "discrete"}

    job = txt2img(client, control_image_base64=b64png(edges), control_strength=0.9, **body)
    with_edges = output(outputs_dir, job)
    assert Image.open(io.BytesIO(with_edges)).size == (64, 96)
    assert job["params"]["control_strength"] == 0.9

    # What a user sees: another control image (the raw photo instead of its edges, other edges)
    # steers the same seed elsewhere; strength 0 is the model alone.
    with_photo = output(outputs_dir, txt2img(client, control_image_base64=b64png(photo), **body))
    other_edges = canny_edges(picture((64, 96), seed=6))
    with_other = output(outputs_dir, txt2img(client, control_image_base64=b64png(other_edges), **body))
    assert len({with_edges, with_photo, with_other}) == 3
    at_zero = output(outputs_dir, txt2img(client, control_image_base64=b64png(edges), control_strength=0.0, **body))
    assert at_zero == output(outputs_dir, txt2img(client, **body)) != with_edges

    # Equal to diffusers' own ControlNet pipeline, the file read by its single-file loader with
    # the config of a ControlNet for this UNet.
    config = tmp_path / "controlnet"
    unet = UNet2DConditionModel.from_pretrained(inference_models["sd15_config"] / "unet")
    ControlNetModel.from_unet(unet, load_weights_from_unet=False).save_config(config)
    controlnet = ControlNetModel.from_single_file(inference_models["sd15_controlnet"], config=str(config))
    pipe = StableDiffusionControlNetPipeline.from_single_file(
        inference_models["sd15"], config=str(inference_models["sd15_config"]), controlnet=controlnet,
        safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = pipe(body["prompt"], image=edges, width=64, height=96, num_inference_steps=4, guidance_scale=7.0,
                     controlnet_conditioning_scale=0.9, generator=torch.Generator("cpu").manual_seed(21)).images[0]
    assert b64png(reference) == base64.b64encode(with_edges).decode()


def test_a_control_image_needs_a_controlnet_and_a_controlnet_needs_a_unet_model(client, outputs_dir):
    load(client, SD15)
    edges = b64png(canny_edges(picture((64, 64), seed=5)))
    before = client.get("/queue").json()["total_count"]
    r = client.post("/txt2img", json={"prompt": "a house", "width": 64, "height": 64, "control_image_base64": edges})
    assert r.status_code == 400 and violated_fields(r) == ["control_image_base64"], r.text
    assert "controlnet" in r.json()["error"]
    r = client.post("/txt2img", json={"prompt": "a house", "width": 64, "height": 64, "control_strength": 0.5})
    assert r.status_code == 400 and violated_fields(r) == ["control_strength"], r.text
    assert client.get("/queue").json()["total_count"] == before

    r = client.post("/models/load", json={**FLUX, "controlnet": "control_v11p_sd15_canny.safetensors"})
    assert r.status_code == 400 and violated_fields(r) == ["controlnet"], r.text
    assert "SD1.5" in r.json()["error"]
    # An SDXL ControlNet does not fit the SD1.5 UNet: refused, and the model stays as it was.
    r = client.post("/models/load", json={**SD15, "controlnet": "diffusers_xl_canny_full.safetensors"})
    assert r.status_code == 400 and "diffusers_xl_canny_full" in r.json()["error"], r.text
    health = client.get("/health").json()
    assert health["model_name"] == SD15["model_name"] and health["loaded_components"]["controlnet"] is None


def test_sdxl_controlnet_in_the_diffusers_layout(client, outputs_dir):
    load(client, {"model_name": "tiny-sdxl.safetensors", "controlnet": "diffusers_xl_canny_full.safetensors"})
    body = {"prompt": "a house", "width": 64, "height": 64, "steps": 3, "seed": 4}
    edges = b64png(canny_edges(picture((64, 64), seed=7)))
    steered = output(outputs_dir, txt2img(client, control_image_base64=edges, **body))
    assert output(outputs_dir, txt2img(client, control_image_base64=edges, control_strength=0.0, **body)) != steered
    # Image-to-image with a control image runs diffusers' ControlNet img2img pipeline.
    r = client.post("/img2img", json={**body, "init_image_base64": b64png(picture((64, 64), seed=8)),
                                      "control_image_base64": edges, "strength": 0.5})
    assert r.status_code == 202, r.text
    image = Image.open(io.BytesIO(output(outputs_dir, wait_job(client, r.json()["job_id"]))))
    assert image.size == (64, 64)
    # EasyCache skips transformer blocks: a UNet model has none.
    r = client.post("/txt2img", json={**body, "easycache": True})
    assert r.status_code == 400 and violated_fields(r) == ["easycache"], r.text


def test_easycache_caches_one_job_on_a_transformer(client, outputs_dir):
    load(client, FLUX)
    body = {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 8, "cfg_scale": 1.0, "seed": 3}
    plain = output(outputs_dir, txt2img(client, **body))
    # A high threshold reuses the cached blocks on most steps: close to the full run, not equal.
    job = txt2img(client, easycache=True, easycache_threshold=5.0, easycache_start=0.0, easycache_end=1.0, **body)
    cached = output(outputs_dir, job)
    assert job["params"]["easycache"] is True and job["params"]["easycache_threshold"] == 5.0
    difference = np.abs(np.asarray(Image.open(io.BytesIO(cached)), dtype=float)
                        - np.asarray(Image.open(io.BytesIO(plain)), dtype=float)).mean()
    assert cached != plain and difference < 8.0, difference
    # The documented example's settings (defaults) run too; the next job is uncached again.
    assert txt2img(client, easycache=True, **body)["status"] == "completed"
    assert output(outputs_dir, txt2img(client, **body)) == plain

    bad = client.post("/txt2img", json={**body, "easycache": True, "easycache_start": 0.9, "easycache_end": 0.5})
    assert bad.status_code == 400 and violated_fields(bad) == ["easycache_end"], bad.text
    bad = client.post("/txt2img", json={**body, "easycache_threshold": 0.5})
    assert bad.status_code == 400 and violated_fields(bad) == ["easycache_threshold"], bad.text


Z_IMAGE = {"model_name": "z_image_turbo-Q8_0.gguf", "model_type": "diffusion", "vae": "ae.safetensors",
           "llm": "qwen_3_4b.safetensors"}
SD35 = {"model_name": "sd3.5_large.safetensors", "model_type": "checkpoint", "clip_l": "clip_l.safetensors",
        "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}


def test_easycache_on_z_image_and_what_families_without_it_say(client, outputs_dir):
    load(client, Z_IMAGE)
    body = {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 8, "cfg_scale": 1.0, "seed": 3}
    plain = output(outputs_dir, txt2img(client, **body))
    cached = output(outputs_dir, txt2img(client, easycache=True, easycache_threshold=5.0, easycache_start=0.0,
                                         easycache_end=1.0, **body))
    assert cached != plain
    assert output(outputs_dir, txt2img(client, **body)) == plain
    # Z-Image has no guidance embedding and a deterministic sampler: nothing for these to set.
    for field, value in (("distilled_guidance", 5.0), ("eta", 0.5)):
        r = client.post("/txt2img", json={**body, field: value})
        assert r.status_code == 400 and violated_fields(r) == [field], r.text

    load(client, SD35)
    r = client.post("/txt2img", json={**body, "easycache": True})
    assert r.status_code == 400 and violated_fields(r) == ["easycache"], r.text
    assert "SD3" in r.json()["message"] and "Z-Image" in r.json()["message"]

