"""ControlNets on the MMDiT families of the generation server, through the gateway on the tiny
models root: an SD3.5 ControlNet and a Qwen-Image ControlNet-Union, both single files in
diffusers' layout with no config beside them, each loaded with its model and steering txt2img
exactly as diffusers' own ControlNet pipeline does; and the ControlNets and requests that do
not fit."""

from __future__ import annotations

import base64

import httpx
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImagePipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
)
from safetensors.torch import load_file, save_file

from tests.conftest import violated_fields
from tests.test_inference_control import FLUX, SD35, Z_IMAGE, b64png, canny_edges, load, picture
from tests.test_inference_control_dit import BODY, FLUX_CONTROLNET, Z_IMAGE_CONTROLNET, reference_png, steered_and_plain
from tests.test_inference_qwen_image import QWEN_SAFETENSORS_LOAD
from tinymodels import diffusion as tiny_diffusion

SD3_CONTROLNET = "SD3.5-Large-Controlnet-Canny.safetensors"
QWEN_CONTROLNET = "Qwen-Image-ControlNet-Union.safetensors"
# The load the Qwen-Image tests use (flow_shift 3.0: a fixed shift the reference can repeat).
QWEN = QWEN_SAFETENSORS_LOAD


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def test_an_sd35_controlnet_steers_sd3_as_diffusers_does(client, outputs_dir, inference_models, tmp_path):
    loaded = load(client, {**SD35, "controlnet": SD3_CONTROLNET})
    assert loaded["loaded_components"]["controlnet"] == SD3_CONTROLNET
    assert client.get("/health").json()["loaded_components"]["controlnet"] == SD3_CONTROLNET
    control = canny_edges(picture((96, 64), seed=5))
    steered, _ = steered_and_plain(client, outputs_dir, control)

    # diffusers' own: the seed-1 SD3.5 the files hold, the ControlNet file read into an
    # SD3ControlNetModel of Stability's SD3.5 config (single blocks, no caption embedder, the
    # transformer's positional embedding lent by the pipeline).
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_diffusion.build_sd3(tmp_path / "sd3", seed=1))
    own = pipe.transformer.config
    controlnet = SD3ControlNetModel(
        sample_size=own.sample_size, patch_size=own.patch_size, in_channels=own.in_channels, num_layers=2,
        attention_head_dim=own.attention_head_dim, num_attention_heads=own.num_attention_heads,
        joint_attention_dim=None, caption_projection_dim=own.caption_projection_dim,
        pooled_projection_dim=own.pooled_projection_dim, out_channels=own.out_channels,
        pos_embed_max_size=own.pos_embed_max_size, use_pos_embed=False, force_zeros_for_pooled_projection=False)
    controlnet.load_state_dict(load_file(inference_models["sd3_controlnet"]))
    reference = StableDiffusion3ControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    # It samples the control image's latents from torch's global generator: seeded as the server does.
    torch.manual_seed(BODY["seed"])
    assert reference_png(reference, control, guidance_scale=1.0) == base64.b64encode(steered).decode()


def test_a_qwen_image_controlnet_union_steers_qwen_image_as_diffusers_does(client, outputs_dir, inference_models,
                                                                          tmp_path):
    loaded = load(client, {**QWEN, "controlnet": QWEN_CONTROLNET})
    assert loaded["loaded_components"]["controlnet"] == QWEN_CONTROLNET
    control = canny_edges(picture((96, 64), seed=5))
    steered, _ = steered_and_plain(client, outputs_dir, control)

    # diffusers' own: the seed-1 Qwen-Image the files hold with the load's fixed flow shift, the
    # ControlNet file read into a QwenImageControlNetModel of one block on this transformer.
    pipe = QwenImagePipeline.from_pretrained(tiny_diffusion.build_qwen_image(tmp_path / "qwen", seed=1))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0,
                                                                 use_dynamic_shifting=False)
    controlnet = QwenImageControlNetModel.from_config(dict(pipe.transformer.config, num_layers=1))
    controlnet.load_state_dict(load_file(inference_models["qwen_image_controlnet"]))
    reference = QwenImageControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    assert reference_png(reference, control, true_cfg_scale=1.0) == base64.b64encode(steered).decode()


# Every family's ControlNets against the others' models.
@pytest.mark.parametrize(("model", "controlnet", "made_for"), [
    ({"model_name": "tiny-sdxl.safetensors"}, FLUX_CONTROLNET, "Flux"),
    (FLUX, "control_v11p_sd15_canny.safetensors", "SD1.5"),
    (FLUX, Z_IMAGE_CONTROLNET, "Z-Image"),
    (Z_IMAGE, FLUX_CONTROLNET, "Flux"),
    (Z_IMAGE, "diffusers_xl_canny_full.safetensors", "SDXL"),
    (SD35, FLUX_CONTROLNET, "Flux"),
    (SD35, QWEN_CONTROLNET, "Qwen-Image"),
    (SD35, "control_v11p_sd15_canny.safetensors", "SD1.5"),
    (QWEN, SD3_CONTROLNET, "SD3"),
    (QWEN, Z_IMAGE_CONTROLNET, "Z-Image"),
    (Z_IMAGE, QWEN_CONTROLNET, "Qwen-Image"),
    ({"model_name": "tiny-sdxl.safetensors"}, SD3_CONTROLNET, "SD3"),
])
def test_a_controlnet_of_another_family_is_refused(client, model, controlnet, made_for):
    before = client.get("/health").json()
    r = client.post("/models/load", json={**model, "controlnet": controlnet})
    assert r.status_code == 400 and violated_fields(r) == ["controlnet"], r.text
    assert f"ControlNet for {made_for} models" in r.json()["error"]
    after = client.get("/health").json()
    assert (after["model_name"], after["loaded_components"]) == (before["model_name"], before["loaded_components"])


def test_an_sd3_inpainting_controlnet_is_refused(client, inference_models):
    # Alimama's SD3 inpainting ControlNet layout: the hint embedder takes the mask beside the latents.
    state = load_file(inference_models["sd3_controlnet"])
    hint = state["pos_embed_input.proj.weight"]
    state["pos_embed_input.proj.weight"] = torch.cat([hint, hint[:, :1]], dim=1)
    path = inference_models["sd3_controlnet"].parent / "SD3-Controlnet-Inpainting.safetensors"
    save_file(state, str(path))
    try:
        r = client.post("/models/load", json={**SD35, "controlnet": path.name})
    finally:
        path.unlink()
    assert r.status_code == 400 and violated_fields(r) == ["controlnet"], r.text
    assert "inpainting" in r.json()["error"]


def test_control_images_the_transformer_controlnets_cannot_take(client):
    edges = b64png(canny_edges(picture((96, 64), seed=5)))
    # diffusers has no image-to-image ControlNet pipeline for these three.
    for model, controlnet in ((SD35, SD3_CONTROLNET), (QWEN, QWEN_CONTROLNET), (Z_IMAGE, Z_IMAGE_CONTROLNET)):
        load(client, {**model, "controlnet": controlnet})
        before = client.get("/queue").json()["total_count"]
        r = client.post("/img2img", json={**BODY, "init_image_base64": b64png(picture((96, 64), seed=8)),
                                          "control_image_base64": edges})
        assert r.status_code == 400 and violated_fields(r) == ["control_image_base64"], r.text
        assert "text-to-image" in r.json()["error"]
        assert client.get("/queue").json()["total_count"] == before
    # diffusers' SD3 ControlNet pipeline has no skip-layer guidance.
    load(client, {**SD35, "controlnet": SD3_CONTROLNET})
    r = client.post("/txt2img", json={**BODY, "cfg_scale": 4.5, "slg_scale": 2.5, "skip_layers": [1],
                                      "control_image_base64": edges})
    assert r.status_code == 400 and violated_fields(r) == ["slg_scale"], r.text
