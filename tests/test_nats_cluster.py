"""A three-node NATS JetStream cluster on loopback, as deploy/k8s runs it: with
LORAMESH_NATS_REPLICAS=3 the services' own set-up code creates every stream, bucket and
object store with three copies, and a job record and a queued job survive the loss of the
node that led them."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request

import nats.errors
import nats.js.errors
import pytest

from launcher.mesh import BIN_DIR, free_port
from services.common import bus, jobs
from services.common.settings import NatsSettings, Settings
from services.inference import assistant
from services.inference import jobs as inference_jobs
from services.trainer import loss_history, task_store
from services.trainer import store as session_store

NODES = 3


def healthy(monitor_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture
def cluster(tmp_path):
    """Three nats-servers routed to each other: {server name: (client port, process)}."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(NODES)]
    routes = ",".join(f"nats://127.0.0.1:{cluster_port}" for _, cluster_port, _ in ports)
    nodes = {}
    for i, (client, cluster_port, monitor) in enumerate(ports):
        proc = subprocess.Popen(
            [BIN_DIR / "nats-server", "-a", "127.0.0.1", "-p", str(client), "-m", str(monitor), "-js",
             "-sd", tmp_path / f"n{i}", "-n", f"n{i}", "--cluster_name", "loramesh",
             "--cluster", f"nats://127.0.0.1:{cluster_port}", "--routes", routes],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes[f"n{i}"] = (client, monitor, proc)
    try:
        deadline = time.monotonic() + 30
        while not all(healthy(monitor) for _, monitor, _ in nodes.values()):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.2)
        yield nodes
    finally:
        for _, _, proc in nodes.values():
            proc.kill()
            proc.wait(timeout=10)


async def until(call, timeout: float = 20.0):
    """`call()`'s result once the cluster answers it (a new leader takes a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_services_keep_three_copies_and_survive_losing_a_node(cluster):
    settings = Settings.load("inference", {"LORAMESH_NATS_REPLICAS": "3"}).nats
    assert settings == NatsSettings(replicas=3)
    client_port = cluster["n0"][0]
    # A stream made with one copy (before the setting changed) is raised at the next start-up.
    single = await bus.connect(f"nats://127.0.0.1:{client_port}", name="single", nats_settings=NatsSettings())
    await bus.ensure_events_stream(single)
    assert (await single.jetstream().stream_info(bus.EVENTS_STREAM)).config.num_replicas == 1
    await single.close()
    nc = await bus.connect(f"nats://127.0.0.1:{client_port}", name="cluster-test", nats_settings=settings)
    try:
        # What the trainer and inference services create at start-up, as they create it.
        await bus.ensure_events_stream(nc)
        job_store = inference_jobs.JobStore(nc, ack_wait=30, history_s=3600)
        await job_store.setup()
        await session_store.SessionStore(nc, ack_wait=30).setup()
        await task_store.TaskStore(nc, ack_wait=30).setup()
        await loss_history.LossHistory(nc, max_points=10).setup()
        for bucket in (assistant.SETTINGS_BUCKET, assistant.EnhancementStore.bucket, assistant.ChatStore.bucket):
            await jobs.key_value(nc.jetstream(), bucket)
        js = nc.jetstream()

        streams = await js.streams_info()
        assert {s.config.name for s in streams} >= {
            bus.EVENTS_STREAM, inference_jobs.QUEUE_STREAM, session_store.QUEUE_STREAM, task_store.QUEUE_STREAM,
            f"KV_{inference_jobs.BUCKET}", f"KV_{session_store.BUCKET}", f"KV_{task_store.BUCKET}",
            f"OBJ_{inference_jobs.INPUTS_BUCKET}", f"KV_{assistant.SETTINGS_BUCKET}", loss_history.STREAM}
        for info in streams:
            assert info.config.num_replicas == NODES, info.config.name
            assert len(info.cluster.replicas) == NODES - 1, f"{info.config.name}: {info.cluster}"

        await job_store.kv.put("job-1", b'{"status": "pending"}')
        await js.publish(inference_jobs.QUEUE_SUBJECT, b"job-1")
        await job_store.index.stop()

        # Kill the node that leads the job records (the one this client talks to, if it is).
        leader = (await js.stream_info(f"KV_{inference_jobs.BUCKET}")).cluster.leader
        cluster[leader][2].kill()
        cluster[leader][2].wait(timeout=10)

        kv = await until(lambda: js.key_value(inference_jobs.BUCKET))
        assert (await until(lambda: kv.get("job-1"))).value == b'{"status": "pending"}'
        await until(lambda: kv.put("job-2", b"{}"))  # two of three still take writes
        worker = await until(lambda: js.pull_subscribe(
            inference_jobs.QUEUE_SUBJECT, durable=inference_jobs.QUEUE_CONSUMER, stream=inference_jobs.QUEUE_STREAM))
        (msg,) = await until(lambda: worker.fetch(1, timeout=2))
        assert msg.data == b"job-1"
        await msg.ack()
        info = await until(lambda: js.stream_info(f"KV_{inference_jobs.BUCKET}"))
        assert info.cluster.leader != leader
    finally:
        await nc.close()
