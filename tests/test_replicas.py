"""Several replicas of a service behind Envoy on one machine: LORAMESH_REPLICAS, the
launcher's replica processes, Envoy's endpoints, health checks and safe retries, jobs
spreading over replicas, and a killed replica routed around and brought back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import nats
import pytest
import yaml

from gateway import envoy_config, envoy_runner
from launcher.mesh import Mesh, Ports, plan_replicas, port_open
from services.common.settings import SERVICE_PORTS, Settings, SettingsError
from tests.conftest import wait_for
from tinymodels import diffusion as tiny_diffusion

DESCRIPTOR = Path(__file__).resolve().parents[1] / "gen" / "loramesh.pb"


# ---- LORAMESH_REPLICAS ---------------------------------------------------------------------


def test_replicas_are_read_from_the_environment():
    assert Settings.load(environ={}).gateway.replicas == {}
    settings = Settings.load(environ={"LORAMESH_REPLICAS": "inference=2, tagger=3"})
    assert settings.gateway.replicas == {"inference": 2, "tagger": 3}


@pytest.mark.parametrize("value, allowed", [
    ("gpu=2", "allowed: trainer, captioner, tagger, inference"),
    ("inference=0", "between 1 and 16"),
    ("inference=17", "between 1 and 16"),
    ("inference=two", "name=number pairs"),
    ("inference", "name=number pairs"),
])
def test_bad_replicas_name_the_variable_and_what_it_allows(value, allowed):
    with pytest.raises(SettingsError) as caught:
        Settings.load(environ={"LORAMESH_REPLICAS": value})
    assert "LORAMESH_REPLICAS" in str(caught.value) and allowed in str(caught.value) and value in str(caught.value)


def test_replica_processes_get_their_own_names_and_ports():
    ports = Ports()  # the configured ports of `make run`
    replicas = plan_replicas(ports, tuple(SERVICE_PORTS), {"inference": 3, "tagger": 1})
    assert list(replicas) == ["trainer", "captioner", "tagger", "inference", "inference-2", "inference-3"]
    assert replicas["inference"].port == 50054 and replicas["tagger"].port == 50053
    configured = {ports.nats, ports.nats_monitor, *ports.services.values(), *ports.rest, ports.websocket,
                  ports.bridge, ports.admin}
    extra = {replicas["inference-2"].port, replicas["inference-3"].port}
    assert len(extra) == 2 and not extra & configured
    assert {r.service for r in replicas.values() if r.name.startswith("inference")} == {"inference"}
    with pytest.raises(ValueError, match="captioner"):
        plan_replicas(ports, ("tagger",), {"captioner": 2})
    with pytest.raises(ValueError, match="1 to 16"):
        plan_replicas(ports, ("tagger",), {"tagger": 0})


# ---- Envoy's view of the replicas ----------------------------------------------------------


def clusters(bootstrap: dict) -> dict[str, dict]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def endpoints(cluster: dict) -> list[tuple[str, int]]:
    return [(e["endpoint"]["address"]["socket_address"]["address"],
             e["endpoint"]["address"]["socket_address"]["port_value"])
            for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]


def service_routes(bootstrap: dict) -> list[dict]:
    rest = next(listener for listener in bootstrap["static_resources"]["listeners"] if listener["name"] == "rest")
    manager = rest["filter_chains"][0]["filters"][0]["typed_config"]
    return [r for r in manager["route_config"]["virtual_hosts"][0]["routes"] if "cluster" in r.get("route", {})]


def test_every_replica_is_an_endpoint_checked_by_grpc_health(tmp_path):
    cfg = envoy_config.GatewayConfig(
        descriptor_path=DESCRIPTOR,
        upstreams={"inference": [("127.0.0.1", 7001), ("127.0.0.1", 7002)], "tagger": ("127.0.0.1", 7003)})
    bootstrap = envoy_config.render(cfg)
    inference, tagger = clusters(bootstrap)["inference"], clusters(bootstrap)["tagger"]
    assert endpoints(inference) == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    assert endpoints(tagger) == [("127.0.0.1", 7003)]  # a lone (host, port) is one endpoint
    check = inference["health_checks"][0]
    assert "grpc_health_check" in check and check["interval"] == "1s" and check["unhealthy_threshold"] <= 3
    # Only connection failures eject a replica; errors it returns do not.
    assert inference["outlier_detection"]["split_external_local_origin_errors"] is True
    assert inference["outlier_detection"]["enforcing_consecutive_5xx"] == 0

    # Every service route retries only what never reached a replica: never on an answer.
    routes = service_routes(bootstrap)
    assert {r["route"]["cluster"] for r in routes} == {"inference", "tagger"}
    for route in routes:
        retry_on = set(route["route"]["retry_policy"]["retry_on"].split(","))
        assert retry_on == {"connect-failure", "refused-stream", "reset-before-request"}, route

    path = envoy_config.write(cfg, tmp_path / "envoy.yaml")
    result = envoy_runner.validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_k8s_gateway_health_checks_every_pod_behind_one_dns_name():
    bootstrap = envoy_config.render(envoy_config.k8s_config(DESCRIPTOR))
    for name, port in SERVICE_PORTS.items():
        cluster = clusters(bootstrap)[name]
        assert cluster["type"] == "STRICT_DNS" and endpoints(cluster) == [(name, port)]
        assert "grpc_health_check" in cluster["health_checks"][0]
        assert "outlier_detection" in cluster


# ---- two inference replicas in a real mesh -------------------------------------------------


@pytest.fixture(scope="module")
def replica_mesh(tmp_path_factory):
    """NATS, two inference replicas, the events bridge and Envoy, with a tiny SDXL checkpoint."""
    root = tmp_path_factory.mktemp("replicas")
    models = root / "models"
    tiny_diffusion.build_sdxl_single_file(models / "checkpoints" / "tiny-sdxl.safetensors",
                                          config_dir=models / "configs" / "sdxl")
    env = {"LORAMESH_INFERENCE_MODELS_DIR": str(models), "LORAMESH_SDXL_CONFIG": str(models / "configs" / "sdxl"),
           "LORAMESH_MODEL_ROOTS": str(models), "LORAMESH_MEDIA_ROOTS": str(root),
           "LORAMESH_OUTPUT_DIR": str(root / "outputs"), "LORAMESH_WORKFLOWS_BASE_PATH": str(root / "workflows"),
           "LORAMESH_SHUTDOWN_GRACE_S": "2", "LORAMESH_INFERENCE_ACK_WAIT_S": "3", "HF_HUB_OFFLINE": "1"}
    mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, services=("inference",), replicas={"inference": 2})
    mesh.start(timeout=180)
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        r = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"})
        assert r.status_code == 200, r.text
    yield mesh
    mesh.stop()


def submit(client: httpx.Client, seed: int) -> str:
    r = client.post("/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": seed})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def wait_final(client: httpx.Client, job_ids: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        while (status := client.get(f"/queue/{job_id}").json()["status"]) not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job {job_id} still {status}"
            time.sleep(0.1)
        assert status == "completed", client.get(f"/queue/{job_id}").text


def owners(mesh: Mesh, job_ids: list[str]) -> dict[str, str]:
    """The replica identity ("host:pid") each job's record names as the one that ran it."""
    async def read() -> dict[str, str]:
        nc = await nats.connect(mesh.nats_url)
        try:
            kv = await nc.jetstream().key_value("inference_jobs")
            return {job_id: json.loads((await kv.get(job_id)).value)["owner"] for job_id in job_ids}
        finally:
            await nc.close()
    return asyncio.run(read())


def envoy_counter(mesh: Mesh, name: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{mesh.ports.admin}/stats", params={"filter": f"^{name}$"}).text
    return int(text.split(":")[1])


def test_jobs_spread_over_both_replicas_and_each_log_names_its_jobs(replica_mesh):
    mesh = replica_mesh
    first, second = mesh.replicas["inference"], mesh.replicas["inference-2"]
    assert first.port == mesh.ports.services["inference"] and second.port != first.port
    # Envoy was given both, and checks both with grpc.health.v1.
    cluster = clusters(yaml.safe_load(mesh.envoy_config_path.read_text()))["inference"]
    assert endpoints(cluster) == [("127.0.0.1", first.port), ("127.0.0.1", second.port)]
    assert "grpc_health_check" in cluster["health_checks"][0]
    view = mesh.gateway_view()
    assert view[first.port] and view[second.port]

    pids = {mesh.procs["inference"].pid: "inference", mesh.procs["inference-2"].pid: "inference-2"}

    def ran_by(job_ids: list[str]) -> dict[str, str]:
        return {job_id: pids.get(int(owner.rsplit(":", 1)[1]), owner) for job_id, owner in owners(mesh, job_ids).items()}

    with httpx.Client(base_url=mesh.rest_url, timeout=60) as client:
        # One job at a time: the waiting replicas take turns on the shared queue.
        one_by_one = []
        while set(ran_by(one_by_one).values()) != set(pids.values()):
            assert len(one_by_one) < 6, ran_by(one_by_one)
            one_by_one.append(submit(client, len(one_by_one)))
            wait_final(client, one_by_one[-1:])
        # A burst: while one replica works, the other takes the next job.
        burst = [submit(client, seed) for seed in range(100, 105)]
        wait_final(client, burst)
    assert set(ran_by(burst).values()) == set(pids.values()), ran_by(burst)
    for job_id, name in ran_by(one_by_one + burst).items():
        log = (mesh.log_dir / f"{name}.log").read_text()
        assert any('"job ended"' in line and job_id in line for line in log.splitlines()), (job_id, name)


def test_a_service_without_a_healthy_replica_answers_a_json_503(replica_mesh):
    # The tagger is not started in this mesh: every health check of its endpoint fails.
    assert not replica_mesh.gateway_view()[replica_mesh.ports.services["tagger"]]
    r = httpx.get(replica_mesh.rest_url + "/tag/free", timeout=10)
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["code"] == 14


def test_a_killed_replica_is_routed_around_and_comes_back(replica_mesh):
    mesh = replica_mesh
    reported: dict[str, float] = {}  # supervisor line -> when
    mesh.supervise(report=lambda line: reported.setdefault(line, time.monotonic()))
    victim = mesh.replicas["inference-2"]
    old_pid = mesh.procs[victim.name].pid
    retries = envoy_counter(mesh, "cluster.inference.upstream_rq_retry")
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert wait_for(lambda: not port_open(victim.port), 5)

    # Calls keep going through the gateway while Envoy takes the replica out, the supervisor
    # restarts it and Envoy takes it back. The first calls after the kill are POSTs that
    # create jobs: one of them meets the dead replica's refused connection and must be
    # retried on the other, never lost and never run twice.
    phase = "down"  # -> "out" once Envoy's health check took it out -> "back" once it is in again
    answers: list[tuple[str, str, int]] = []
    job_ids: list[str] = []
    with httpx.Client(base_url=mesh.rest_url, timeout=60) as client:
        while time.monotonic() - killed_at < 30 and sum(a[0] == "back" for a in answers) < 10:
            in_rotation = mesh.gateway_view()[victim.port]
            if phase == "down" and not in_rotation:
                phase = "out"
            elif phase == "out" and in_rotation:
                phase = "back"
            if len(answers) < 2:
                r = client.post("/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2})
                if r.status_code == 202:
                    job_ids.append(r.json()["job_id"])
            else:
                r = client.get("/health")
            answers.append((phase, r.request.method, r.status_code))
            time.sleep(0.05)
        wait_final(client, job_ids)

    lines = list(reported)
    assert phase == "back", (answers, lines)
    back = f"{victim.name} is back (pid {mesh.procs[victim.name].pid})"
    assert back in reported and reported[back] - killed_at < 10, lines  # restarted and SERVING
    assert mesh.procs[victim.name].pid != old_pid
    assert f"{victim.name} exited with -9; restarting in 0.5 s (restart 1)" in lines
    assert mesh.supervisor.restarts == {victim.name: 1}, lines
    # Before Envoy noticed, a refused connection was retried on the other replica; once it
    # noticed, and after the replica came back, every call succeeded.
    assert all(status < 500 for p, _, status in answers if p != "down"), answers
    assert sum(status >= 500 for p, _, status in answers if p == "down") <= 1, answers
    assert len(job_ids) == 2 and {p for p, _, _ in answers} == {"down", "out", "back"}, answers
    assert envoy_counter(mesh, "cluster.inference.upstream_rq_retry") > retries
