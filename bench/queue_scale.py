"""The generation-server queue as its history grows: with 100, 1,000 and 10,000 finished
jobs in the `inference_jobs` bucket, the median time of

- submit        POST /txt2img through the gateway (answers with the job's position),
- one job       GET /queue/{id},
- a page        GET /queue?limit=50,
- the listing   GET /queue, every job;

and the ratio of each at 10,000 to its time at 100 (targets: the first three within 2x,
the full listing of 10,000 under 1 s). Beside the listing, the best plain in-process
code for the same answer (the records already in memory, sorted and written as JSON)
shows what the mesh adds. The finished jobs are copies of one real job's record written
straight into the bucket; the workers' consumer is paused while measuring, so submitted
jobs wait in line (as on a busy server) and nothing competes for the CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import httpx  # noqa: E402
import nats  # noqa: E402

from bench.common import median, workdir  # noqa: E402
from launcher.mesh import Auth, Mesh, Ports  # noqa: E402
from services.common.jobs import key_value  # noqa: E402
from services.inference import jobs  # noqa: E402
from services.inference.jobs import JobRecord, JobStore  # noqa: E402
from tinymodels import diffusion as tiny_diffusion  # noqa: E402

SIZES = (100, 1_000, 10_000)
ROUNDS = 30
LISTING_ROUNDS = 7
JOB = {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 1}


def timed(call, rounds: int) -> float:
    """Median seconds of `call()`."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return median(times)


def ok(response: httpx.Response, status: int = 200) -> httpx.Response:
    assert response.status_code == status, response.text
    return response


async def add_history(nats_url: str, template: JobRecord, count: int) -> None:
    """`count` finished copies of `template`, written through JobStore's bucket."""
    nc = await nats.connect(nats_url)
    store = JobStore(nc, ack_wait=60.0, history_s=3600.0)
    store.kv = await key_value(store.js, jobs.BUCKET)
    now = time.time()
    for start in range(0, count, 500):
        batch = [dataclasses.replace(template, job_id=str(uuid.uuid4()), created_at=now - 60 + i * 1e-3,
                                     started_at=now - 59, completed_at=now - 58)
                 for i in range(start, min(count, start + 500))]
        await asyncio.gather(*(store.kv.create(r.job_id, r.to_json()) for r in batch))
    await nc.close()


async def pause_workers(nats_url: str, paused: bool) -> None:
    """Stops (or lets again) the work queue's consumer handing out jobs."""
    nc = await nats.connect(nats_url)
    body = {"pause_until": "2100-01-01T00:00:00Z"} if paused else {}
    await nc.request(f"$JS.API.CONSUMER.PAUSE.{jobs.QUEUE_STREAM}.{jobs.QUEUE_CONSUMER}", json.dumps(body).encode())
    await nc.close()


def in_process_listing(items: list[dict]) -> bytes:
    """The reference: the listing's records already in memory, in queue order, as JSON."""
    ordered = sorted(items, key=lambda j: j["created_at"])
    return json.dumps({"total_count": len(ordered), "items": ordered}).encode()


def main() -> None:
    results: dict[int, dict[str, float]] = {}
    with workdir() as tmp:
        root = Path(tmp)
        models = root / "inference-models"
        config = models / "configs" / "sdxl"
        tiny_diffusion.build_sdxl_single_file(models / "checkpoints" / "tiny-sdxl.safetensors", config_dir=config)
        env = {"LORAMESH_INFERENCE_MODELS_DIR": str(models), "LORAMESH_SDXL_CONFIG": str(config),
               "LORAMESH_OUTPUT_DIR": str(root / "outputs"), "LORAMESH_MEDIA_ROOTS": str(root),
               "LORAMESH_MODEL_ROOTS": str(models), "HF_HUB_OFFLINE": "1"}
        mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, auth=Auth(jwks=None, api_keys=[]),
                    services=("inference",)).start(timeout=120)
        try:
            with httpx.Client(base_url=mesh.rest_url, timeout=600) as client:
                ok(client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors"}))
                first = ok(client.post("/txt2img", json=JOB), 202).json()["job_id"]
                while client.get(f"/queue/{first}").json()["status"] not in jobs.FINAL:
                    time.sleep(0.1)
                template = asyncio.run(_read(mesh.nats_url, first))
                asyncio.run(pause_workers(mesh.nats_url, True))
                have = 1
                for size in SIZES:
                    asyncio.run(add_history(mesh.nats_url, template, size - have))
                    have = size
                    results[size] = measure(client, first)
                    listing = ok(client.get("/queue")).json()
                    results[size]["reference"] = timed(lambda items=listing["items"]: in_process_listing(items),
                                                       LISTING_ROUNDS)
                    results[size]["listed"] = listing["total_count"]
                asyncio.run(pause_workers(mesh.nats_url, False))
        finally:
            mesh.stop()
    report(results)


async def _read(nats_url: str, job_id: str) -> JobRecord:
    nc = await nats.connect(nats_url)
    store = JobStore(nc, ack_wait=60.0, history_s=3600.0)
    store.kv = await key_value(store.js, jobs.BUCKET)
    record = await store.get(job_id)
    await nc.close()
    return record


def measure(client: httpx.Client, job_id: str) -> dict[str, float]:
    submitted: list[str] = []

    def submit() -> None:
        submitted.append(ok(client.post("/txt2img", json=JOB), 202).json()["job_id"])

    ok(client.get("/queue", params={"limit": 50}))  # warm-up
    figures = {
        "submit": timed(submit, ROUNDS),
        "job": timed(lambda: ok(client.get(f"/queue/{job_id}")), ROUNDS),
        "page": timed(lambda: ok(client.get("/queue", params={"limit": 50})), ROUNDS),
        "listing": timed(lambda: ok(client.get("/queue")), LISTING_ROUNDS),
    }
    for waiting in submitted:  # the line stays short from one size to the next
        ok(client.delete(f"/queue/{waiting}"))
    return figures


def report(results: dict[int, dict[str, float]]) -> None:
    names = {"submit": "POST /txt2img", "job": "GET /queue/{id}", "page": "GET /queue?limit=50",
             "listing": "GET /queue (all)", "reference": "  in-process JSON"}
    small, large = results[SIZES[0]], results[SIZES[-1]]
    print(f"queue with N finished jobs in history: median ms ({ROUNDS} rounds, listing {LISTING_ROUNDS})")
    print(f"  {'':22}" + "".join(f"{f'N={size:,}':>12}" for size in SIZES) + f"{'10k / 100':>12}")
    for key, name in names.items():
        cells = "".join(f"{results[size][key] * 1000:12.1f}" for size in SIZES)
        print(f"  {name:22}{cells}{large[key] / small[key]:11.2f}x")
    ratios = "".join(f"{results[size]['listing'] / results[size]['reference']:12.1f}" for size in SIZES)
    print(f"  {'listing / in-process':22}{ratios}")
    print("  jobs listed            " + "".join(f"{int(results[size]['listed']):12,d}" for size in SIZES))
    print("targets: submit, one job and a page at 10k within 2x of 100 "
          f"({'met' if all(large[k] <= 2 * small[k] for k in ('submit', 'job', 'page')) else 'NOT met'}); "
          f"full listing of 10k under 1 s ({'met' if large['listing'] < 1.0 else 'NOT met'})")


if __name__ == "__main__":
    main()
