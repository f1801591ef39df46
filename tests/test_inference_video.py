"""Wan 2.1 text-to-video on the generation server, through the gateway: the document's Wan2.1
load and txt2vid examples on the tiny models root, an MP4 of the asked size, frame count and
fps whose frames equal the plain diffusers WanPipeline's, its first frame as /thumb, and the
requests it refuses (by field, before anything is queued)."""

from __future__ import annotations

import io

import av
import httpx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from PIL import Image, ImageOps
from safetensors.torch import load_file

from services.common import media
from services.common.errors import InvalidInput
from services.common.settings import Settings
from services.inference import model_loading, submissions
from services.inference.generation import frames_uint8
from services.inference.job_spec import MP4, TXT2VID
from services.inference.model_files import ModelsRoot
from services.inference.model_loading import LoadPlan
from services.inference.pipelines import LoadedPipeline
from tests.conftest import violated_fields
from tests.test_inference_server import wait_job
from tinymodels import diffusion as tiny_diffusion
from tinymodels.diffusion import write_safetensors

# The document's "Load Wan2.1 T2V 1.3B" body, its UMT5 encoder named as the .safetensors
# release (the GGUF one: tests/test_inference_gguf_components.py).
WAN_LOAD = {
    "model_name": "wan2.1_t2v_1.3B_fp16.safetensors",
    "model_type": "diffusion",
    "vae": "wan_2.1_vae.safetensors",
    "t5xxl": "umt5_xxl_fp16.safetensors",
    "options": {"flash_attn": True, "flow_shift": 3.0},
}
# The document's "Generate video with Wan2.1" body, smaller (64x64, 9 frames, 4 steps).
TXT2VID_EXAMPLE = {
    "prompt": "a lovely cat walking in a garden",
    "negative_prompt": "static, blurry, low quality",
    "width": 64,
    "height": 64,
    "video_frames": 9,
    "steps": 4,
    "cfg_scale": 6.0,
    "sampler": "euler",
    "flow_shift": 3.0,
}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture
def wan_loaded(client):
    r = client.post("/models/load", json=WAN_LOAD)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain diffusers on the pipeline the tiny Wan files were written from (seed 1)."""
    folder = tiny_diffusion.build_wan21(tmp_path_factory.mktemp("wan-reference"), seed=1)
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def txt2vid(client: httpx.Client, **body) -> dict:
    r = client.post("/txt2vid", json={**TXT2VID_EXAMPLE, **body})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending" and r.json()["position"] >= 1
    return wait_job(client, r.json()["job_id"])


def decoded(path_or_bytes) -> tuple[np.ndarray, float, str]:
    """(frames x height x width x 3 uint8, frames per second, codec) of an MP4."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    with av.open(source) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate), stream.codec_context.name


def wan_frames(reference, seed: int, **overrides) -> np.ndarray:
    """The plain pipeline's frames for TXT2VID_EXAMPLE: Euler flow matching with shift 3."""
    reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(reference.scheduler.config, shift=3.0,
                                                                      use_dynamic_shifting=False)
    body = {**TXT2VID_EXAMPLE, **overrides}
    out = reference(body["prompt"], negative_prompt=body["negative_prompt"], width=body["width"],
                    height=body["height"], num_frames=body["video_frames"], num_inference_steps=body["steps"],
                    guidance_scale=body["cfg_scale"], generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="np")
    return frames_uint8(out.frames[0])


# --------------------------------------------------------------------------- files and detection


def test_the_wan_transformer_is_detected_in_wans_layout_with_or_without_prefix(inference_models, tmp_path):
    path = inference_models["wan21"]
    keys = set(load_file(path))
    assert {"blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k.weight", "patch_embedding.weight",
            "text_embedding.0.weight", "time_projection.1.weight", "head.head.weight", "head.modulation"} <= keys
    assert model_loading.detect_architecture(path) == "Wan2.1"
    prefixed = write_safetensors({"model.diffusion_model." + k: v for k, v in load_file(path).items()},
                                 tmp_path / "prefixed.safetensors")
    assert model_loading.detect_architecture(prefixed) == "Wan2.1"
    # An image-to-video Wan (its CLIP image embedder) is named, not mistaken for text-to-video.
    i2v = write_safetensors({**load_file(path), "img_emb.proj.0.weight": torch.ones(4)}, tmp_path / "i2v.safetensors")
    with pytest.raises(InvalidInput, match="image-to-video"):
        model_loading.detect_architecture(i2v)


def test_the_tiny_files_load_to_the_pipeline_they_were_written_from(inference_models, reference):
    plan = model_loading.plan_load(ModelsRoot(inference_models["root"]), WAN_LOAD)
    assert plan.architecture == "Wan2.1"
    settings = Settings.load("inference", environ={"LORAMESH_WAN21_CONFIG": str(inference_models["wan21_config"])})
    pipe = model_loading.load_pipeline(plan, "cpu", torch.float32, settings.models)
    for name in ("transformer", "vae", "text_encoder"):
        loaded, expected = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
    # What the worker runs for the documented request: the plain pipeline's frames, exactly.
    video = submissions.parse_txt2vid({**TXT2VID_EXAMPLE, "seed": 11}, plan, ModelsRoot(inference_models["root"]),
                                      settings).spec.images[0]
    steps = []
    frames = LoadedPipeline("wan", "Wan2.1", pipe).generate_video(video, lambda step, total: steps.append(step))
    assert steps == [1, 2, 3, 4]
    assert frames.dtype == np.uint8 and np.array_equal(frames, wan_frames(reference, seed=11))


# --------------------------------------------------------------------------- requests (no mesh)


def wan_plan() -> LoadPlan:
    return LoadPlan(model_name="wan2.1_t2v_1.3B_fp16.safetensors", model_type="diffusion", architecture="Wan2.1",
                    components={}, paths={"model": "/models/wan.safetensors"}, options={})


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.load("inference", environ={"LORAMESH_WORKFLOWS_BASE_PATH": str(tmp_path / "output")})


@pytest.fixture
def root(tmp_path) -> ModelsRoot:
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "motion.safetensors").write_bytes(b"{}")
    return ModelsRoot(tmp_path / "models")


def test_the_documented_defaults_make_one_mp4_job(settings, root):
    spec = submissions.parse_txt2vid({"prompt": "a cat <lora:motion:0.5>"}, wan_plan(), root, settings).spec
    assert (spec.type, spec.output_format, spec.architecture) == (TXT2VID, MP4, "Wan2.1")
    (video,) = spec.images
    assert (video.width, video.height, video.video_frames, video.fps, video.steps) == (832, 480, 33, 16, 30)
    assert (video.guidance_scale, video.flow_shift, video.sampler, video.scheduler) == (6.0, 3.0, "euler", "discrete")
    assert video.prompt == "a cat" and [lora.scale for lora in spec.loras] == [0.5]
    assert 0 <= spec.params["seed"] < 2**32 and spec.params["video_frames"] == 33


def test_every_txt2vid_field_is_read_or_refused_and_the_documented_defaults_pass(settings, root):
    from loramesh.v1 import inference_pb2

    fields = {f.name for f in inference_pb2.DESCRIPTOR.message_types_by_name["Txt2VidRequest"].fields}
    assert fields <= submissions.VIDEO_HANDLED | set(submissions.VIDEO_UNSUPPORTED), fields
    submissions.parse_txt2vid({"prompt": "x", **submissions.VIDEO_UNSUPPORTED, "slg_scale": 0.0,
                               "skip_layers": [7, 8, 9], "clip_skip": -1}, wan_plan(), root, settings)
    others = {"init_image_base64": "aGVsbG8=", "end_image_base64": "aGVsbG8=", "strength": 0.5,
              "control_frames": ["aGVsbG8="], "high_noise_steps": 10, "high_noise_sampler": "heun",
              "moe_boundary": 0.9, "vace_strength": 0.5, "distilled_guidance": 2.0, "slg_scale": 2.0}
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_txt2vid({"prompt": "x", **others}, wan_plan(), root, settings)
    assert sorted(name for name, _ in caught.value.violations) == sorted(others)


def test_a_spacing_the_video_pipeline_cannot_take_is_refused(settings, root):
    submissions.parse_txt2vid({"prompt": "x", "scheduler": "karras"}, wan_plan(), root, settings)
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_txt2vid({"prompt": "x", "scheduler": "smoothstep"}, wan_plan(), root, settings)
    assert [name for name, _ in caught.value.violations] == ["scheduler"]
    assert "discrete" in caught.value.violations[0][1]


@pytest.mark.parametrize(("frames", "hint"), [(0, "between 1 and 257"), (34, "use 33 or 37"), (1000, "between 1 and 257")])
def test_video_frames_must_be_4k_plus_1(settings, root, frames, hint):
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_txt2vid({"prompt": "x", "video_frames": frames}, wan_plan(), root, settings)
    assert [name for name, _ in caught.value.violations] == ["video_frames"]
    assert hint in caught.value.violations[0][1]


# --------------------------------------------------------------------------- through the gateway


def test_the_documented_wan_example_makes_an_mp4_equal_to_plain_diffusers(client, wan_loaded, outputs_dir,
                                                                         reference, tmp_path):
    assert wan_loaded["success"] is True and wan_loaded["model_type"] == "diffusion"
    health = client.get("/health").json()
    assert health["model_architecture"] == "Wan2.1" and health["model_name"] == WAN_LOAD["model_name"]

    first = txt2vid(client, seed=11)
    assert first["status"] == "completed", first
    assert first["type"] == "txt2vid" and first["outputs"] == [f"{first['job_id']}/video_0.mp4"]
    assert first["progress"]["step"] == first["progress"]["total_steps"] == 4
    video = (outputs_dir / first["outputs"][0]).read_bytes()
    frames, fps, codec = decoded(video)
    assert frames.shape == (9, 64, 64, 3) and fps == 16 and codec == "h264"

    # The same seed again gives the same video, and it is the plain pipeline's, encoded. (libx264
    # in the service process is not bit-reproducible: a few macroblocks may be coded differently,
    # so the decoded frames are compared, almost every pixel equal. The frames before encoding
    # are compared exactly in test_the_tiny_files_load_to_the_pipeline_they_were_written_from.)
    expected = wan_frames(reference, seed=11)
    reference_mp4 = tmp_path / "reference.mp4"
    media.encode_mp4(expected, 16, reference_mp4)
    encoded = decoded(reference_mp4)[0]
    second = txt2vid(client, seed=11)
    for got in (frames, decoded(outputs_dir / second["outputs"][0])[0]):
        assert (got == encoded).mean() > 0.9 and np.abs(got.astype(int) - encoded).mean() < 1.0
    different = wan_frames(reference, seed=12)
    assert np.abs(different.astype(int) - expected).mean() > 10  # what "almost equal" is measured against
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 16  # the encoder keeps the picture

    other = txt2vid(client, seed=12, fps=8, video_frames=5, width=96)
    other_frames, other_fps, _ = decoded(outputs_dir / other["outputs"][0])
    assert other_frames.shape == (5, 64, 96, 3) and other_fps == 8

    # GET /output streams the file; /thumb is its first frame as a JPEG.
    served = client.get(f"/output/{first['outputs'][0]}")
    assert served.status_code == 200 and served.headers["content-type"] == "video/mp4" and served.content == video
    thumb = client.get(f"/thumb/{first['outputs'][0]}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    poster = Image.open(io.BytesIO(thumb.content))
    assert poster.format == "JPEG" and poster.size == (120, 120)
    first_frame = ImageOps.fit(Image.fromarray(frames[0]), (120, 120), Image.Resampling.LANCZOS)
    last_frame = ImageOps.fit(Image.fromarray(frames[-1]), (120, 120), Image.Resampling.LANCZOS)
    shown = np.asarray(poster.convert("RGB"), dtype=int)
    assert np.abs(shown - np.asarray(first_frame, dtype=int)).mean() < 10
    assert np.abs(shown - np.asarray(first_frame, dtype=int)).mean() < np.abs(
        shown - np.asarray(last_frame, dtype=int)).mean()


def test_bad_video_requests_are_400s_naming_the_field(client, wan_loaded):
    r = client.post("/txt2vid", json={**TXT2VID_EXAMPLE, "video_frames": 0})
    assert r.status_code == 400 and violated_fields(r) == ["video_frames"], r.text
    r = client.post("/txt2vid", json={**TXT2VID_EXAMPLE, "vace_strength": 0.5, "end_image_base64": "aGVsbG8="})
    assert r.status_code == 400 and sorted(violated_fields(r)) == ["end_image_base64", "vace_strength"], r.text
    r = client.post("/txt2img", json={"prompt": "a cat", "width": 64, "height": 64})
    assert r.status_code == 400 and violated_fields(r) == ["model"] and "/txt2vid" in r.json()["message"], r.text
    # An image model makes no videos.
    assert client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors"}).status_code == 200
    r = client.post("/txt2vid", json=TXT2VID_EXAMPLE)
    assert r.status_code == 400 and violated_fields(r) == ["model"], r.text
    assert "video model" in r.json()["message"] and "Wan2.1" in r.json()["message"]
