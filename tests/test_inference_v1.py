"""The async v1 inference API through the gateway, on tiny catalog pipelines: the seed's
examples (FLUX, FLUX Kontext, the Python polling script) give the documented shapes and
real images; a LoRA from the trainer changes the image and multiplier 0 gives the base
one; results equal plain diffusers; cancel, restarts and bad input behave."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import httpx
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from tests.conftest import violated_fields, write_image, write_random_lora

# The API document's Python example (requests + polling), verbatim.
POLLING_EXAMPLE = Path(__file__).parent / "data" / "v1_polling_example.txt"
FINAL = ("succeeded", "failed", "canceled")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def loras(workflows_dir, inference_models, models_dir):
    """LoRA files where the seed's examples expect them, relative to the workflows base path."""
    return {
        "flux": write_random_lora(inference_models["flux_config"], workflows_dir / "my_flux_job" / "my_flux_job.safetensors"),
        "kontext": write_random_lora(inference_models["flux_config"],
                                     workflows_dir / "my_kontext_job" / "my_kontext_job.safetensors", seed=1),
        "zimage": write_random_lora(inference_models["zimage"], workflows_dir / "my_lora_job" / "my_lora_job.safetensors"),
        "sdxl": write_random_lora(models_dir / "tiny-sdxl-config", workflows_dir / "sdxl_job" / "sdxl_job.safetensors"),
    }


def wait_done(client: httpx.Client, request_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/requests/{request_id}/status")
        assert status.status_code == 200, status.text
        if status.json()["status"] in FINAL:
            return client.get(f"/v1/requests/{request_id}/result").json()
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} did not finish within {timeout}s")


def run(client: httpx.Client, payload: dict) -> dict:
    r = client.post("/v1/inference", json=payload)
    assert r.status_code == 200, r.text
    return wait_done(client, r.json()["request_id"])


def sdxl_payload(seed=7, multiplier=1.0, lora="sdxl_job/sdxl_job.safetensors", **prompt) -> dict:
    return {"model": "sdxl", "loras": [{"path": lora, "network_multiplier": multiplier}] if lora else [],
            "prompts": [{"prompt": "a red pop tart", "width": 64, "height": 64, "sample_steps": 4,
                         "guidance_scale": 5.0, "seed": seed, **prompt}]}


def image_bytes(result: dict, index: int = 0) -> bytes:
    return Path(result["outputs"]["images"][index]["file_path"]).read_bytes()


def test_the_catalog_lists_every_model_with_its_defaults(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
    assert {"sd15", "sdxl", "flux", "flux_kontext", "zimage_turbo"} <= set(models)
    assert models["flux"]["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert models["flux"]["resolution_divisor"] == 16 and models["flux"]["default_steps"] > 0
    assert models["flux_kontext"]["requires_control_image"] is True
    assert models["sdxl"]["requires_control_image"] is False and models["sdxl"]["is_video_model"] is False


def test_the_documented_flux_example(client, loras):
    payload = {
        "model": "flux",
        "trigger_word": "sks",
        "loras": [{"path": "my_flux_job/my_flux_job.safetensors", "network_multiplier": 1.0}],
        "prompts": [{
            "prompt": "[trigger] a cinematic portrait photo",
            "width": 64, "height": 64, "sample_steps": 3, "guidance_scale": 4.0, "seed": 42,
        }],
    }
    r = client.post("/v1/inference", json=payload)
    assert r.status_code == 200, r.text
    job = r.json()
    assert set(job) == {"request_id", "status", "status_url", "result_url", "created_at"}
    assert job["status"] == "queued" and ISO.match(job["created_at"])
    assert job["status_url"] == f"http://localhost:8000/v1/requests/{job['request_id']}/status"
    assert job["result_url"] == f"http://localhost:8000/v1/requests/{job['request_id']}/result"

    result = wait_done(client, job["request_id"])
    assert result["status"] == "succeeded" and result["error"] is None, result
    status = client.get(f"/v1/requests/{job['request_id']}/status").json()
    assert set(status) == {"request_id", "status", "created_at", "started_at", "finished_at", "error"}
    assert ISO.match(status["started_at"]) and ISO.match(status["finished_at"]) and status["error"] is None
    [image] = result["outputs"]["images"]
    assert image["format"] == "jpeg" and (image["width"], image["height"]) == (64, 64) and image["seed"] == 42
    with Image.open(image["file_path"]) as opened:
        assert opened.size == (64, 64) and opened.format == "JPEG"
    assert result["metadata"]["timings"]["load_pipeline"] >= 0 and len(result["metadata"]["timings"]["prompts"]) == 1
    # The trigger word replaced "[trigger]" in what ran.
    queued = client.get(f"/queue/{job['request_id']}").json()
    assert queued["params"]["prompts"][0]["prompt"] == "sks a cinematic portrait photo"


def test_the_documented_kontext_example_with_url_and_base64_control_images(client, loras, media_dir, media_server):
    picture = write_image(media_dir / "kontext" / "input.png", (80, 48), seed=5)
    data_url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    raw = base64.b64encode(picture.read_bytes()).decode()
    results = []
    for ctrl in (f"{media_server}/kontext/input.png", data_url, raw):
        results.append(run(client, {
            "model": "flux_kontext",
            "loras": [{"path": "my_kontext_job/my_kontext_job.safetensors", "network_multiplier": 1.0}],
            "prompts": [{"prompt": "make it look like a watercolor", "width": 64, "height": 64, "sample_steps": 2,
                         "ctrl_img": ctrl, "seed": 42}],
        }))
    for result in results:
        assert result["status"] == "succeeded", result
        assert (result["outputs"]["images"][0]["width"], result["outputs"]["images"][0]["height"]) == (64, 64)
    # The same control image, however it arrived, gives the same picture.
    assert image_bytes(results[0]) == image_bytes(results[1]) == image_bytes(results[2])


def test_the_documented_python_polling_script(mesh, loras, capsys):
    script = POLLING_EXAMPLE.read_text()
    script = script.replace('BASE_URL = "http://localhost:8000"', f'BASE_URL = "{mesh.rest_url}"')
    script = script.replace('"width": 1024', '"width": 64').replace('"height": 1024', '"height": 64')
    script = script.replace('"sample_steps": 8', '"sample_steps": 2').replace("time.sleep(1)", "time.sleep(0.2)")
    exec(compile(script, "seed_003_polling.py", "exec"), {})
    printed = capsys.readouterr().out
    assert "'status': 'succeeded'" in printed and "'width': 64" in printed and "'seed': 42" in printed


def test_each_prompt_item_is_its_own_output(client, loras):
    payload = sdxl_payload()
    payload["prompts"].append({"prompt": "a blue pop tart", "width": 96, "height": 64, "sample_steps": 2, "seed": 8})
    result = run(client, payload)
    sizes = [(i["width"], i["height"], i["seed"]) for i in result["outputs"]["images"]]
    assert sizes == [(64, 64, 7), (96, 64, 8)]
    assert len({image_bytes(result, 0), image_bytes(result, 1)}) == 2


def test_same_seed_gives_identical_bytes_equal_to_plain_diffusers(client, models_dir):
    first = run(client, sdxl_payload(lora=None, seed=11))
    second = run(client, sdxl_payload(lora=None, seed=11))
    assert image_bytes(first) == image_bytes(second)
    pipe = StableDiffusionXLPipeline.from_pretrained(models_dir / "tiny-sdxl-config")
    # Without a sampler the request runs with the default of the generation server: euler_a.
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = pipe("a red pop tart", width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
                     generator=torch.Generator("cpu").manual_seed(11)).images[0]
    out = io.BytesIO()
    reference.save(out, format="JPEG", quality=95)
    assert image_bytes(first) == out.getvalue()


def test_a_lora_from_the_trainer_changes_the_image_and_multiplier_zero_is_the_base(client, workflows_dir,
                                                                                     dataset_dir, models_dir):
    from tests.test_trainer_sessions import payload as session_payload
    from tests.test_trainer_sessions import wait_for

    body = session_payload("lora-for-inference", workflows_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors",
                           lr=0.05, skip_first_sample=True)
    body["config"]["config"]["process"][0]["train"]["steps"] = 6
    body["maxSteps"] = 6
    created = client.post("/sessions", json=body)
    assert created.status_code == 200, created.text
    client.post("/sessions/lora-for-inference/steps", json={"steps": 6})
    done = wait_for(client, "lora-for-inference", lambda s: s["state"] == "completed")
    trained = Path(done["last_checkpoint_path"])
    relative = str(trained.relative_to(workflows_dir))

    base = run(client, sdxl_payload(lora=None, seed=3))
    with_lora = run(client, sdxl_payload(lora=relative, seed=3))
    zero = run(client, sdxl_payload(lora=relative, seed=3, multiplier=0.0))
    absolute = run(client, sdxl_payload(lora=str(trained), seed=3))
    assert image_bytes(with_lora) != image_bytes(base)
    assert image_bytes(zero) == image_bytes(base)
    assert image_bytes(absolute) == image_bytes(with_lora)


def test_several_loras_at_once_and_a_lora_from_a_url(client, loras, workflows_dir, media_server, media_dir):
    one = run(client, sdxl_payload(seed=5))
    both = run(client, {**sdxl_payload(seed=5), "loras": [
        {"path": "sdxl_job/sdxl_job.safetensors", "network_multiplier": 1.0},
        {"path": "sdxl_job/sdxl_job.safetensors", "network_multiplier": 0.5}]})
    assert both["status"] == "succeeded" and image_bytes(both) != image_bytes(one)
    served = media_dir / "served_lora.safetensors"
    served.write_bytes(loras["sdxl"].read_bytes())
    by_url = run(client, sdxl_payload(seed=5, lora=f"{media_server}/served_lora.safetensors"))
    assert by_url["status"] == "succeeded" and image_bytes(by_url) == image_bytes(one)


def test_cancel_a_queued_request_never_starts_it(client, loras):
    busy = client.post("/v1/inference", json=sdxl_payload(lora=None, width=512, height=512, sample_steps=150)).json()
    queued = client.post("/v1/inference", json=sdxl_payload(lora=None)).json()
    cancelled = client.post(f"/v1/requests/{queued['request_id']}/cancel", json={})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "canceled"
    # The running one stops at its next step.
    stop = client.post(f"/v1/requests/{busy['request_id']}/cancel", json={}).json()
    assert stop["status"] in ("in_progress", "canceled", "in_queue")
    assert wait_done(client, busy["request_id"])["status"] == "canceled"
    status = client.get(f"/v1/requests/{queued['request_id']}/status").json()
    assert status["status"] == "canceled" and status["started_at"] is None
    result = client.get(f"/v1/requests/{queued['request_id']}/result").json()
    assert result["outputs"].get("images", []) == []


def test_killed_inference_process_the_job_completes_after_restart(mesh, client, loras):
    job = client.post("/v1/inference", json=sdxl_payload(lora=None, width=256, height=256, sample_steps=60,
                                                        seed=21)).json()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/requests/{job['request_id']}/status").json()["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    mesh.stop_service("inference", crash=True)
    mesh.start_service("inference")
    result = wait_done(client, job["request_id"])
    assert result["status"] == "succeeded", result
    record = client.get(f"/queue/{job['request_id']}").json()
    assert record["status"] == "completed" and len(record["outputs"]) == 1
    with Image.open(result["outputs"]["images"][0]["file_path"]) as image:
        assert image.size == (256, 256)


@pytest.mark.parametrize("change, field", [
    ({"model": "sd9"}, "model"),
    ({"prompts": []}, "prompts"),
    ({"prompts": [{"prompt": "x", "width": 100}]}, "prompts[0].width"),
    ({"prompts": [{"prompt": "x", "height": 8192}]}, "prompts[0].height"),
    ({"prompts": [{"prompt": "x", "sample_steps": 0}]}, "prompts[0].sample_steps"),
    ({"prompts": [{"prompt": "x", "sample_steps": 151}]}, "prompts[0].sample_steps"),
    ({"prompts": [{"prompt": "x", "guidance_scale": 50}]}, "prompts[0].guidance_scale"),
    ({"prompts": [{"prompt": "x", "sampler": "warp_drive"}]}, "prompts[0].sampler"),
    ({"prompts": [{"prompt": ""}]}, "prompts[0].prompt"),
    ({"loras": [{"path": "../../etc/passwd.safetensors"}]}, "loras[0].path"),
    ({"loras": [{"path": "/etc/passwd"}]}, "loras[0].path"),
    ({"loras": [{"path": "nobody/missing.safetensors"}]}, "loras[0].path"),
    ({"loras": [{"path": "ftp://example.com/x.safetensors"}]}, "loras[0].path"),
    ({"loras": [{"path": "sdxl_job/sdxl_job.safetensors", "network_multiplier": 3}]}, "loras[0].network_multiplier"),
    ({"model": "flux_kontext"}, "prompts[0].ctrl_img"),
    ({"model": "flux_kontext", "prompts": [{"prompt": "x", "width": 64, "height": 64, "ctrl_img": "not base64!"}]},
     "prompts[0].ctrl_img"),
])
def test_bad_requests_are_refused_and_queue_nothing(client, loras, change, field):
    before = client.get("/queue").json()["total_count"]
    body = {**sdxl_payload(), **change}
    r = client.post("/v1/inference", json=body)
    assert r.status_code == 422, r.text  # FastAPI's validation status, as the document's server answers
    assert field in violated_fields(r), r.json()
    assert client.get("/queue").json()["total_count"] == before
    # The queue keeps running.
    assert run(client, sdxl_payload(lora=None, sample_steps=1))["status"] == "succeeded"


def test_unknown_requests_are_404(client):
    for path in ("/v1/requests/nope/status", "/v1/requests/nope/result", "/v1/requests/a.b*/status",
                 "/v1/requests/%20/result", "/queue/a.b>", "/queue/nope"):
        r = client.get(path)
        assert r.status_code == 404, (path, r.text)
        assert "Job not found" in r.json()["message"]
    assert client.post("/v1/requests/a.b*/cancel", json={}).status_code == 404
    assert client.delete("/queue/a.b*").status_code == 404


def test_queued_jobs_survive_a_restart_of_nats(mesh, client):
    first = client.post("/v1/inference", json=sdxl_payload(lora=None, width=256, height=256, sample_steps=40)).json()
    second = client.post("/v1/inference", json=sdxl_payload(lora=None, seed=99)).json()
    mesh.restart_nats()
    for job in (first, second):
        assert wait_done(client, job["request_id"])["status"] == "succeeded"


def test_hf_token_is_used_but_never_stored_or_logged(mesh, client):
    token = "hf_never_show_this_4d2a"
    result = run(client, {**sdxl_payload(lora=None), "hf_token": token})
    assert result["status"] == "succeeded"
    assert token not in client.get(f"/queue/{result['request_id']}").text
    assert token not in json.dumps(client.get("/queue").json())
    for log in mesh.log_dir.glob("*.log"):
        assert token not in log.read_text(errors="replace"), log.name


def test_a_job_too_large_for_one_queue_message_is_a_413_naming_the_prompts(client):
    prompts = [{"prompt": "p" * 9_999, "neg": "n" * 9_999} for _ in range(60)]
    r = client.post("/v1/inference", json={"model": "sdxl", "prompts": prompts})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["details"][0]["field_violations"][0]["field"] == "prompts"
    assert "limit of one job" in r.json()["message"]
