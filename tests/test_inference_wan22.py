"""Wan video on both APIs beyond Wan 2.1's /txt2vid (tests/test_inference_video.py): the /v1
video catalog (the document's "Wan 2.2 MoE video" example gives one MP4 under outputs.videos),
LoRAs on one expert of Wan 2.2's two ("transformer": "low" / "high"), Wan 2.2 on the generation
server (high_noise_diffusion_model, moe_boundary, high_noise_cfg_scale), and the Wan transformer
as a city96 GGUF. Frames are compared with plain diffusers before encoding (exactly) and after
it through the gateway (libx264 in the service may code a few macroblocks differently)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from services.common.errors import InvalidInput
from services.common.settings import Settings
from services.inference import catalog, model_loading, submissions
from services.inference.generation import LoraWeight, frames_uint8
from services.inference.job_spec import MP4, TXT2VID
from services.inference.model_files import ModelsRoot
from services.inference.pipelines import LoadedPipeline
from tests.conftest import violated_fields
from tests.test_inference_server import wait_job
from tests.test_inference_v1 import run
from tests.test_inference_video import WAN_LOAD, decoded
from tinymodels import diffusion as tiny_diffusion
from tinymodels.model_files import write_wan_lora

# The document's example 3, smaller: 64x64, 5 frames, 4 steps.
WAN22_EXAMPLE = {
    "model": "wan22_14b_t2v",
    "loras": [
        {"path": "my_wan_job/low_noise.safetensors", "transformer": "low", "network_multiplier": 1.0},
        {"path": "my_wan_job/high_noise.safetensors", "transformer": "high", "network_multiplier": 1.0},
    ],
    "prompts": [{
        "prompt": "a cinematic shot of a city at night",
        "width": 64, "height": 64, "num_frames": 5, "fps": 16, "sample_steps": 4, "guidance_scale": 4.0, "seed": 42,
    }],
}
# Wan 2.2 on the generation server: the low-noise expert is the model, as stable-diffusion.cpp loads it.
WAN22_LOAD = {**WAN_LOAD, "model_name": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
              "high_noise_diffusion_model": "wan2.2_t2v_high_noise_14B_fp16.safetensors"}
TXT2VID_BODY = {"prompt": "a lovely cat walking in a garden", "negative_prompt": "static, blurry", "width": 64,
           "height": 64, "video_frames": 5, "steps": 4, "cfg_scale": 5.0, "sampler": "euler", "flow_shift": 3.0,
           "seed": 7}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def wan_loras(workflows_dir, inference_models) -> dict[str, Path]:
    """One LoRA per expert where the document's example expects them, in ai-toolkit's layout."""
    folder = workflows_dir / "my_wan_job"
    return {side: write_wan_lora(inference_models["wan22_config"], folder / f"{side}_noise.safetensors", seed=seed)
            for seed, side in enumerate(("low", "high"), start=3)}


@pytest.fixture(scope="module")
def settings(inference_models, workflows_dir) -> Settings:
    return Settings.load("inference", environ={
        "LORAMESH_WORKFLOWS_BASE_PATH": str(workflows_dir),
        "LORAMESH_WAN21_CONFIG": str(inference_models["wan21_config"]),
        "LORAMESH_WAN22_CONFIG": str(inference_models["wan22_config"]),
        "LORAMESH_MODEL_WAN22_14B_T2V": str(inference_models["wan22_config"])})


@pytest.fixture(scope="module")
def catalog_wan22(settings):
    """What the worker runs /v1 wan22_14b_t2v jobs on, and the plain pipeline of the same folder."""
    model = catalog.CATALOG["wan22_14b_t2v"]
    ours = LoadedPipeline("catalog:wan22", model.architecture,
                          catalog.load_catalog_pipeline(model, settings.models, "cpu", torch.float32, None))
    plain = WanPipeline.from_pretrained(settings.models.model_wan22_14b_t2v)
    plain.set_progress_bar_config(disable=True)
    return ours, plain


def plain_frames(pipe, seed: int, prompt: str, width: int, height: int, frames: int, steps: int, **call) -> np.ndarray:
    """The plain pipeline with the flow-matching Euler scheduler at the model's own shift (3)."""
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0,
                                                                 use_dynamic_shifting=False)
    out = pipe(prompt, width=width, height=height, num_frames=frames, num_inference_steps=steps,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call)
    return frames_uint8(out.frames[0])


def v1_video(settings, **changes):
    """The ImageSpec and LoRAs parse_v1 makes of WAN22_EXAMPLE with `changes` on top."""
    spec = submissions.parse_v1({**WAN22_EXAMPLE, **changes}, settings).spec
    assert (spec.type, spec.output_format) == (TXT2VID, MP4)
    return spec.images[0], [LoraWeight(Path(lora.path), lora.scale, lora.transformer) for lora in spec.loras]


# --------------------------------------------------------------------------- in process


def test_the_v1_wan22_video_equals_plain_diffusers_and_a_low_lora_changes_only_the_low_steps(
        catalog_wan22, settings, wan_loras):
    ours, plain = catalog_wan22
    video, _ = v1_video(settings, loras=[])
    ours.set_loras([])
    base = ours.generate_video(video, lambda step, total: None)
    assert base.shape == (5, 64, 64, 3)
    expected = plain_frames(plain, 42, video.prompt, 64, 64, 5, 4, guidance_scale=4.0)
    assert np.array_equal(base, expected)

    # A LoRA on the low-noise expert only: the video changes; at multiplier 0 it is the base, exactly.
    _, low = v1_video(settings, loras=[WAN22_EXAMPLE["loras"][0]])
    ours.set_loras(low)
    with_low = ours.generate_video(video, lambda step, total: None)
    assert np.abs(with_low.astype(int) - base).mean() > 0.5
    assert "lora" in type(ours.pipe.transformer_2.blocks[0].attn1.to_q).__module__
    assert not getattr(ours.pipe.transformer, "_hf_peft_config_loaded", False)  # the high expert is untouched
    ours.set_loras([LoraWeight(low[0].path, 0.0, "low")])
    assert np.array_equal(ours.generate_video(video, lambda step, total: None), base)
    # Both experts' LoRAs, then the low one alone again: its adapter is reused, not reloaded, and
    # the frames are those of plain diffusers with the file loaded into transformer_2.
    _, both = v1_video(settings)
    ours.set_loras(both)
    assert len(ours.adapters()) == 2
    ours.set_loras(low)
    assert len(ours.adapters()) == 2 and np.array_equal(ours.generate_video(video, lambda s, t: None), with_low)
    plain.load_lora_weights(str(wan_loras["low"]), adapter_name="low", load_into_transformer_2=True)
    try:
        assert np.array_equal(plain_frames(plain, 42, video.prompt, 64, 64, 5, 4, guidance_scale=4.0), with_low)
    finally:
        plain.transformer_2.delete_adapters("low")


def test_the_server_wan22_pair_loads_as_the_pipeline_it_was_written_from(inference_models, settings):
    root = ModelsRoot(inference_models["root"])
    plan = model_loading.plan_load(root, WAN22_LOAD)
    assert plan.architecture == "Wan2.2" and plan.paths["high_noise_diffusion_model"].endswith("high_noise_14B_fp16"
                                                                                               ".safetensors")
    pipe = model_loading.load_pipeline(plan, "cpu", torch.float32, settings.models)
    plain = tiny_diffusion.tiny_wan_pipeline(1, experts=2)
    plain.set_progress_bar_config(disable=True)
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        loaded, expected = getattr(pipe, name).state_dict(), getattr(plain, name).state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected), name
    assert pipe.config.boundary_ratio == 0.875

    # moe_boundary is diffusers' boundary_ratio for this video; high_noise_cfg_scale the high expert's guidance.
    spec = submissions.parse_txt2vid({**TXT2VID_BODY, "moe_boundary": 0.5, "high_noise_cfg_scale": 3.0}, plan, root,
                                     settings).spec
    assert spec.params["moe_boundary"] == 0.5 and spec.params["high_noise_cfg_scale"] == 3.0
    ours = LoadedPipeline("wan22", "Wan2.2", pipe)
    frames = ours.generate_video(spec.images[0], lambda step, total: None)
    assert pipe.config.boundary_ratio == 0.875  # the model's own again after the video
    plain.register_to_config(boundary_ratio=0.5)
    expected = plain_frames(plain, 7, TXT2VID_BODY["prompt"], 64, 64, 5, 4, negative_prompt=TXT2VID_BODY["negative_prompt"],
                            guidance_scale=3.0, guidance_scale_2=5.0)
    assert np.array_equal(frames, expected)


def test_the_wan_gguf_loads_and_makes_nearly_the_safetensors_video(inference_models, settings):
    root = ModelsRoot(inference_models["root"])
    videos = []
    for name in ("wan2.1_t2v_1.3B_fp16.safetensors", "wan2.1-t2v-14b-Q8_0.gguf"):
        plan = model_loading.plan_load(root, {**WAN_LOAD, "model_name": name})
        assert plan.architecture == "Wan2.1"
        pipe = model_loading.load_pipeline(plan, "cpu", torch.float32, settings.models)
        spec = submissions.parse_txt2vid({**TXT2VID_BODY, "width": 96}, plan, root, settings).spec
        videos.append(LoadedPipeline(name, "Wan2.1", pipe).generate_video(spec.images[0], lambda s, t: None))
    quantized = [type(m.weight).__name__ for m in pipe.transformer.modules() if hasattr(m, "weight")]
    assert "GGUFParameter" in quantized  # its Q8_0 weights stay quantized in memory
    difference = np.abs(videos[0].astype(int) - videos[1]).mean()
    assert 0 < difference < 2.0, difference


# --------------------------------------------------------------------------- requests (no mesh)


@pytest.mark.parametrize(("changes", "field"), [
    ({"loras": [{"path": "my_wan_job/low_noise.safetensors"}]}, "loras[0].transformer"),
    ({"loras": [{"path": "my_wan_job/low_noise.safetensors", "transformer": "middle"}]}, "loras[0].transformer"),
    ({"loras": [{"path": "my_wan_job/low_noise.safetensors", "transformer": "low"},
                {"path": "my_wan_job/high_noise.safetensors", "transformer": "low"}]}, "loras[1].transformer"),
    ({"prompts": [{"prompt": "x", "num_frames": 10}]}, "prompts[0].num_frames"),
    ({"prompts": [{"prompt": "x", "num_frames": 1001}]}, "prompts[0].num_frames"),
    ({"prompts": [{"prompt": "x", "fps": 0}]}, "prompts[0].fps"),
    ({"prompts": [{"prompt": "x", "ctrl_img": "aGVsbG8="}]}, "prompts[0].ctrl_img"),
    ({"model": "flux", "loras": [{"path": "my_wan_job/low_noise.safetensors", "transformer": "low"}],
      "prompts": [{"prompt": "x", "width": 64, "height": 64}]}, "loras[0].transformer"),
    ({"model": "flux", "loras": [], "prompts": [{"prompt": "x", "num_frames": 9}]}, "prompts[0].num_frames"),
])
def test_bad_v1_video_requests_name_the_field(settings, wan_loras, changes, field):
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_v1({**WAN22_EXAMPLE, **changes}, settings)
    assert [name for name, _ in caught.value.violations] == [field]


def test_v1_video_defaults_are_the_catalogs(settings, wan_loras):
    video, loras = v1_video(settings, prompts=[{"prompt": "a city"}])
    model = catalog.CATALOG["wan22_14b_t2v"]
    assert (video.video_frames, video.fps, video.steps, video.guidance_scale) == (41, 16, 25, 4.0)
    assert (video.width, video.height) == (model.default_width, model.default_height)
    assert [(lora.transformer, lora.path.name) for lora in loras] == [("low", "low_noise.safetensors"),
                                                                      ("high", "high_noise.safetensors")]


def test_bad_wan22_loads_and_txt2vid_fields_name_the_field(inference_models, settings):
    root = ModelsRoot(inference_models["root"])
    for request in ({**WAN22_LOAD, "model_name": "tiny-flux.safetensors", "t5xxl": None, "vae": None},
                    {**WAN22_LOAD, "high_noise_diffusion_model": "tiny-flux.safetensors"}):
        with pytest.raises(InvalidInput) as caught:
            model_loading.plan_load(root, request)
        assert "high_noise_diffusion_model" in [name for name, _ in caught.value.violations]
    plan = model_loading.plan_load(root, WAN22_LOAD)
    for body, field in (({"high_noise_steps": 2}, "high_noise_steps"), ({"moe_boundary": 1.5}, "moe_boundary"),
                        ({"high_noise_sampler": "heun"}, "high_noise_sampler"), ({"easycache": True}, "easycache"),
                        ({"high_noise_slg_scale": 2.0}, "high_noise_slg_scale")):
        with pytest.raises(InvalidInput) as caught:
            submissions.parse_txt2vid({**TXT2VID_BODY, **body}, plan, root, settings)
        assert [name for name, _ in caught.value.violations] == [field], body
    # Wan 2.1 has one expert: the MoE fields take their defaults only.
    single = model_loading.plan_load(root, WAN_LOAD)
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_txt2vid({**TXT2VID_BODY, "moe_boundary": 0.5}, single, root, settings)
    assert [name for name, _ in caught.value.violations] == ["moe_boundary"]


# --------------------------------------------------------------------------- through the gateway


def test_the_catalog_lists_the_video_models(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
    expected = {"wan21_1b_t2v": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan21_14b_t2v": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                "wan22_14b_t2v": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"}
    for model_id, base in expected.items():
        model = models[model_id]
        assert model["base_model"] == base and model["is_video_model"] is True
        assert (model["default_num_frames"], model["default_fps"]) == (41, 16)
        assert model["resolution_divisor"] == 16 and model["requires_control_image"] is False
    assert "default_num_frames" not in models["flux"] and models["flux"]["is_video_model"] is False


def test_the_documented_wan22_example_makes_one_mp4(client, wan_loras):
    result = run(client, WAN22_EXAMPLE)
    assert result["status"] == "succeeded" and result["error"] is None, result
    assert result["outputs"].get("images", []) == []
    [video] = result["outputs"]["videos"]
    assert set(video) == {"format", "width", "height", "num_frames", "fps", "file_path", "seed"}
    assert (video["format"], video["width"], video["height"], video["num_frames"], video["fps"], video["seed"]) == (
        "mp4", 64, 64, 5, 16, 42)
    frames, fps, codec = decoded(video["file_path"])
    assert frames.shape == (5, 64, 64, 3) and fps == 16 and codec == "h264"

    # Without the high LoRA, and with the low one at 0: the base video (as encoded), which the
    # low-noise LoRA visibly changes.
    low_only = {**WAN22_EXAMPLE, "loras": WAN22_EXAMPLE["loras"][:1]}
    zero = {**WAN22_EXAMPLE, "loras": [{**WAN22_EXAMPLE["loras"][0], "network_multiplier": 0.0}]}
    videos = [decoded(run(client, body)["outputs"]["videos"][0]["file_path"])[0].astype(int)
              for body in ({**WAN22_EXAMPLE, "loras": []}, low_only, zero)]
    base, with_low, at_zero = videos
    assert (at_zero == base).mean() > 0.9 and np.abs(at_zero - base).mean() < 1.0
    assert np.abs(with_low - base).mean() > 2 * max(np.abs(at_zero - base).mean(), 0.5)


def test_bad_v1_video_requests_are_422s(client):
    r = client.post("/v1/inference", json={**WAN22_EXAMPLE, "model": "flux"})
    assert r.status_code == 422 and sorted(violated_fields(r)) == [
        "loras[0].transformer", "loras[1].transformer", "prompts[0].fps", "prompts[0].num_frames"], r.text
    r = client.post("/v1/inference", json={**WAN22_EXAMPLE, "loras": [{"path": "my_wan_job/low_noise.safetensors"}]})
    assert r.status_code == 422 and violated_fields(r) == ["loras[0].transformer"], r.text


def test_wan22_and_the_wan_gguf_on_the_generation_server(client, outputs_dir):
    r = client.post("/models/load", json=WAN22_LOAD)
    assert r.status_code == 200, r.text
    assert client.get("/health").json()["model_architecture"] == "Wan2.2"
    r = client.post("/txt2vid", json={**TXT2VID_BODY, "moe_boundary": 0.9, "high_noise_cfg_scale": 3.5})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "completed", job
    assert job["params"]["moe_boundary"] == 0.9 and job["params"]["high_noise_cfg_scale"] == 3.5
    frames, fps, _ = decoded(outputs_dir / job["outputs"][0])
    assert frames.shape == (5, 64, 64, 3) and fps == 16
    r = client.post("/txt2vid", json={**TXT2VID_BODY, "high_noise_steps": 2})
    assert r.status_code == 400 and violated_fields(r) == ["high_noise_steps"], r.text

    # The seed's quantized 14B load, as written but for the encoder's format.
    r = client.post("/models/load", json={**WAN_LOAD, "model_name": "wan2.1-t2v-14b-Q8_0.gguf",
                                          "options": {"flash_attn": True, "offload_to_cpu": True, "flow_shift": 3.0}})
    assert r.status_code == 200, r.text
    job = wait_job(client, client.post("/txt2vid", json=TXT2VID_BODY).json()["job_id"])
    assert job["status"] == "completed", job
    assert decoded(outputs_dir / job["outputs"][0])[0].shape == (5, 64, 64, 3)
    r = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors",
                                          "high_noise_diffusion_model": "wan2.2_t2v_high_noise_14B_fp16.safetensors"})
    assert r.status_code == 400 and violated_fields(r) == ["high_noise_diffusion_model"], r.text
