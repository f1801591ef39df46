"""ControlNets on the transformer families of the generation server, through the gateway on the
tiny models root: a Flux ControlNet-Union in diffusers' layout (no config beside it) and a
Z-Image Fun-Controlnet-Union in its released layout, each loaded with its model and steering
txt2img exactly as diffusers' own ControlNet pipeline does; and the ControlNets and requests
that do not fit."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from diffusers import (
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    GGUFQuantizationConfig,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import violated_fields
from tests.test_inference_control import FLUX, Z_IMAGE, b64png, canny_edges, load, output, picture
from tests.test_inference_server import txt2img
from tinymodels import diffusion as tiny_diffusion

FLUX_CONTROLNET = "FLUX.1-dev-Controlnet-Union.safetensors"
Z_IMAGE_CONTROLNET = "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"
BODY = {"prompt": "a beautiful house, detailed architecture", "width": 96, "height": 64, "steps": 3, "seed": 21,
        "cfg_scale": 1.0}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def steered_and_plain(client, outputs_dir, control: Image.Image) -> tuple[bytes, bytes]:
    """The image with the control image at strength 0.8, after checking what a user sees: the
    asked size, other control images steer elsewhere, strength 0 is the model alone."""
    job = txt2img(client, control_image_base64=b64png(control), control_strength=0.8, **BODY)
    steered = output(outputs_dir, job)
    assert Image.open(io.BytesIO(steered)).size == (96, 64)
    assert job["params"]["control_strength"] == 0.8
    plain = output(outputs_dir, txt2img(client, **BODY))
    other = canny_edges(picture((96, 64), seed=9))
    with_other = output(outputs_dir, txt2img(client, control_image_base64=b64png(other), control_strength=0.8, **BODY))
    assert len({steered, plain, with_other}) == 3
    at_zero = output(outputs_dir, txt2img(client, control_image_base64=b64png(control), control_strength=0.0, **BODY))
    assert at_zero == plain
    return steered, plain


def reference_png(pipe, control: Image.Image, **kwargs) -> str:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(BODY["prompt"], control_image=control, width=96, height=64, num_inference_steps=3,
                 controlnet_conditioning_scale=0.8, generator=torch.Generator("cpu").manual_seed(21),
                 **kwargs).images[0]
    return b64png(image)


def test_a_flux_controlnet_union_steers_flux_as_diffusers_does(client, outputs_dir, inference_models, tmp_path):
    loaded = load(client, {**FLUX, "controlnet": FLUX_CONTROLNET})
    assert loaded["loaded_components"]["controlnet"] == FLUX_CONTROLNET
    control = canny_edges(picture((96, 64), seed=5))
    steered, _ = steered_and_plain(client, outputs_dir, control)

    # diffusers' own: the same seed-1 Flux the files hold, the ControlNet file read into a
    # FluxControlNetModel of InstantX's config (one double and one single block, ten modes), run
    # in mode 0 (canny).
    pipe = FluxPipeline.from_pretrained(tiny_diffusion.build_flux(tmp_path / "flux", seed=1))
    controlnet = FluxControlNetModel.from_config(dict(pipe.transformer.config, num_layers=1, num_single_layers=1,
                                                      num_mode=10))
    controlnet.load_state_dict(load_file(inference_models["flux_controlnet"]))
    reference = FluxControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    assert reference_png(reference, control, control_mode=0, guidance_scale=3.5) == \
        base64.b64encode(steered).decode()


def test_a_z_image_controlnet_steers_z_image_as_diffusers_does(client, outputs_dir, inference_models, tmp_path):
    loaded = load(client, {**Z_IMAGE, "controlnet": Z_IMAGE_CONTROLNET})
    assert loaded["loaded_components"]["controlnet"] == Z_IMAGE_CONTROLNET
    assert client.get("/health").json()["loaded_components"]["controlnet"] == Z_IMAGE_CONTROLNET
    control = canny_edges(picture((96, 64), seed=5))
    steered, _ = steered_and_plain(client, outputs_dir, control)

    # diffusers' own: the seed-1 Z-Image the files hold, its transformer read from the GGUF file,
    # the ControlNet by ZImageControlNetModel.from_single_file with the 2.1 config of a
    # ControlNet for this two-layer transformer.
    folder = tiny_diffusion.build_zimage(tmp_path / "zimage", seed=1)
    transformer = ZImageTransformer2DModel.from_single_file(
        str(inference_models["zimage_gguf"]), config=str(folder), subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32)
    pipe = ZImagePipeline.from_pretrained(folder, transformer=transformer)
    config = tmp_path / "zimage-controlnet"
    own = transformer.config
    ZImageControlNetModel(
        control_layers_places=[0, 1], control_refiner_layers_places=[0], control_in_dim=33,
        add_control_noise_refiner="control_noise_refiner", dim=own.dim, n_refiner_layers=own.n_refiner_layers,
        n_heads=own.n_heads, n_kv_heads=own.n_kv_heads).save_config(config)
    controlnet = ZImageControlNetModel.from_single_file(str(inference_models["zimage_controlnet"]),
                                                        config=str(config))
    reference = ZImageControlNetPipeline(**pipe.components, controlnet=controlnet)
    assert reference_png(reference, control, guidance_scale=0.0) == base64.b64encode(steered).decode()


def test_control_images_the_loaded_z_image_cannot_take(client):
    # Its ControlNet runs the transformer's own layers: it cannot sit apart from them.
    r = client.post("/models/load", json={**Z_IMAGE, "controlnet": Z_IMAGE_CONTROLNET,
                                          "options": {"keep_controlnet_on_cpu": True}})
    assert r.status_code == 400 and violated_fields(r) == ["options.keep_controlnet_on_cpu"], r.text
    load(client, Z_IMAGE)
    edges = b64png(canny_edges(picture((64, 64), seed=5)))
    r = client.post("/txt2img", json={**BODY, "control_image_base64": edges})
    assert r.status_code == 400 and violated_fields(r) == ["control_image_base64"], r.text
    assert "controlnet" in r.json()["error"] and "Z-Image" in r.json()["error"]
