"""A session's loss history (GET /sessions/{id}/loss) and ai-toolkit's `logging:` block,
through the gateway: points every log_every steps as steps complete, polling past a step,
use_wandb noted rather than refused, bad logging keys refused naming the key; the history
bounded and a restart's repeated steps replacing the old ones, on the mesh's NATS."""

from __future__ import annotations

import asyncio

import httpx
import nats
import pytest

from services.trainer.loss_history import LossHistory
from tests.conftest import violated_fields
from tests.test_trainer_sessions import payload, wait_for

LOGGING = {"log_every": 2, "use_wandb": True, "verbose": False, "use_ui_logger": True,
           "project_name": "loramesh-tests", "run_name": "loss-history"}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def session_body(sid, media_dir, dataset_dir, models_dir, logging=None):
    body = payload(sid, media_dir / "output" / "loss-history", dataset_dir, models_dir / "tiny-sdxl.safetensors",
                   gradient_checkpointing=False)
    process = body["config"]["config"]["process"][0]
    process["train"]["disable_sampling"] = True  # the chart's points are what is checked here
    if logging is not None:
        process["logging"] = logging
    return body


def test_the_history_grows_every_log_every_steps(client, media_dir, dataset_dir, models_dir):
    sid = "loss-history"
    client.delete(f"/sessions/{sid}")
    created = client.post("/sessions", json=session_body(sid, media_dir, dataset_dir, models_dir, LOGGING))
    assert created.status_code == 200, created.text
    waiting = wait_for(client, sid, lambda s: s["state"] == "waiting")
    # use_wandb is accepted and noted: nothing to reach offline.
    assert any("wandb is not available offline" in note for note in waiting["notes"]), waiting["notes"]
    empty = client.get(f"/sessions/{sid}/loss")
    assert empty.status_code == 200 and empty.json() == {"session_id": sid, "log_every": 2, "points": []}

    client.post(f"/sessions/{sid}/steps", json={"steps": 10})
    status = wait_for(client, sid, lambda s: s["state"] == "waiting" and s["completed_steps"] == 10)
    first = client.get(f"/sessions/{sid}/loss").json()["points"]
    assert [p["step"] for p in first] == [2, 4, 6, 8, 10]
    assert all(p["loss"] > 0 and p["learning_rate"] > 0 and p["time"].endswith("Z") for p in first)
    assert first[-1]["loss"] == pytest.approx(status["loss"]) and first[-1]["learning_rate"] == pytest.approx(
        status["learning_rate"])

    client.post(f"/sessions/{sid}/steps", json={"steps": 6})
    wait_for(client, sid, lambda s: s["state"] == "waiting" and s["completed_steps"] == 16)
    grown = client.get(f"/sessions/{sid}/loss").json()["points"]
    assert [p["step"] for p in grown] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert grown[:5] == first
    # A chart that polls asks only for what it has not drawn yet.
    later = client.get(f"/sessions/{sid}/loss", params={"after_step": 10}).json()["points"]
    assert later == grown[5:]

    # Deleting the session forgets its history; a recreated session starts a fresh one.
    assert client.delete(f"/sessions/{sid}").status_code == 200
    assert client.get(f"/sessions/{sid}/loss").status_code == 404


def test_an_unknown_session_or_a_bad_query_is_refused(client):
    missing = client.get("/sessions/no-such-session/loss")
    assert missing.status_code == 404 and "no-such-session" in missing.json()["message"]
    bad = client.get("/sessions/no-such-session/loss", params={"after_step": -1})
    assert bad.status_code == 400 and violated_fields(bad) == ["after_step"]
    assert client.get("/sessions/no-such-session/samples/0").status_code == 404


@pytest.mark.parametrize(("logging", "field", "words"), [
    ({"log_every": 0}, "config.config.process[0].logging.log_every", "must be an integer >= 1"),
    ({"log_every": 1, "use_tensorboard": True}, "config.config.process[0].logging.use_tensorboard",
     "allowed keys: log_every, project_name, run_name, use_ui_logger, use_wandb, verbose"),
    ({"use_wandb": "yes"}, "config.config.process[0].logging.use_wandb", "true or false"),
])
def test_a_bad_logging_block_is_refused_naming_the_key(client, media_dir, dataset_dir, models_dir, logging, field,
                                                       words):
    sid = "bad-logging"
    answer = client.post("/sessions", json=session_body(sid, media_dir, dataset_dir, models_dir, logging))
    assert answer.status_code == 400, answer.text
    assert violated_fields(answer) == [field]
    assert words in answer.json()["message"]
    assert client.get(f"/sessions/{sid}").status_code == 404  # nothing was created


def test_the_history_keeps_the_newest_points_and_a_restart_replaces_repeated_steps(mesh):
    async def run():
        nc = await nats.connect(mesh.nats_url)
        history = LossHistory(nc, max_points=5, stream="TEST_LOSS_HISTORY", prefix="test.loss")
        try:
            await history.setup()
            await history.clear("bounded")
            for step in range(1, 13):
                await history.append("bounded", step, 1.0 / step, 1e-4)
            kept = await history.points("bounded")
            assert [p.step for p in kept] == [8, 9, 10, 11, 12]
            assert kept[0].loss == pytest.approx(1 / 8)

            # Trained to step 3, then resumed from a checkpoint at step 1: steps 2-3 again.
            await history.clear("restarted")
            for step in (1, 2, 3):
                await history.append("restarted", step, float(step), 1e-4)
            for step in (2, 3):
                await history.append("restarted", step, 10.0 * step, 1e-4)
            assert [(p.step, p.loss) for p in await history.points("restarted")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
            assert await history.points("never-written") == []
        finally:
            await nc.jetstream().delete_stream("TEST_LOSS_HISTORY")
            await nc.close()

    asyncio.run(run())
