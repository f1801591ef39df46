"""The NATS → WebSocket events bridge behind Envoy's WebSocket listener, with a real
nats-server: documented message shapes, client filters, health, and NATS restarts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import nats
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from gateway import envoy_config, envoy_runner
from gateway.events_bridge import to_client_message
from launcher.mesh import BIN_DIR, free_port
from loramesh.v1 import events_pb2
from services.common.settings import REPO_ROOT

DESCRIPTOR = REPO_ROOT / "gen" / "loramesh.pb"


def wait_until(ready, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class Nats:
    """A nats-server with JetStream that can be restarted on the same port and store."""

    def __init__(self, store):
        self.port = free_port()
        self.monitor = free_port()
        self.store = store
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [BIN_DIR / "nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor),
             "-js", "-sd", str(self.store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: answers(f"http://127.0.0.1:{self.monitor}/healthz"), "nats-server")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    """nats-server, the bridge and an Envoy whose WebSocket listener leads to it."""
    tmp = tmp_path_factory.mktemp("events")
    server = Nats(tmp / "nats")
    server.start()
    bridge_port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")])}
    with open(tmp / "bridge.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.events_bridge", "--nats", server.url, "--host", "127.0.0.1",
             "--port", str(bridge_port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    cfg = envoy_config.GatewayConfig(
        descriptor_path=DESCRIPTOR, upstreams={}, rest_ports=[free_port()], websocket_port=free_port(),
        events_bridge=("127.0.0.1", bridge_port), admin_port=free_port(), listen_address="127.0.0.1",
        access_log_path=str(tmp / "access.log"),
    )
    envoy = envoy_runner.start(envoy_config.write(cfg, tmp / "envoy.yaml"), tmp / "envoy.log")
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{bridge_port}/healthz"), "the events bridge")
        envoy_runner.wait_ready(cfg.admin_port)
        yield {"nats": server, "ws": f"ws://127.0.0.1:{cfg.websocket_port}", "port": bridge_port}
    finally:
        envoy_runner.stop(envoy)
        proc.terminate()
        proc.wait(10)
        server.stop()


def event(subject_id: str, kind: str, service: str = "inference", **data) -> dict:
    return {"id": f"e-{subject_id}-{kind}", "service": service, "subject_id": subject_id, "kind": kind,
            "time": "2026-01-01T00:00:00.123456Z", "data": data}


async def publish_until_received(nats_url: str, subject: str, payload: dict, ws) -> dict:
    """Publishes until the client sees a message: the bridge's subscription may still be on
    its way to the server (at start, or after NATS restarted)."""
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(20):
            while True:
                await nc.publish(subject, json.dumps(payload).encode())
                try:
                    return json.loads(await asyncio.wait_for(ws.recv(), timeout=0.3))
                except TimeoutError:
                    continue
    finally:
        await nc.close()


async def test_job_events_reach_websocket_clients_in_the_documented_shape(bridge):
    async with ws_connect(bridge["ws"]) as ws:
        message = await publish_until_received(
            bridge["nats"].url, "events.inference.j1.job_added", event("j1", "EVENT_KIND_JOB_ADDED", position=2), ws)
    assert message == {"event": "job_added", "timestamp": "2026-01-01T00:00:00.123Z",
                       "data": {"position": 2, "job_id": "j1"}}


async def test_clients_receive_only_what_their_filter_asks_for(bridge):
    async with ws_connect(bridge["ws"] + "/?subject_id=j2") as only_j2, ws_connect(bridge["ws"]) as everything:
        other_job = await publish_until_received(bridge["nats"].url, "events.inference.j3.progress",
                                                 event("j3", "EVENT_KIND_PROGRESS", step=1, total_steps=4), everything)
        nc = await nats.connect(bridge["nats"].url)
        try:
            await nc.publish("events.inference.j2.status",
                             json.dumps(event("j2", "EVENT_KIND_STATUS", status="completed")).encode())
            filtered = json.loads(await asyncio.wait_for(only_j2.recv(), timeout=10))
        finally:
            await nc.close()
    assert other_job["data"]["job_id"] == "j3"
    # The j3 events went by without reaching the client that asked for j2 only.
    assert filtered == {"event": "job_status_changed", "timestamp": "2026-01-01T00:00:00.123Z",
                        "data": {"status": "completed", "job_id": "j2"}}


async def test_unknown_filter_is_refused(bridge):
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(bridge["ws"] + "/?colour=red"):
            pass
    assert refused.value.response.status_code == 400
    assert b"colour" in refused.value.response.body


async def test_bridge_follows_nats_through_a_restart(bridge):
    server = bridge["nats"]
    server.stop()
    server.start()
    async with ws_connect(bridge["ws"]) as ws:
        message = await publish_until_received(
            server.url, "events.trainer.s1.log", event("s1", "EVENT_KIND_LOG", "trainer", message="hello"), ws)
    assert message["event"] == "trainer_log"
    assert message["data"] == {"message": "hello", "id": "s1", "service": "trainer"}


async def test_replica_status_reaches_clients_as_server_status(bridge):
    """Replicas' heartbeats travel on core NATS (status.<service>.<replica>), outside the stream."""
    async with ws_connect(bridge["ws"]) as ws:
        message = await publish_until_received(
            bridge["nats"].url, "status.inference.host-1",
            event("host-1", "EVENT_KIND_SERVER_STATUS", replica="host-1", model_loaded=False), ws)
    assert message["event"] == "server_status"
    assert message["data"] == {"replica": "host-1", "model_loaded": False}


def test_event_kinds_map_to_documented_names():
    documented = {
        "EVENT_KIND_JOB_ADDED": "job_added", "EVENT_KIND_STATUS": "job_status_changed",
        "EVENT_KIND_PROGRESS": "job_progress", "EVENT_KIND_PREVIEW": "job_preview",
        "EVENT_KIND_JOB_CANCELLED": "job_cancelled", "EVENT_KIND_MODEL_LOADING_PROGRESS": "model_loading_progress",
        "EVENT_KIND_MODEL_LOADED": "model_loaded", "EVENT_KIND_MODEL_UNLOADED": "model_unloaded",
        "EVENT_KIND_UPSCALER_LOADED": "upscaler_loaded", "EVENT_KIND_UPSCALER_UNLOADED": "upscaler_unloaded",
        "EVENT_KIND_SERVER_STATUS": "server_status"}
    assert {kind: to_client_message(event("j", kind))["event"] for kind in documented} == documented
    # Every kind but the unspecified one has its name.
    assert set(documented) == set(events_pb2.EventKind.keys()) - {"EVENT_KIND_UNSPECIFIED", "EVENT_KIND_LOG"}
    assert to_client_message(event("s", "EVENT_KIND_PROGRESS", "trainer", step=1))["event"] == "trainer_progress"
    # A job's events carry its id; a model's carry what the replica published.
    assert to_client_message(event("j", "EVENT_KIND_JOB_CANCELLED"))["data"] == {"job_id": "j"}
    assert to_client_message(event("m.safetensors", "EVENT_KIND_MODEL_LOADED", model_name="m.safetensors")
                             )["data"] == {"model_name": "m.safetensors"}
