"""Per-service NATS users on a real nats-server started with the authorization block that
deploy/k8s ships (services/common/nats_auth.py): each service, connected through
bus.connect with its own credentials, does its own work with the real store code and is
refused everything else; a client without credentials is refused at once."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import subprocess
import time
import uuid
from pathlib import Path

import nats.errors
import pytest

from launcher.mesh import BIN_DIR, free_port, port_open
from loramesh.v1 import events_pb2
from services.common import bus, jobs, nats_auth
from services.common.settings import REPO_ROOT, NatsSettings, Settings, SettingsError
from services.inference import assistant
from services.inference import jobs as inference_jobs
from services.trainer import loss_history, task_store
from services.trainer import store as session_store

PASSWORDS = {user.name: nats_auth.new_password() for user in nats_auth.USERS}
# How long a call waits for the answer a refused one never gets.
REFUSED_TIMEOUT_S = 1.0


@contextlib.contextmanager
def nats_server(folder: Path, tls_dir: Path | None = None):
    """nats-server with the shipped users (and TLS), its passwords in its environment as in the pod."""
    conf = folder / "nats.conf"
    conf.write_text(nats_auth.render_server_config(store_dir=str(folder / "js"),
                                                   tls_dir=str(tls_dir) if tls_dir else None))
    port = free_port()
    env = {**os.environ, "POD_NAME": "auth-test",
           **{nats_auth.password_variable(name): password for name, password in PASSWORDS.items()}}
    proc = subprocess.Popen([BIN_DIR / "nats-server", "-c", conf, "-a", "127.0.0.1", "-p", str(port),
                             "-m", str(free_port())], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    with nats_server(tmp_path_factory.mktemp("nats-auth")) as url:
        yield url


async def connect_as(url: str, user: str, password: str | None = None):
    return await bus.connect(url, name=f"{user}-test", nats_settings=NatsSettings(
        user=user, password=password or PASSWORDS[user]))


async def publish_event(nc, service: str) -> str:
    subject_id = uuid.uuid4().hex
    await bus.ensure_events_stream(nc)
    await bus.EventPublisher(nc, service).publish(subject_id, events_pb2.EVENT_KIND_LOG, {"line": "hello"})
    return subject_id


async def replayed(nc, service: str, subject_id: str) -> list[events_pb2.Event]:
    async def gone():
        return None

    return [e async for e in bus.replay_events(nc, service, subject_id, follow=False,
                                               final_statuses=frozenset(), find=gone)]


async def test_anonymous_and_wrong_passwords_are_refused_at_once(nats_url):
    for settings in (NatsSettings(), NatsSettings(user="tagger", password="not-its-password"),
                     NatsSettings(user="nobody", password=PASSWORDS["tagger"])):
        started = time.monotonic()
        with pytest.raises(bus.NatsRefused, match="LORAMESH_NATS_USER"):
            await bus.connect(nats_url, name="intruder", nats_settings=settings)
        assert time.monotonic() - started < 5, "a refusal is final, not retried"


async def test_the_inference_user_runs_its_queue_buckets_and_inputs(nats_url):
    nc = await connect_as(nats_url, "inference")
    try:
        await bus.ensure_events_stream(nc)
        store = inference_jobs.JobStore(nc, ack_wait=5, history_s=3600)
        await store.setup()  # its buckets, object store, work queue and the bucket watch
        for bucket in (assistant.SETTINGS_BUCKET, assistant.EnhancementStore.bucket, assistant.ChatStore.bucket):
            kv = await jobs.key_value(nc.jetstream(), bucket)
            await kv.put("probe", b"1")
            assert (await kv.get("probe")).value == b"1"
        await store.kv.put("job-1", b"{}")
        assert (await store.kv.get("job-1")).value == b"{}"
        await store.inputs.put("job-1/init.png", b"\x89PNG")
        assert (await store.inputs.get("job-1/init.png")).data == b"\x89PNG"

        js = nc.jetstream()
        await js.publish(inference_jobs.QUEUE_SUBJECT, b"job-1")
        worker = await js.pull_subscribe(inference_jobs.QUEUE_SUBJECT, durable=inference_jobs.QUEUE_CONSUMER,
                                         stream=inference_jobs.QUEUE_STREAM)
        (msg,) = await worker.fetch(1, timeout=5)
        await msg.in_progress()
        await msg.ack()
        subject_id = await publish_event(nc, "inference")
        assert [e.data["line"] for e in await replayed(nc, "inference", subject_id)] == ["hello"]
        # The queue index follows the bucket through a watch (a push consumer with flow control).
        await store.index.sync()
        assert len(store.index) == 0  # "{}" is no job record; the watch saw it and moved on
        await store.index.stop()
    finally:
        await nc.close()


async def test_the_trainer_user_runs_its_sessions_and_task_queues(nats_url):
    nc = await connect_as(nats_url, "trainer")
    try:
        sessions = session_store.SessionStore(nc, ack_wait=5)
        tasks = task_store.TaskStore(nc, ack_wait=5)
        await sessions.setup()
        await tasks.setup()
        js = nc.jetstream()
        heard = await nc.subscribe("jobs.trainer.tasks.*")
        await js.publish(task_store.queue_subject(5), b"task-1")
        assert (await heard.next_msg(timeout=5)).data == b"task-1"
        pulled = await js.pull_subscribe(task_store.queue_subject(5), durable=task_store.consumer_name(5),
                                         stream=task_store.QUEUE_STREAM)
        (msg,) = await pulled.fetch(1, timeout=5)
        await msg.ack()
        await sessions.kv.put("s-1", b"{}")
        assert (await tasks.kv.put("t-1", b"{}")) > 0
        history = loss_history.LossHistory(nc, max_points=10)
        await history.setup()
        await history.append("s-1", 1, 0.5, 1e-4)
        assert [p.loss for p in await history.points("s-1")] == [0.5]
        await history.clear("s-1")
        await bus.EventPublisher(nc, "trainer").publish_status("replica-1", {"clients": 0})
        # Grants reach the replica running a session.
        grants = await nc.subscribe(session_store.control_subject("s-1"))
        await nc.publish(session_store.control_subject("s-1"), b"grant")
        assert (await grants.next_msg(timeout=5)).data == b"grant"
    finally:
        await nc.close()


@pytest.mark.parametrize("service", ["tagger", "captioner"])
async def test_light_services_publish_their_events_and_answer_memory_requests(nats_url, service):
    nc = await connect_as(nats_url, service)
    asker = await connect_as(nats_url, "inference")
    bridge = await connect_as(nats_url, "events-bridge")
    try:
        seen = await bridge.subscribe("events.>")
        await bridge.flush()
        subject_id = await publish_event(nc, service)
        assert (await seen.next_msg(timeout=5)).subject == f"events.{service}.{subject_id}.log"
        assert [e.data["line"] for e in await replayed(nc, service, subject_id)] == ["hello"]
        status = await bridge.subscribe("status.>")
        await bridge.flush()
        await bus.EventPublisher(nc, service).publish_status("replica-1", {"state": "idle"})
        assert (await status.next_msg(timeout=5)).subject == f"status.{service}.replica-1"

        async def answer(msg):
            await msg.respond(service.encode())

        await nc.subscribe(nats_auth.MEMORY_FREE, cb=answer)
        await nc.flush()
        assert (await asker.request(nats_auth.MEMORY_FREE, b"", timeout=5)).data == service.encode()
    finally:
        for client in (nc, asker, bridge):
            await client.close()


async def test_the_tagger_cannot_queue_jobs_or_read_another_services_state(nats_url):
    owner = await connect_as(nats_url, "inference")
    tagger = await connect_as(nats_url, "tagger")
    try:
        await inference_jobs.JobStore(owner, ack_wait=5, history_s=3600).setup()
        queued_before = (await owner.jetstream().stream_info(inference_jobs.QUEUE_STREAM)).state.messages
        js = tagger.jetstream(timeout=REFUSED_TIMEOUT_S)
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(inference_jobs.QUEUE_SUBJECT, b"smuggled job")
        await tagger.publish(inference_jobs.QUEUE_SUBJECT, b"smuggled job")  # core publish: dropped
        with pytest.raises(nats.errors.TimeoutError):
            await js.key_value(inference_jobs.BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await js.pull_subscribe(inference_jobs.QUEUE_SUBJECT, durable=inference_jobs.QUEUE_CONSUMER,
                                    stream=inference_jobs.QUEUE_STREAM)
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream(inference_jobs.QUEUE_STREAM)
        # Nor can it cancel an inference job or impersonate another service's events.
        watcher = await owner.subscribe("control.inference.>")
        await owner.flush()
        await tagger.publish(inference_jobs.control_subject("job-1"), b"cancel")
        with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
            await watcher.next_msg(timeout=REFUSED_TIMEOUT_S)
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish("events.inference.job-1.status", b"{}")
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(f"{loss_history.SUBJECT}.s-1", b"{}")
        await tagger.flush()
        assert (await owner.jetstream().stream_info(inference_jobs.QUEUE_STREAM)).state.messages == queued_before
        assert tagger.is_connected, "a refused subject does not cost the service its connection"
    finally:
        await owner.close()
        await tagger.close()


async def test_the_events_bridge_only_listens(nats_url):
    bridge = await connect_as(nats_url, "events-bridge")
    owner = await connect_as(nats_url, "inference")
    try:
        seen = await owner.subscribe("events.>")
        await owner.flush()
        await bridge.publish("events.inference.job-1.status", b"forged")
        await bridge.publish(inference_jobs.QUEUE_SUBJECT, b"forged")
        await bridge.flush()
        with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
            await seen.next_msg(timeout=REFUSED_TIMEOUT_S)
        with pytest.raises(nats.errors.TimeoutError):
            await bridge.jetstream(timeout=REFUSED_TIMEOUT_S).stream_info(bus.EVENTS_STREAM)
    finally:
        await bridge.close()
        await owner.close()


def test_the_table_names_what_the_code_creates():
    users = {user.name: user for user in nats_auth.USERS}
    assert set(users) == {"trainer", "captioner", "tagger", "inference", "events-bridge"}
    assert {session_store.BUCKET, task_store.BUCKET} == set(users["trainer"].buckets)
    assert {session_store.QUEUE_STREAM, task_store.QUEUE_STREAM, loss_history.STREAM,
            bus.EVENTS_STREAM} == set(users["trainer"].streams)
    assert f"{loss_history.SUBJECT}.>" in users["trainer"].publish
    assert bus.STATUS_SUBJECTS in users["events-bridge"].subscribe
    assert {inference_jobs.BUCKET, inference_jobs.STATE_BUCKET, assistant.SETTINGS_BUCKET,
            assistant.EnhancementStore.bucket, assistant.ChatStore.bucket} == set(users["inference"].buckets)
    assert users["inference"].object_stores == (inference_jobs.INPUTS_BUCKET,)
    assert nats_auth.EVENTS_STREAM == bus.EVENTS_STREAM


def test_nats_settings_are_checked_at_start_up(tmp_path):
    assert Settings.load("tagger", {}).nats == NatsSettings()
    loaded = Settings.load("tagger", {"LORAMESH_NATS_USER": "tagger", "LORAMESH_NATS_PASSWORD": "s3cret-word",
                                      "LORAMESH_NATS_REPLICAS": "3"}).nats
    assert (loaded.user, loaded.password, loaded.replicas) == ("tagger", "s3cret-word", 3)
    assert "s3cret-word" not in repr(loaded), "passwords stay out of logs"
    for environ, named in [
        ({"LORAMESH_NATS_REPLICAS": "0"}, "LORAMESH_NATS_REPLICAS"),
        ({"LORAMESH_NATS_REPLICAS": "three"}, "LORAMESH_NATS_REPLICAS"),
        ({"LORAMESH_NATS_USER": "tagger"}, "LORAMESH_NATS_PASSWORD"),
        ({"LORAMESH_NATS_TLS_CA": str(tmp_path / "missing.pem")}, "LORAMESH_NATS_TLS_CA"),
        ({"LORAMESH_NATS_TLS_CERT": str(tmp_path)}, "LORAMESH_NATS_TLS_KEY"),
    ]:
        with pytest.raises(SettingsError, match=named):
            Settings.load("tagger", environ)
    creds = Path(tmp_path / "user.creds")
    creds.write_text("creds")
    assert bus.connect_options(NatsSettings(creds=creds)) == {"user_credentials": str(creds)}


def make_secrets_module():
    spec = importlib.util.spec_from_file_location("make_secrets", REPO_ROOT / "deploy" / "k8s" / "make_secrets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_tls_with_the_certificates_make_secrets_makes(tmp_path):
    """The nats-tls component's setup: the server requires TLS, a client with the CA gets in."""
    tls = tmp_path / "tls"
    tls.mkdir()
    # The Kubernetes names, and this test's loopback address.
    for name, pem in make_secrets_module().nats_certificates(extra_names=("127.0.0.1",)).items():
        (tls / name).write_text(pem)
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_text(make_secrets_module().nats_certificates()["ca.crt"])
    with nats_server(tmp_path, tls_dir=tls) as url:
        nc = await bus.connect(url, name="tls-test", nats_settings=NatsSettings(
            user="tagger", password=PASSWORDS["tagger"], tls_ca=tls / "ca.crt"))
        try:
            assert nc.is_connected
            await publish_event(nc, "tagger")
        finally:
            await nc.close()
        for settings in (NatsSettings(user="tagger", password=PASSWORDS["tagger"]),
                         NatsSettings(user="tagger", password=PASSWORDS["tagger"], tls_ca=other_ca)):
            started = time.monotonic()
            with pytest.raises(bus.NatsRefused, match="certificate verify failed"):
                await bus.connect(url, name="unchecked", nats_settings=settings)
            assert time.monotonic() - started < 5
