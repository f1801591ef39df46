"""How a worker meets device failures, on a real NATS server: out-of-memory fails only the
job that hit it and the next job runs; a CUDA error that leaves the device unusable ends
the process without acknowledging, so a healthy worker runs the job again. GPU failures
cannot happen on this CPU, so a stand-in pipeline raises the errors torch raises."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time

import nats
import pytest
import torch
from PIL import Image

from launcher.mesh import BIN_DIR, free_port, wait_port
from services.common import bus
from services.common.model_thread import ModelThread
from services.common.settings import Settings
from services.inference import jobs
from services.inference.job_spec import SERVER_API, TXT2IMG, ImageSpec, JobSpec, ModelRef
from services.inference.jobs import JobRecord, JobStore
from services.inference.worker import EXIT_DEVICE_LOST, Worker


class DeviceLost(BaseException):
    """What os._exit stands for in this process: the worker stops dead."""


class StandInPipeline:
    """Fails the way a GPU does for prompts that say so, else makes a plain image."""

    def set_loras(self, loras) -> None:
        pass

    def generate(self, request, on_step, images=None, on_latents=None):
        if request.prompt == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if request.prompt == "illegal access":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        for step in range(1, request.steps + 1):
            on_step(step, request.steps)
        return Image.new("RGB", (request.width, request.height), "purple")


class StandInHost:
    def get(self, key, architecture, load, name=""):
        return StandInPipeline()


@pytest.fixture
def nats_url(tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(BIN_DIR / "nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 10.0, "nats")
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def job(prompt: str) -> JobRecord:
    image = ImageSpec(prompt=prompt, width=32, height=32, steps=3, guidance_scale=1.0, seed=1)
    spec = JobSpec(type=TXT2IMG, api=SERVER_API, model=ModelRef(catalog="sdxl"), architecture="SDXL", images=[image],
                   params={"prompt": prompt})
    return JobRecord(job_id=f"job-{prompt.replace(' ', '-')}-{time.monotonic_ns()}", spec=spec)


async def wait_final(store: JobStore, job_id: str, timeout: float = 30.0) -> JobRecord:
    deadline = time.monotonic() + timeout
    while (record := await store.get(job_id)).status not in jobs.FINAL:
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.05)
    return record


async def setup(nats_url: str, monkeypatch, tmp_path, history_s: float = 3600.0):
    monkeypatch.setenv("LORAMESH_OUTPUT_DIR", str(tmp_path / "outputs"))
    settings = Settings.load("inference")
    nc = await nats.connect(nats_url)
    await bus.ensure_events_stream(nc)
    store = JobStore(nc, ack_wait=1.0, history_s=history_s)
    await store.setup()
    return settings, nc, store


async def nothing(record, position) -> None:
    pass


def test_out_of_memory_fails_only_the_job_that_hit_it(nats_url, monkeypatch, tmp_path):
    async def scenario():
        settings, nc, store = await setup(nats_url, monkeypatch, tmp_path)
        worker = Worker(settings, store, bus.EventPublisher(nc, "inference"), StandInHost(), ModelThread("t"))
        worker.start()
        oom, _ = await store.submit(job("oom"), {}, None, nothing)
        fine, _ = await store.submit(job("fine"), {}, None, nothing)
        failed, done = await wait_final(store, oom.job_id), await wait_final(store, fine.job_id)
        await worker.stop()
        await nc.close()
        return failed, done

    failed, done = asyncio.run(scenario())
    assert failed.status == "failed" and failed.error.startswith("out of memory: CUDA out of memory")
    assert done.status == "completed" and done.outputs == [f"{done.job_id}/image_0.png"]
    assert (tmp_path / "outputs" / done.outputs[0]).is_file()


def test_a_lost_device_ends_the_worker_and_a_healthy_one_runs_the_job(nats_url, monkeypatch, tmp_path):
    import services.inference.worker as worker_module

    exits = []

    def exit_now(code: int):
        exits.append(code)
        raise DeviceLost()

    monkeypatch.setattr(worker_module.os, "_exit", exit_now)

    async def scenario():
        settings, nc, store = await setup(nats_url, monkeypatch, tmp_path)
        events = bus.EventPublisher(nc, "inference")
        broken = Worker(settings, store, events, StandInHost(), ModelThread("broken"))
        broken.start()
        record, _ = await store.submit(job("illegal access"), {}, None, nothing)
        deadline = time.monotonic() + 10
        while not exits:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        broken._task.cancel()  # the process is gone: its loop takes nothing more
        left = await store.get(record.job_id)
        # What a process that exits mid-job leaves (os._exit runs no cleanup): its staging.
        stale = tmp_path / "outputs" / record.job_id / ".attempt-1"
        stale.mkdir(parents=True, exist_ok=True)
        (stale / "image_0.png").write_bytes(b"half written")

        class HealedPipeline(StandInPipeline):
            def generate(self, request, on_step, images=None, on_latents=None):
                request.prompt = "healthy device"
                return super().generate(request, on_step)

        class HealedHost:
            def get(self, key, architecture, load, name=""):
                return HealedPipeline()

        healthy = Worker(settings, store, events, HealedHost(), ModelThread("healthy"))
        healthy.start()
        done = await wait_final(store, record.job_id)
        await healthy.stop()
        await nc.close()
        return left, done

    left, done = asyncio.run(scenario())
    assert exits == [EXIT_DEVICE_LOST]
    assert left.status == "processing"  # never acknowledged, never marked failed
    assert done.status == "completed" and done.attempts == 2
    # The dead attempt's staging went when the next attempt completed the job.
    assert sorted(p.name for p in (tmp_path / "outputs" / done.job_id).iterdir()) == ["config.json", "image_0.png"]


def test_jobs_leave_the_history_after_it_expires_and_are_never_run(nats_url, monkeypatch, tmp_path):
    async def scenario():
        settings, nc, store = await setup(nats_url, monkeypatch, tmp_path, history_s=1.0)
        record, _ = await store.submit(job("forgotten"), {"init": b"png bytes"}, None, nothing)
        listed = [r.job_id for r in await store.list()]
        await asyncio.sleep(2.5)
        gone = await store.find(record.job_id)
        left = await store.list()
        worker = Worker(settings, store, bus.EventPublisher(nc, "inference"), StandInHost(), ModelThread("late"))
        worker.start()
        await asyncio.sleep(1.5)  # the late worker takes the message and drops it
        consumer = await store.js.consumer_info(jobs.QUEUE_STREAM, jobs.QUEUE_CONSUMER)
        await worker.stop()
        await nc.close()
        return record, listed, gone, left, consumer

    record, listed, gone, left, consumer = asyncio.run(scenario())
    assert listed == [record.job_id]
    assert gone is None and left == []
    assert consumer.num_pending == 0 and consumer.num_ack_pending == 0
    assert not (tmp_path / "outputs" / record.job_id).exists()


def test_a_worker_whose_job_was_taken_over_drops_its_result(nats_url, monkeypatch, tmp_path):
    """A worker whose heartbeats lapse (NATS away, a stalled machine) loses its job to another
    worker; when it finishes anyway, its result is dropped: the job completes once."""
    release = threading.Event()

    class StalledPipeline(StandInPipeline):
        def generate(self, request, on_step, images=None, on_latents=None):
            release.wait(30)
            return Image.new("RGB", (request.width, request.height), "red")

    class StalledHost:
        def get(self, key, architecture, load, name=""):
            return StalledPipeline()

    class SilentWorker(Worker):
        async def _heartbeat(self, msg) -> None:
            await asyncio.Event().wait()

    async def scenario():
        settings, nc, store = await setup(nats_url, monkeypatch, tmp_path)
        events = bus.EventPublisher(nc, "inference")
        stalled = SilentWorker(settings, store, events, StalledHost(), ModelThread("stalled"))
        stalled.start()
        record, _ = await store.submit(job("taken over"), {}, None, nothing)
        while (await store.get(record.job_id)).status != "processing":
            await asyncio.sleep(0.05)
        running = stalled.current
        stalled._task.cancel()  # takes nothing more, but finishes the job it holds
        healthy = Worker(settings, store, events, StandInHost(), ModelThread("healthy"))
        healthy.start()
        done = await wait_final(store, record.job_id)
        release.set()
        await running
        after = await store.get(record.job_id)
        statuses = []
        sub = await nc.jetstream().subscribe(f"events.inference.{record.job_id}.status", ordered_consumer=True)
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            while True:
                statuses.append(json.loads((await sub.next_msg(timeout=1)).data)["data"]["status"])
        await healthy.stop()
        await nc.close()
        return done, after, statuses

    done, after, statuses = asyncio.run(scenario())
    assert done.status == "completed" and done.attempts == 2
    assert after.to_json() == done.to_json()  # the stalled worker's late result changed nothing
    assert statuses.count("completed") == 1, statuses
    image = Image.open(tmp_path / "outputs" / done.outputs[0])
    assert image.getpixel((0, 0)) == (128, 0, 128)  # purple: the healthy worker's picture
