"""The generation-server API through the gateway on a tiny models root: health, model
listing/loading/hashing, txt2img and img2img jobs in the FIFO queue with inline LoRAs,
the queue routes, job events, the output folder, and bad input."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time

import httpx
import nats
import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from tests.conftest import violated_fields, write_image, write_random_lora

FINAL = ("completed", "failed", "cancelled")


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def add_detail(inference_models, models_dir):
    """The seed's <lora:add_detail:0.8> LoRA, for the tiny SDXL checkpoint."""
    return write_random_lora(models_dir / "tiny-sdxl-config", inference_models["loras"] / "add_detail.safetensors")


@pytest.fixture(scope="module")
def sdxl_loaded(mesh, add_detail):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        r = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"})
        assert r.status_code == 200, r.text
    return r.json()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/queue/{job_id}")
        assert job.status_code == 200, job.text
        if job.json()["status"] in FINAL:
            return job.json()
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s")


def txt2img(client: httpx.Client, **body) -> dict:
    r = client.post("/txt2img", json={"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 4, **body})
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["job_id"])


def png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_health_before_a_model_is_loaded(client):
    client.post("/models/unload")
    health = client.get("/health").json()
    assert health == {
        "status": "ok", "model_loaded": False, "model_loading": False, "loading_model_name": None,
        "last_error": None, "model_name": None, "model_type": None, "model_architecture": None,
        "loaded_components": {}, "upscaler_loaded": False, "upscaler_name": None,
    }
    r = client.post("/txt2img", json={"prompt": "a lovely cat"})
    assert r.status_code == 400 and "No model loaded" in r.json()["message"]


def test_models_are_listed_by_type_and_filtered(client):
    listing = client.get("/models").json()
    for key in ("checkpoints", "diffusion_models", "vae", "loras", "clip", "t5", "controlnets", "llm", "esrgan",
                "taesd", "embeddings"):
        assert key in listing or key in ("controlnets", "llm", "esrgan", "taesd", "embeddings")
    names = {m["name"] for m in listing["checkpoints"]}
    assert {"tiny-sdxl.safetensors", "SD1x/tiny-sd15.safetensors"} <= names
    entry = next(m for m in listing["checkpoints"] if m["name"] == "SD1x/tiny-sd15.safetensors")
    assert entry["type"] == "checkpoint" and entry["file_extension"] == ".safetensors" and entry["size_bytes"] > 0
    assert "is_loaded" in entry and "applied_filters" not in listing
    filtered = client.get("/models", params={"type": "diffusion", "search": "FLUX"}).json()
    assert [m["name"] for m in filtered["diffusion_models"]] == ["flux1-dev-Q4_K_S.gguf", "flux1-schnell-Q8_0.gguf",
                                                                  "tiny-flux.safetensors"]
    assert filtered.get("checkpoints", []) == [] and filtered["applied_filters"] == {"type": "diffusion",
                                                                                     "search": "FLUX"}
    by_name = client.get("/models", params={"name": "sd15", "extension": "safetensors"}).json()
    assert [m["name"] for m in by_name["checkpoints"]] == ["SD1x/tiny-sd15.safetensors"]
    assert by_name["applied_filters"] == {"extension": "safetensors", "search": "sd15"}
    bad = client.get("/models", params={"type": "rocket"})
    assert bad.status_code == 400 and "type" in violated_fields(bad)


def test_model_hash_is_the_sha256_and_is_cached(client, inference_models):
    expected = hashlib.sha256(inference_models["sd15"].read_bytes()).hexdigest()
    r = client.get("/models/hash/checkpoint/SD1x%2Ftiny-sd15.safetensors")
    assert r.status_code == 200, r.text
    assert r.json() == {"model_name": "SD1x/tiny-sd15.safetensors", "model_type": "checkpoint", "hash": expected}
    listing = client.get("/models", params={"type": "checkpoint"}).json()
    assert next(m for m in listing["checkpoints"] if m["name"] == "SD1x/tiny-sd15.safetensors")["hash"] == expected
    missing = client.get("/models/hash/checkpoint/invalid_model.safetensors")
    assert missing.status_code == 404 and "invalid_model.safetensors" in missing.json()["message"]


def test_load_an_sdxl_checkpoint_and_generate_the_documented_example(client, sdxl_loaded, outputs_dir):
    assert sdxl_loaded["success"] is True and sdxl_loaded["message"] == "Model loaded successfully"
    assert sdxl_loaded["model_name"] == "tiny-sdxl.safetensors" and sdxl_loaded["model_type"] == "checkpoint"
    health = client.get("/health").json()
    assert health["model_loaded"] is True and health["model_architecture"] == "SDXL"
    assert health["model_name"] == "tiny-sdxl.safetensors" and health["loaded_components"]["vae"] is None

    body = {
        "prompt": "a lovely cat holding a sign that says hello world <lora:add_detail:0.8>",
        "negative_prompt": "blurry, low quality, bad anatomy",
        "width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0, "seed": -1, "sampler": "euler_a",
        "scheduler": "discrete", "batch_count": 1, "clip_skip": -1,
    }
    r = client.post("/txt2img", json=body)
    assert r.status_code == 202, r.text
    queued = r.json()
    assert set(queued) == {"job_id", "status", "position"} and queued["status"] == "pending"
    assert queued["position"] >= 1
    job = wait_job(client, queued["job_id"])
    assert job["status"] == "completed", job
    assert job["type"] == "txt2img" and job["outputs"] == [f"{queued['job_id']}/image_0.png"]
    assert job["progress"] == {"step": 4, "total_steps": 4, "current_image": 0, "total_images": 1, "all_steps": 4,
                               "current_all_steps": 4, "percentage": 100.0}
    params = job["params"]
    assert params["seed"] >= 0 and params["prompt"] == body["prompt"] and params["sampler"] == "euler_a"
    assert {k: params[k] for k in ("width", "height", "steps", "cfg_scale", "batch_count", "clip_skip")} == \
        {"width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0, "batch_count": 1, "clip_skip": -1}
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]

    served = client.get(f"/output/{job['outputs'][0]}")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).size == (64, 64)
    config = json.loads((outputs_dir / queued["job_id"] / "config.json").read_text())
    assert config["params"]["seed"] == params["seed"]
    thumb = client.get(f"/thumb/{job['outputs'][0]}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (120, 120)
    page = client.get(f"/output/{queued['job_id']}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "image_0.png" in page.text


def test_same_seed_same_bytes_equal_to_plain_diffusers_and_lora_changes_it(client, sdxl_loaded, outputs_dir,
                                                                           inference_models):
    first = txt2img(client, seed=1234, sampler="euler_a", scheduler="discrete")
    second = txt2img(client, seed=1234, sampler="euler_a", scheduler="discrete")
    first_bytes = (outputs_dir / first["outputs"][0]).read_bytes()
    assert first_bytes == (outputs_dir / second["outputs"][0]).read_bytes()

    pipe = StableDiffusionXLPipeline.from_single_file(inference_models["sdxl"],
                                                      config=str(inference_models["sdxl_config"]))
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = pipe("a lovely cat", width=64, height=64, num_inference_steps=4,
                     guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(1234)).images[0]
    out = io.BytesIO()
    reference.save(out, format="PNG")
    assert first_bytes == out.getvalue()

    with_lora = txt2img(client, prompt="a lovely cat <lora:add_detail:0.8>", seed=1234)
    zero = txt2img(client, prompt="a lovely cat <lora:add_detail:0>", seed=1234)
    assert (outputs_dir / with_lora["outputs"][0]).read_bytes() != first_bytes
    assert (outputs_dir / zero["outputs"][0]).read_bytes() == first_bytes


def test_a_batch_uses_consecutive_seeds(client, sdxl_loaded, outputs_dir):
    job = txt2img(client, seed=40, batch_count=2)
    assert job["outputs"] == [f"{job['job_id']}/image_0.png", f"{job['job_id']}/image_1.png"]
    assert job["progress"]["total_images"] == 2 and job["progress"]["all_steps"] == 8
    single = txt2img(client, seed=41)
    assert (outputs_dir / job["outputs"][1]).read_bytes() == (outputs_dir / single["outputs"][0]).read_bytes()


def test_img2img_and_inpainting_keep_the_asked_size(client, sdxl_loaded, media_dir, outputs_dir):
    init = Image.open(write_image(media_dir / "img2img" / "init.png", (64, 64), seed=9)).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"prompt": "watercolor painting style <lora:add_detail:0.9>", "negative_prompt": "photo, realistic",
            "init_image_base64": png(init), "strength": 0.75, "width": 64, "height": 64, "steps": 4,
            "cfg_scale": 7.0, "seed": 5, "sampler": "euler_a", "scheduler": "discrete", "batch_count": 1}
    results = []
    for extra in ({}, {"mask_image_base64": png(mask)}):
        r = client.post("/img2img", json={**body, **extra})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
        assert job["status"] == "completed" and job["type"] == "img2img", job
        with Image.open(outputs_dir / job["outputs"][0]) as image:
            assert image.size == (64, 64)
            results.append(image.convert("RGB"))
    # The mask keeps what is black: the corner of the inpainted image stays close to the input.
    corner = (0, 0, 12, 12)

    def distance(image: Image.Image) -> float:
        return float(np.abs(np.asarray(image.crop(corner), float) - np.asarray(init.crop(corner), float)).mean())

    assert distance(results[1]) < distance(results[0])


def test_the_queue_counts_cancels_pending_only_and_publishes_events(mesh, client, sdxl_loaded):
    running = client.post("/txt2img", json={"prompt": "a long one", "width": 256, "height": 256, "steps": 20,
                                            "batch_count": 4}).json()
    pending = client.post("/txt2img", json={"prompt": "never runs", "width": 64, "height": 64, "steps": 2}).json()
    assert pending["position"] >= 1
    queue = client.get("/queue").json()
    assert queue["total_count"] == len(queue["items"]) and queue["pending_count"] >= 1
    assert set(queue) == {"pending_count", "processing_count", "completed_count", "failed_count", "total_count",
                          "items"}
    cancelled = client.delete(f"/queue/{pending['job_id']}")
    assert cancelled.status_code == 200 and cancelled.json() == {"success": True, "message": "Job cancelled"}
    deadline = time.monotonic() + 60
    while client.get(f"/queue/{running['job_id']}").json()["status"] != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    refused = client.delete(f"/queue/{running['job_id']}")
    assert refused.status_code == 400 and "processing" in refused.json()["message"]
    assert client.delete("/queue/no-such-job").status_code == 404
    wait_job(client, running["job_id"])
    assert client.get(f"/queue/{pending['job_id']}").json()["status"] == "cancelled"
    assert "started_at" not in client.get(f"/queue/{pending['job_id']}").json()

    # A later job's events, as the WebSocket bridge forwards them.
    events = asyncio.run(_events_of_one_job(mesh, client))
    kinds = [e["subject"].rsplit(".", 1)[1] for e in events]
    assert kinds[0] == "job_added" and kinds.count("progress") == 3
    statuses = [e["data"]["status"] for e in events if e["subject"].endswith(".status")]
    assert statuses == ["processing", "completed"]
    final = [e for e in events if e["subject"].endswith(".status")][-1]["data"]
    assert final["previous_status"] == "processing" and final["outputs"][0].endswith("image_0.png")
    progress = [e["data"] for e in events if e["subject"].endswith(".progress")]
    assert [(p["step"], p["total_steps"]) for p in progress] == [(1, 3), (2, 3), (3, 3)]


async def _events_of_one_job(mesh, client) -> list[dict]:
    nc = await nats.connect(mesh.nats_url)
    seen = []

    async def on_event(msg):
        seen.append({"subject": msg.subject, **json.loads(msg.data)})

    await nc.subscribe("events.inference.>", cb=on_event)
    await nc.flush()
    job = await asyncio.to_thread(client.post, "/txt2img", json={"prompt": "events", "width": 64, "height": 64,
                                                                 "steps": 3})
    job_id = job.json()["job_id"]
    await asyncio.to_thread(wait_job, client, job_id)
    await asyncio.sleep(0.3)
    await nc.close()
    return [e for e in seen if e["subject_id"] == job_id]


def test_job_events_stream_as_server_sent_events(client, sdxl_loaded):
    job_id = client.post("/txt2img", json={"prompt": "sse", "width": 64, "height": 64, "steps": 2}).json()["job_id"]
    with client.stream("GET", f"/queue/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    names = [e["event"] for e in events]
    assert names[0] == "job_added" and names[-1] == "job_status_changed"
    assert events[-1]["data"]["status"] == "completed" and "job_progress" in names


def test_options_and_architectures(client, sdxl_loaded):
    options = client.get("/options").json()
    assert "euler_a" in options["samplers"] and "karras" in options["schedulers"]
    assert {"id": "q8_0", "name": "Q8_0 (8-bit)", "bits": 8} in options["quantization_types"]
    arch = client.get("/architectures").json()
    assert {"SD1", "SDXL", "Flux"} <= set(arch["architectures"])
    assert arch["architectures"]["SDXL"]["generationDefaults"]["width"] == 1024
    assert arch["current_architecture"] == "SDXL" and arch["current_preset"]


def test_load_flux_with_separate_components_and_generate(client, add_detail):
    body = {"model_name": "tiny-flux.safetensors", "model_type": "diffusion", "vae": "tiny-flux-ae.safetensors",
            "clip_l": "tiny-clip_l.safetensors", "t5xxl": "tiny-t5xxl.safetensors", "options": {"vae_tiling": False}}
    try:
        r = client.post("/models/load", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["loaded_components"]["t5xxl"] == "tiny-t5xxl.safetensors"
        health = client.get("/health").json()
        assert health["model_architecture"] == "Flux" and health["model_type"] == "diffusion"
        job = txt2img(client, prompt="a lovely cat", cfg_scale=1.0, seed=3)
        assert job["status"] == "completed", job
        assert job["params"]["sampler"] == "euler"
    finally:
        client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors"})


@pytest.mark.parametrize("body, status, field", [
    ({"model_type": "checkpoint"}, 400, "model_name"),
    ({"model_name": "tiny-sdxl.safetensors", "model_type": "rocket"}, 400, "model_type"),
    ({"model_name": "invalid_model.safetensors"}, 404, None),
    ({"model_name": "../../etc/passwd"}, 400, "model_name"),
    ({"model_name": "tiny-sdxl.safetensors", "options": {"weight_type": "q4_0"}}, 400, "options.weight_type"),
    ({"model_name": "tiny-sdxl.safetensors", "t5xxl": "tiny-t5xxl.safetensors"}, 400, "t5xxl"),
    # The documented option reaches the service, which names what it allows.
    ({"model_name": "tiny-sdxl.safetensors", "options": {"sampler_rng_type": "std_default"}}, 400,
     "options.sampler_rng_type"),
])
def test_bad_loads_are_refused_and_keep_the_loaded_model(client, sdxl_loaded, body, status, field):
    r = client.post("/models/load", json=body)
    assert r.status_code == status, r.text
    if field:
        assert field in violated_fields(r), r.json()
    health = client.get("/health").json()
    assert health["model_name"] == "tiny-sdxl.safetensors" and health["model_loaded"] is True


@pytest.mark.parametrize("change, field", [
    ({"sampler": "warp"}, "sampler"),
    ({"scheduler": "someday"}, "scheduler"),
    ({"width": 100}, "width"),
    ({"height": 8192}, "height"),
    ({"steps": 0}, "steps"),
    ({"steps": 1000}, "steps"),
    ({"batch_count": 0}, "batch_count"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a cat <lora:missing_lora:1>"}, "prompt"),
    ({"prompt": "a cat <lora:../../../etc/passwd:1>"}, "prompt"),
    ({"prompt": "a cat <lora:add_detail:lots>"}, "prompt"),
    ({"seed": -7}, "seed"),
    ({"custom_sigmas": [1.0, 0.5]}, "custom_sigmas"),
])
def test_bad_generation_requests_are_refused_and_queue_nothing(client, sdxl_loaded, change, field):
    before = client.get("/queue").json()["total_count"]
    r = client.post("/txt2img", json={"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 2, **change})
    assert r.status_code == 400, r.text
    assert field in violated_fields(r), r.json()
    after = client.get("/queue").json()
    assert after["total_count"] == before, [(j["job_id"], j["params"]) for j in after["items"][-3:]]


def test_bad_img2img_inputs_are_refused(client, sdxl_loaded):
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    for extra, field in (({}, "init_image_base64"), ({"init_image_base64": "%%%not-base64"}, "init_image_base64"),
                         ({"init_image_base64": base64.b64encode(b"not an image").decode()}, "init_image_base64"),
                         ({"init_image_base64": png(Image.new("RGB", (64, 64))), "strength": 1.5}, "strength")):
        r = client.post("/img2img", json={**base, **extra})
        assert r.status_code == 400 and field in violated_fields(r), r.text
    # The queue keeps running.
    assert txt2img(client, steps=1)["status"] == "completed"


def test_output_browser_refuses_escapes(client, outputs_dir, tmp_path):
    (outputs_dir).mkdir(exist_ok=True)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    link = outputs_dir / "escape.txt"
    if not link.exists():
        link.symlink_to(outside)
    for path in ("/output/..%2F..%2Fetc%2Fpasswd", "/output/escape.txt", "/thumb/escape.txt"):
        r = client.get(path)
        assert r.status_code == 400, (path, r.status_code, r.text)
    assert client.get("/output/no-such-job/image_0.png").status_code == 404


def test_documented_defaults_of_unsupported_fields_pass_and_other_values_are_named(client, sdxl_loaded, outputs_dir):
    defaults = {"skip_layers": [7, 8, 9], "slg_start": 0.01, "slg_end": 0.2, "control_strength": 0.9,
                "vae_tiling": False, "easycache": False, "easycache_threshold": 0.2, "upscale_repeats": 1}
    assert txt2img(client, **defaults)["status"] == "completed"
    r = client.post("/txt2img", json={"prompt": "x", "width": 64, "height": 64, "easycache": True,
                                      "skip_layers": [3], "vae_tiling": True, "vae_tile_size_x": 12})
    assert r.status_code == 400, r.text
    assert sorted(violated_fields(r)) == ["easycache", "skip_layers", "vae_tile_size_x"], r.text
    # VAE tiling is honoured: the tiled decode differs from the whole-image one, same seed.
    plain = txt2img(client, width=128, height=128, seed=3)
    tiled = txt2img(client, width=128, height=128, seed=3, vae_tiling=True, vae_tile_size_x=64,
                    vae_tile_size_y=64)
    assert plain["status"] == tiled["status"] == "completed"
    assert (outputs_dir / plain["outputs"][0]).read_bytes() != (outputs_dir / tiled["outputs"][0]).read_bytes()
