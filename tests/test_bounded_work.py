"""Bounded work per inference job: a job asking for more than LORAMESH_MAX_JOB_WORK
(width x height x steps x images) is a 400 naming its fields before anything is queued, on
both APIs; a job running past LORAMESH_JOB_TIME_LIMIT_S stops at its next step and fails
with the reason."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from PIL import Image

from services.common import bus
from services.common.model_thread import ModelThread
from services.common.settings import Settings, SettingsError
from services.inference.worker import Worker
from tests.conftest import violated_fields
from tests.test_inference_worker import job, nats_url, nothing, setup, wait_final  # noqa: F401 (fixture)

LIMIT = 2048 * 2048 * 150 * 4  # the default


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def queue_ids(client: httpx.Client) -> list[str]:
    r = client.get("/queue")
    assert r.status_code == 200, r.text
    return [item["job_id"] for item in r.json()["items"]]


def test_a_huge_generation_job_is_refused_naming_its_fields_and_nothing_is_queued(client, sdxl_loaded):
    before = queue_ids(client)
    r = client.post("/txt2img", json={"prompt": "a lighthouse", "width": 4096, "height": 4096, "steps": 150,
                                      "batch_count": 16})
    assert r.status_code == 400, r.text
    assert sorted(violated_fields(r)) == ["batch_count", "height", "steps", "width"]
    message = r.json()["message"]
    assert "4096 x 4096 x 150 x 16 = 40,265,318,400" in message
    assert f"limit of {LIMIT:,}" in message and "LORAMESH_MAX_JOB_WORK" in message
    assert queue_ids(client) == before


def test_the_documents_normal_jobs_stay_within_the_limit(client, sdxl_loaded):
    """The largest job the default allows passes the work check (its missing input image
    keeps it from being queued); one more image does not."""
    largest = {"prompt": "a lighthouse", "width": 2048, "height": 2048, "steps": 150, "batch_count": 4}
    r = client.post("/img2img", json=largest)
    assert r.status_code == 400 and violated_fields(r) == ["init_image_base64"], r.text
    before = queue_ids(client)
    over = client.post("/txt2img", json={**largest, "batch_count": 5})
    assert over.status_code == 400 and "LORAMESH_MAX_JOB_WORK" in over.json()["message"]
    assert queue_ids(client) == before


def test_a_v1_job_over_the_limit_is_refused(client):
    before = queue_ids(client)
    prompt = {"prompt": "a lighthouse", "width": 4096, "height": 4096, "sample_steps": 150}
    r = client.post("/v1/inference", json={"model": "sdxl", "prompts": [prompt, prompt]})
    assert r.status_code == 422, r.text
    assert violated_fields(r) == ["prompts"]
    message = r.json()["message"]
    assert "summed over its 2 prompts" in message and "5,033,164,800" in message and f"{LIMIT:,}" in message
    assert queue_ids(client) == before


def test_work_and_time_limits_are_checked_settings():
    settings = Settings.load("inference", {})
    assert settings.inference.max_job_work == LIMIT and settings.inference.job_time_limit_s == 3600
    assert Settings.load("inference", {"LORAMESH_JOB_TIME_LIMIT_S": "0"}).inference.job_time_limit_s == 0
    for name, value in (("LORAMESH_MAX_JOB_WORK", "lots"), ("LORAMESH_MAX_JOB_WORK", "0"),
                        ("LORAMESH_JOB_TIME_LIMIT_S", "-1")):
        with pytest.raises(SettingsError, match=name):
            Settings.load("inference", {name: value})


class SlowPipeline:
    """Makes an image slowly, counting the steps it was let run."""

    steps_run = 0

    def set_loras(self, loras) -> None:
        pass

    def generate(self, request, on_step, images=None, on_latents=None):
        for step in range(1, request.steps + 1):
            time.sleep(0.05)
            SlowPipeline.steps_run = step
            on_step(step, request.steps)
        return Image.new("RGB", (request.width, request.height), "teal")


class SlowHost:
    def get(self, key, architecture, load, name=""):
        return SlowPipeline()


def test_a_job_past_the_time_limit_stops_at_its_next_step_and_fails(nats_url, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("LORAMESH_JOB_TIME_LIMIT_S", "0.5")

    async def scenario():
        settings, nc, store = await setup(nats_url, monkeypatch, tmp_path)
        statuses = []

        async def on_status(msg) -> None:
            statuses.append(json.loads(msg.data)["data"])

        subscription = await nc.subscribe("events.inference.*.status", cb=on_status)
        worker = Worker(settings, store, bus.EventPublisher(nc, "inference"), SlowHost(), ModelThread("slow"))
        worker.start()
        slow = job("a slow lighthouse")
        slow.spec.images[0].steps = 200  # ten seconds at this pace
        record, _ = await store.submit(slow, {}, None, nothing)
        ended = await wait_final(store, record.job_id)
        await asyncio.sleep(0.3)
        await subscription.unsubscribe()
        await worker.stop()
        await nc.close()
        return ended, statuses

    ended, statuses = asyncio.run(scenario())
    reason = "the job ran longer than the 0.5 s limit (LORAMESH_JOB_TIME_LIMIT_S)"
    assert ended.status == "failed" and ended.error == reason
    assert ended.outputs == [] and SlowPipeline.steps_run < 200
    assert [s["status"] for s in statuses] == ["processing", "failed"]
    assert statuses[-1]["error"] == reason and statuses[-1]["previous_status"] == "processing"
