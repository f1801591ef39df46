"""Training sessions through the gateway, as the API document's walkthrough runs them:
create with the documented SDXL payload, grant, watch, grant, abort, delete, recreate and
continue from the last checkpoint; a killed trainer resumes; bad input changes nothing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from safetensors import safe_open

from launcher.mesh import free_port
from loramesh.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.settings import REPO_ROOT
from services.trainer import checkpoints
from tests.conftest import violated_fields

# The payload of the walkthrough's step 1, as documented; paths and sizes are swapped in.
SEED_PAYLOAD = json.loads((Path(__file__).parent / "data" / "session_payload.json").read_text())


def payload(session_id: str, training_folder: Path, dataset: Path, model: Path, **train) -> dict:
    body = copy.deepcopy(SEED_PAYLOAD)
    body["sessionId"] = session_id
    body["config"]["config"]["name"] = session_id
    process = body["config"]["config"]["process"][0]
    process["training_folder"] = str(training_folder)
    process["datasets"][0]["folder_path"] = str(dataset)
    process["datasets"][0]["resolution"] = [64]
    process["model"]["name_or_path"] = str(model)
    process["sample"].update(width=64, height=64, sample_steps=4)
    process["train"].update(train)
    return body


def wait_for(client: httpx.Client, session_id: str, done, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/sessions/{session_id}").json()
        if done(status):
            return status
        if status.get("state") == "failed" or time.monotonic() > deadline:
            raise AssertionError(f"session did not get there: {status}")
        time.sleep(0.3)


def paused_at(step: int):
    return lambda s: s["state"] == "waiting" and s["completed_steps"] == step and s["last_checkpoint_step"] == step


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture
def output_dir(media_dir, request) -> Path:
    return media_dir / "output" / request.node.name


def test_the_documented_walkthrough(client, output_dir, dataset_dir, models_dir):
    sid = "sdxl-lora-demo"
    body = payload(sid, output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors")

    # 1. Create: the session loads the model and waits for a budget.
    created = client.post("/sessions", json=body)
    assert created.status_code == 200, created.text
    assert created.json()["max_steps"] == 3000 and created.json()["allowed_steps"] == 0
    waiting = wait_for(client, sid, lambda s: s["state"] == "waiting")
    assert waiting["completed_steps"] == 0 and waiting["device"] == "cpu"
    assert "last_checkpoint_step" not in waiting and not list((output_dir / sid).glob("*.safetensors"))
    assert any("trained in float32 on cpu" in note for note in waiting["notes"])

    # 2. The first 100 steps: paused at 100 with its checkpoint on disk.
    granted = client.post(f"/sessions/{sid}/steps", json={"steps": 100})
    assert granted.status_code == 200 and granted.json()["allowed_steps"] == 100
    status = wait_for(client, sid, paused_at(100))
    checkpoint = Path(status["last_checkpoint_path"])
    assert checkpoint == output_dir / sid / f"{sid}_000000100.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        assert f.metadata()["step"] == "100"
    assert (output_dir / sid / "optimizer.pt").is_file()
    assert status["remaining_steps"] == 0 and status["loss"] > 0 and status["learning_rate"] > 0
    assert status["steps_per_second"] > 0
    assert [s["step"] for s in status["samples"]] == [0, 100]
    assert all(Path(s["path"]).is_file() for s in status["samples"])

    # 3. Another 100.
    assert client.post(f"/sessions/{sid}/steps", json={"steps": 100}).json()["allowed_steps"] == 200
    wait_for(client, sid, paused_at(200))

    # 4. The log replays from the start as server-sent events.
    with client.stream("GET", f"/sessions/{sid}/logs/stream", params={"follow": "false"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        raw = list(stream.iter_lines())
        lines = [json.loads(line[len("data: "):]) for line in raw if line.startswith("data: ")]
    assert lines[0]["message"].startswith("session created")
    progress = [line for line in lines if line["kind"] == "progress"]
    assert [line["step"] for line in progress][-1] == 200 and len(progress) >= 20
    assert any("saved checkpoint" in line["message"] for line in lines)

    # 5. Abort: the checkpoint stays, the session is listed as aborted.
    aborted = client.post(f"/sessions/{sid}/abort")
    assert aborted.status_code == 200 and aborted.json()["state"] == "aborted"
    assert aborted.json()["last_checkpoint_path"].endswith(f"{sid}_000000200.safetensors")
    refused = client.post(f"/sessions/{sid}/steps", json={"steps": 10})
    assert refused.status_code == 400 and "aborted" in refused.json()["message"]

    # 6. Resume elsewhere: abort again (harmless), delete, recreate with the same payload.
    assert client.post(f"/sessions/{sid}/abort").json()["state"] == "aborted"
    deleted = client.delete(f"/sessions/{sid}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert client.get(f"/sessions/{sid}").status_code == 404
    assert checkpoint.is_file()
    assert client.post("/sessions", json=body).status_code == 200
    resumed = wait_for(client, sid, lambda s: s["state"] == "waiting")
    assert resumed["completed_steps"] == 200 and resumed["last_checkpoint_step"] == 200
    client.post(f"/sessions/{sid}/steps", json={"steps": 100})
    wait_for(client, sid, paused_at(300))
    with client.stream("GET", f"/sessions/{sid}/logs/stream", params={"follow": "false"}) as stream:
        text = stream.read().decode()
    assert f"resumed from {sid}_000000200.safetensors at step 200" in text
    client.delete(f"/sessions/{sid}")


@pytest.mark.parametrize("crash", [True, False], ids=["killed", "terminated"])
def test_a_stopped_trainer_resumes_from_its_checkpoint(mesh, client, output_dir, dataset_dir, models_dir, crash):
    """Killed, the session resumes from its last periodic checkpoint once the dead
    replica's heartbeat lapses; terminated, the replica checkpoints where it stopped and
    hands the session straight back. Either way every granted step gets trained."""
    sid = "killed" if crash else "terminated"
    body = payload(sid, output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors", gradient_checkpointing=False)
    process = body["config"]["config"]["process"][0]
    process["save"]["save_every"] = 20
    process["performance_log_every"] = 1
    process["sample"]["sample_every"] = 1000
    process["train"]["skip_first_sample"] = True
    assert client.post("/sessions", json=body).status_code == 200
    wait_for(client, sid, lambda s: s["state"] == "waiting")
    client.post(f"/sessions/{sid}/steps", json={"steps": 60})
    wait_for(client, sid, lambda s: s["completed_steps"] >= 25)

    before_stop = client.get(f"/sessions/{sid}").json()["completed_steps"]
    mesh.stop_service("trainer", crash=crash)
    resumed_at = checkpoints.latest_checkpoint(output_dir, sid).step
    mesh.start_service("trainer")

    status = wait_for(client, sid, paused_at(60))
    assert status["allowed_steps"] == 60
    with client.stream("GET", f"/sessions/{sid}/logs/stream", params={"follow": "false"}) as stream:
        text = stream.read().decode()
    assert f"resumed from {sid}_{resumed_at:09d}.safetensors at step {resumed_at}" in text
    if not crash:  # checkpointed where it stopped, not only at save_every
        assert resumed_at >= before_stop
    client.delete(f"/sessions/{sid}")


def test_sessions_are_listed_and_followed_logs_end_with_the_session(client, output_dir, dataset_dir, models_dir):
    sid = "listed"
    body = payload(sid, output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors")
    body["config"]["config"]["process"][0]["sample"]["sample_every"] = 1000
    assert client.post("/sessions", json=body).status_code == 200
    assert sid in [s["session_id"] for s in client.get("/sessions").json()["sessions"]]
    wait_for(client, sid, lambda s: s["state"] == "waiting")
    client.post(f"/sessions/{sid}/abort")
    with client.stream("GET", f"/sessions/{sid}/logs/stream") as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["kind"] == "status" and "aborted" in events[-1]["message"]
    client.delete(f"/sessions/{sid}")


def bad_request(response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    if field is not None:
        assert field in violated_fields(response), response.json()
    return response.json()["message"]


@pytest.mark.parametrize(("change", "field"), [
    (lambda p: p["train"].update(optimiser="adamw"), "config.config.process[0].train.optimiser"),
    (lambda p: p["train"].update(lr="fast"), "config.config.process[0].train.lr"),
    (lambda p: p["train"].update(batch_size=0), "config.config.process[0].train.batch_size"),
    (lambda p: p["datasets"][0].update(folder_path="/nonexistent/dataset"),
     "config.config.process[0].datasets[0].folder_path"),
    (lambda p: p["model"].update(name_or_path="/etc/passwd"), "config.config.process[0].model.name_or_path"),
    (lambda p: p.update(training_folder="/etc/loramesh"), "config.config.process[0].training_folder"),
    (lambda p: p["network"].update(type="dora"), "config.config.process[0].network.type"),
], ids=["unknown key", "wrong type", "out of range", "missing dataset", "model outside roots",
        "training folder outside roots", "bad enum"])
def test_bad_configs_are_refused_and_create_nothing(client, output_dir, dataset_dir, models_dir, change, field):
    body = payload("refused", output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors")
    change(body["config"]["config"]["process"][0])
    bad_request(client.post("/sessions", json=body), 400, field)
    assert client.get("/sessions/refused").status_code == 404
    assert not (output_dir / "refused").exists()


def test_bad_requests_name_what_is_wrong(client, output_dir, dataset_dir, models_dir):
    body = payload("strict", output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors")
    bad_request(client.post("/sessions", json={**body, "sessionId": "../etc"}), 400, "session_id")
    bad_request(client.post("/sessions", json={**body, "maxSteps": 0}), 400, "max_steps")
    bad_request(client.post("/sessions", json={"sessionId": "no-config"}), 400, "config")
    assert client.get("/sessions/strict").status_code == 404

    body["maxSteps"] = 150
    assert client.post("/sessions", json=body).status_code == 200
    assert "already exists" in bad_request(client.post("/sessions", json=body), 409)
    bad_request(client.post("/sessions/strict/steps", json={"steps": 0}), 400, "steps")
    bad_request(client.post("/sessions/strict/steps", json={"steps": -5}), 400, "steps")
    message = bad_request(client.post("/sessions/strict/steps", json={"steps": 151}), 400, "steps")
    assert "max_steps 150" in message
    assert client.get("/sessions/strict").json()["allowed_steps"] == 0
    assert "no session 'ghost'" in bad_request(client.post("/sessions/ghost/steps", json={"steps": 1}), 404)
    bad_request(client.post("/sessions/ghost/abort"), 404)
    bad_request(client.delete("/sessions/ghost"), 404)
    bad_request(client.get("/sessions/ghost/logs/stream"), 404)
    client.delete("/sessions/strict")


def test_a_session_that_reaches_max_steps_completes(client, output_dir, dataset_dir, models_dir):
    sid = "short"
    body = payload(sid, output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors", skip_first_sample=True)
    body["maxSteps"] = 3
    assert client.post("/sessions", json=body).json()["max_steps"] == 3
    client.post(f"/sessions/{sid}/steps", json={"steps": 3})
    status = wait_for(client, sid, lambda s: s["state"] == "completed")
    assert status["completed_steps"] == 3 and status["last_checkpoint_path"].endswith("_000000003.safetensors")
    assert "completed" in bad_request(client.post(f"/sessions/{sid}/steps", json={"steps": 1}), 400)
    client.delete(f"/sessions/{sid}")


def test_freeing_memory_unloads_a_waiting_session_and_the_next_grant_reloads_it(client, output_dir, dataset_dir,
                                                                                models_dir):
    sid = "freed"
    body = payload(sid, output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors", skip_first_sample=True)
    assert client.post("/sessions", json=body).status_code == 200
    client.post(f"/sessions/{sid}/steps", json={"steps": 2})
    wait_for(client, sid, paused_at(2))

    reports = client.post("/vram/free", json={"timeout_seconds": 45}).json()["reports"]
    trainer = [r for r in reports if r["service"] == "trainer"]
    assert [f["name"] for r in trainer for f in r.get("freed", [])] == [f"session {sid}"]
    assert trainer[0]["bytes_freed"] > 0
    assert client.get(f"/sessions/{sid}").json()["state"] == "waiting"

    client.post(f"/sessions/{sid}/steps", json={"steps": 2})
    wait_for(client, sid, paused_at(4))
    with client.stream("GET", f"/sessions/{sid}/logs/stream", params={"follow": "false"}) as stream:
        assert f"resumed from {sid}_000000002.safetensors at step 2" in stream.read().decode()
    client.delete(f"/sessions/{sid}")


def test_a_model_that_cannot_load_fails_the_session_with_the_reason(client, output_dir, dataset_dir, models_dir):
    broken = models_dir / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    sid = "broken"
    assert client.post("/sessions", json=payload(sid, output_dir, dataset_dir, broken)).status_code == 200
    deadline = time.monotonic() + 60
    while (status := client.get(f"/sessions/{sid}").json())["state"] != "failed":
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert status["error"]
    with client.stream("GET", f"/sessions/{sid}/logs/stream") as stream:
        last = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")][-1]
    assert last["kind"] == "status" and last["error"] == status["error"]
    assert "failed" in bad_request(client.post(f"/sessions/{sid}/steps", json={"steps": 1}), 400)
    client.delete(f"/sessions/{sid}")


def test_any_trainer_replica_answers_for_any_session(mesh, client, output_dir, dataset_dir, models_dir):
    """A second trainer replica beside the mesh's: status, grants and aborts sent to it
    reach the session wherever it runs."""
    port = free_port()
    env = {**mesh.env, "LORAMESH_TRAINER_PORT": str(port)}
    with open(mesh.log_dir / "trainer-2.log", "ab") as log:
        replica = subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env, cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        other = trainer_pb2_grpc.TrainerServiceStub(channel)
        sid = "two-replicas"
        body = payload(sid, output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors", skip_first_sample=True)
        assert client.post("/sessions", json=body).status_code == 200
        wait_for(client, sid, lambda s: s["state"] == "waiting")
        assert other.GetSession(trainer_pb2.GetSessionRequest(session_id=sid), timeout=10).state == "waiting"
        granted = other.GrantSteps(trainer_pb2.GrantStepsRequest(session_id=sid, steps=3), timeout=10)
        assert granted.allowed_steps == 3
        wait_for(client, sid, paused_at(3))
        aborted = other.AbortSession(trainer_pb2.AbortSessionRequest(session_id=sid), timeout=60)
        assert aborted.state == "aborted" and aborted.last_checkpoint_step == 3
        client.delete(f"/sessions/{sid}")
    finally:
        channel.close()
        replica.terminate()
        replica.wait(timeout=30)


def test_a_session_too_large_for_nats_is_a_413_and_creates_nothing(client, output_dir, dataset_dir, models_dir):
    body = payload("huge", output_dir, dataset_dir, models_dir / "tiny-sdxl.safetensors")
    samples = body["config"]["config"]["process"][0]["sample"]["samples"]
    samples[:] = [{**samples[0], "prompt": "a cat " * 1_500} for _ in range(250)]  # 2.3 MB
    r = client.post("/sessions", json=body)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["details"][0]["field_violations"][0]["field"] == "body"
    assert "NATS message" in r.json()["message"]
    assert client.get("/sessions/huge").status_code == 404
    assert not (output_dir / "huge").exists()
