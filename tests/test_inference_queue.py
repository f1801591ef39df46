"""The generation-server queue through the gateway: positions are places in the queue's
real line (distinct, in the order jobs start, cancelled jobs no longer counted, 1 for an
idle queue), job_added reaches clients before a job starts, and GET /queue filters and
pages its items while its counts stay totals."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import violated_fields

FINAL = ("completed", "failed", "cancelled")
SMALL = {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 1}
# Runs for minutes on this CPU unless cancelled, which it is at its next step.
LONG = {"prompt": "keeps the worker busy", "width": 512, "height": 512, "steps": 100, "batch_count": 4}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def wait_idle(client: httpx.Client, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while (queue := client.get("/queue", params={"limit": 1}).json())["pending_count"] or queue["processing_count"]:
        assert time.monotonic() < deadline, queue
        time.sleep(0.1)


def wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/queue/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def submit(client: httpx.Client, **body) -> dict:
    r = client.post("/txt2img", json={**SMALL, **body})
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture
def busy(client, sdxl_loaded):
    """A long job the worker is running, so new jobs wait; stopped when the test ends."""
    wait_idle(client)
    job = submit(client, **LONG)
    wait_status(client, job["job_id"], ("processing",))
    yield job
    client.post(f"/v1/requests/{job['job_id']}/cancel", json={})
    wait_status(client, job["job_id"], FINAL)


def test_an_idle_queue_gives_position_1_and_lists_the_job_at_once(client, sdxl_loaded):
    wait_idle(client)
    before = client.get("/queue").json()["total_count"]
    job = submit(client)
    assert job["position"] == 1 and job["status"] == "pending"
    listed = client.get("/queue").json()
    assert listed["total_count"] == before + 1 and listed["items"][-1]["job_id"] == job["job_id"]
    assert wait_status(client, job["job_id"], FINAL)["status"] == "completed"
    assert submit(client)["position"] == 1  # the queue is idle again


def test_concurrent_submissions_get_distinct_positions_in_the_order_they_start(mesh, client, busy):
    jobs = asyncio.run(_submit_concurrently(mesh.rest_url, 20))
    positions = {job["job_id"]: job["position"] for job in jobs}
    assert sorted(positions.values()) == list(range(1, 21)), positions
    by_position = sorted(positions, key=positions.get)
    pending = client.get("/queue", params={"status": "pending"}).json()["items"]
    assert [j["job_id"] for j in pending] == by_position  # the listing shows the same line

    client.post(f"/v1/requests/{busy['job_id']}/cancel", json={})
    done = [wait_status(client, job_id, FINAL) for job_id in by_position]
    assert [j["status"] for j in done] == ["completed"] * 20
    started = [j["started_at"] for j in done]
    assert started == sorted(started) and len(set(started)) == 20, started

    # Each job was announced, with the position its submitter got, before it started.
    for job_id in by_position:
        with client.stream("GET", f"/queue/{job_id}/events") as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        assert (events[0]["event"], events[0]["data"]) == \
            ("job_added", {"job_id": job_id, "type": "txt2img", "position": positions[job_id]})
        statuses = [e["data"]["status"] for e in events if e["event"] == "job_status_changed"]
        assert statuses == ["processing", "completed"], events


async def _submit_concurrently(url: str, count: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        answers = await asyncio.gather(*(client.post("/txt2img", json={**SMALL, "seed": i}) for i in range(count)))
    assert [a.status_code for a in answers] == [202] * count, [a.text for a in answers]
    return [a.json() for a in answers]


def test_a_cancelled_pending_job_no_longer_counts_in_later_positions(client, busy):
    first, second, third = (submit(client, seed=i) for i in range(3))
    assert [first["position"], second["position"], third["position"]] == [1, 2, 3]
    assert client.delete(f"/queue/{second['job_id']}").status_code == 200
    assert submit(client, seed=3)["position"] == 3  # first and third are ahead
    # The async API's cancel takes a pending job out of line too.
    r = client.post(f"/v1/requests/{first['job_id']}/cancel", json={})
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert submit(client, seed=4)["position"] == 3  # third and the job at 3 before
    pending = client.get("/queue", params={"status": "pending"}).json()
    assert pending["pending_count"] == 3 and len(pending["items"]) == 3
    for job in pending["items"]:
        client.delete(f"/queue/{job['job_id']}")


def test_the_queue_filters_by_status_and_pages_while_counts_stay_totals(client, sdxl_loaded):
    wait_idle(client)
    cancelled_job = submit(client, **LONG)
    waiting = submit(client, seed=5)
    assert client.delete(f"/queue/{waiting['job_id']}").status_code == 200
    client.post(f"/v1/requests/{cancelled_job['job_id']}/cancel", json={})
    wait_status(client, cancelled_job["job_id"], FINAL)
    for seed in (6, 7):
        wait_status(client, submit(client, seed=seed)["job_id"], FINAL)

    full = client.get("/queue").json()
    counts = {k: v for k, v in full.items() if k != "items"}
    assert counts["total_count"] == len(full["items"]) >= 4
    for status in ("pending", "processing", "completed", "failed", "cancelled"):
        page = client.get("/queue", params={"status": status}).json()
        assert {k: v for k, v in page.items() if k != "items"} == counts
        assert page.get("items", []) == [j for j in full["items"] if j["status"] == status], status
    assert waiting["job_id"] in [j["job_id"] for j in client.get("/queue", params={"status": "cancelled"}).json()["items"]]

    ids = [j["job_id"] for j in full["items"]]
    assert [j["job_id"] for j in client.get("/queue", params={"limit": 2, "offset": 1}).json()["items"]] == ids[1:3]
    assert [j["job_id"] for j in client.get("/queue", params={"offset": len(ids) - 1}).json()["items"]] == ids[-1:]
    assert client.get("/queue", params={"offset": len(ids)}).json().get("items", []) == []
    completed = [j["job_id"] for j in full["items"] if j["status"] == "completed"]
    page = client.get("/queue", params={"status": "completed", "limit": 1, "offset": len(completed) - 1}).json()
    assert [j["job_id"] for j in page["items"]] == completed[-1:]


@pytest.mark.parametrize("params, fields", [
    ({"status": "done"}, ["status"]),
    ({"status": "PENDING"}, ["status"]),
    ({"limit": 0}, ["limit"]),
    ({"limit": 1001}, ["limit"]),
    ({"offset": -1}, ["offset"]),
    ({"status": "queued", "limit": 5000, "offset": -3}, ["status", "limit", "offset"]),
])
def test_bad_queue_filters_are_400s_naming_the_field(client, params, fields):
    r = client.get("/queue", params=params)
    assert r.status_code == 400, r.text
    assert violated_fields(r) == fields
    if "status" in fields:
        assert "pending, processing, completed, failed, cancelled" in r.json()["message"]
    assert r.json().get("error"), (r.headers, r.json())  # the generation-server document's own error field
