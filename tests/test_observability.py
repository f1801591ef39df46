"""Metrics and traces of a running mesh: each process's /metrics counts calls as they come,
a work queue's depth follows the jobs waiting in it, and one /txt2img call is one trace
from Envoy through the inference API and the NATS queue to the worker that ran the job,
collected by an OTLP receiver on loopback."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from launcher.mesh import Mesh, Ports, free_port
from tests.conftest import wait_for
from tinymodels import diffusion as tiny_diffusion

SMALL = {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 2}
# Runs for minutes on this CPU unless cancelled, which it is at its next step.
LONG = {"prompt": "keeps the worker busy", "width": 512, "height": 512, "steps": 100, "batch_count": 4}
FINAL = ("completed", "failed", "cancelled")
LIST_QUEUE = "/loramesh.v1.InferenceService/ListQueue"
TXT2IMG = "/loramesh.v1.InferenceService/Txt2Img"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent, with its service name."""

    def __init__(self):
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[tuple[str, trace_pb2.Span]]:
        with self._lock:
            return [(service, span) for service, span in self.spans if span.trace_id == trace_id]

    def named(self, name: str) -> list[trace_pb2.Span]:
        with self._lock:
            return [span for _, span in self.spans if span.name == name]


@pytest.fixture(scope="module")
def receiver():
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.endpoint = f"http://127.0.0.1:{port}"
    yield collector
    server.stop(0)


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory, receiver):
    """Envoy and one inference replica (the other services are not needed), exporting traces
    to the receiver, with a tiny SDXL checkpoint in its models root."""
    root = tmp_path_factory.mktemp("observability")
    config_dir = root / "tiny-sdxl-config"
    tiny_diffusion.build_sdxl_single_file(root / "models" / "checkpoints" / "tiny-sdxl.safetensors",
                                          config_dir=config_dir)
    env = {
        "LORAMESH_INFERENCE_MODELS_DIR": str(root / "models"),
        "LORAMESH_OUTPUT_DIR": str(root / "outputs"),
        "LORAMESH_SDXL_CONFIG": str(config_dir),
        "LORAMESH_SHUTDOWN_GRACE_S": "2",
        "HF_HUB_OFFLINE": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # the services send their spans within 0.2 s
    }
    mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, services=("inference",))
    mesh.start(timeout=120)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def client(traced_mesh):
    with httpx.Client(base_url=traced_mesh.rest_url, timeout=120) as client:
        r = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"})
        assert r.status_code == 200, r.text
        yield client


def scrape(port: int) -> dict[str, list]:
    """Samples of a /metrics endpoint by metric name: (labels, value) pairs."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list], name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there are none)."""
    return sum(v for sample_labels, v in samples.get(name, []) if labels.items() <= sample_labels.items())


def submit(client: httpx.Client, **body) -> str:
    r = client.post("/txt2img", json=body)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def status(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/queue/{job_id}").json()["status"]


def test_request_counts_grow_with_calls_on_the_service_and_on_envoy(traced_mesh, client):
    service_port, envoy_port = traced_mesh.replicas["inference"].metrics_port, traced_mesh.ports.metrics["envoy"]
    before, envoy_before = scrape(service_port), scrape(envoy_port)
    for _ in range(3):
        assert client.get("/queue").status_code == 200
    assert client.get("/queue/no-such-job").status_code == 404
    after, envoy_after = scrape(service_port), scrape(envoy_port)

    calls = "loramesh_grpc_requests_total"
    assert value(after, calls, method=LIST_QUEUE, code="OK") - value(before, calls, method=LIST_QUEUE, code="OK") == 3
    assert value(after, calls, code="NOT_FOUND") - value(before, calls, code="NOT_FOUND") == 1
    latency = "loramesh_grpc_request_duration_seconds_count"
    assert value(after, latency, method=LIST_QUEUE) - value(before, latency, method=LIST_QUEUE) == 3
    # Envoy's own figures, by upstream cluster and response class.
    upstream = "envoy_cluster_upstream_rq_completed_total"
    assert value(envoy_after, upstream, envoy_cluster_name="inference") \
        - value(envoy_before, upstream, envoy_cluster_name="inference") >= 4, sorted(envoy_after)


def test_the_queue_depth_follows_jobs_waiting_and_the_model_is_reported_resident(traced_mesh, client):
    port = traced_mesh.replicas["inference"].metrics_port
    depth = {"stream": "INFERENCE_JOBS", "consumer": "inference-workers"}
    busy = submit(client, **LONG)
    try:
        assert wait_for(lambda: status(client, busy) == "processing", 60)
        assert value(scrape(port), "loramesh_queue_depth", **depth) == 0
        waiting = [submit(client, **SMALL) for _ in range(3)]
        samples = scrape(port)
        assert value(samples, "loramesh_queue_depth", **depth) == 3
        assert value(samples, "loramesh_queue_in_flight", **depth) == 1
        assert value(samples, "loramesh_queue_oldest_age_seconds", stream="INFERENCE_JOBS") > 0
        for job_id in waiting:
            assert client.post(f"/v1/requests/{job_id}/cancel", json={}).status_code == 200
        assert value(scrape(port), "loramesh_queue_depth", **depth) == 0
    finally:
        client.post(f"/v1/requests/{busy}/cancel", json={})
    assert wait_for(lambda: status(client, busy) in FINAL, 60)
    assert wait_for(lambda: value(scrape(port), "loramesh_queue_in_flight", **depth) == 0, 10)

    samples = scrape(port)
    assert value(samples, "loramesh_model_resident_bytes") > 0
    assert value(samples, "loramesh_models_resident") >= 1
    assert value(samples, "loramesh_job_duration_seconds_count", service="inference", status="cancelled") >= 1


def test_one_txt2img_call_is_one_trace_from_envoy_to_the_worker(traced_mesh, client, receiver):
    port = traced_mesh.replicas["inference"].metrics_port
    steps_before = value(scrape(port), "loramesh_steps_total", service="inference")
    calls_before = len(receiver.named(TXT2IMG))
    job_id = submit(client, **SMALL)
    assert wait_for(lambda: status(client, job_id) in FINAL, 60)
    assert status(client, job_id) == "completed"

    # The service's span of this call (the only new one) names the trace.
    assert wait_for(lambda: len(receiver.named(TXT2IMG)) > calls_before, 10)
    trace_id = receiver.named(TXT2IMG)[-1].trace_id

    def whole() -> bool:  # Envoy flushes its spans every few seconds
        names = {(service, span.name) for service, span in receiver.trace(trace_id)}
        return {"envoy", "inference"} <= {service for service, _ in names} and \
            ("inference", "jobs.inference process") in names
    assert wait_for(whole, 20), receiver.trace(trace_id)

    spans = receiver.trace(trace_id)
    by_name = {span.name: span for _, span in spans}
    envoy = [span for service, span in spans if service == "envoy"]
    api, publish, work = by_name[TXT2IMG], by_name["jobs.inference publish"], by_name["jobs.inference process"]
    # Envoy -> the inference API -> the queue hop -> the worker, each the parent of the next.
    assert api.parent_span_id in {span.span_id for span in envoy}
    assert api.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert publish.parent_span_id == api.span_id and publish.kind == trace_pb2.Span.SPAN_KIND_PRODUCER
    assert work.parent_span_id == publish.span_id and work.kind == trace_pb2.Span.SPAN_KIND_CONSUMER
    # The worker's span lasts the job: it ends after the call that queued it answered.
    assert work.end_time_unix_nano > api.end_time_unix_nano
    assert value(scrape(port), "loramesh_steps_total", service="inference") - steps_before == SMALL["steps"]
    completed = value(scrape(port), "loramesh_job_duration_seconds_count", service="inference", status="completed")
    assert completed >= 1


def test_without_an_otlp_endpoint_nothing_is_traced_and_metrics_stay_off_unless_asked():
    from services.common import tracing
    from services.common.settings import Settings, SettingsError

    assert tracing.configure("tagger", None) == []
    defaults = Settings.load("tagger", environ={})
    assert defaults.observability.metrics_port == 0 and defaults.observability.otlp_endpoint is None
    with pytest.raises(SettingsError, match="LORAMESH_METRICS_PORT must be a port"):
        Settings.load("tagger", environ={"LORAMESH_METRICS_PORT": "70000"})
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_OTLP_ENDPOINT must be an http"):
        Settings.load("tagger", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"})


def test_a_taken_metrics_port_stops_the_service_naming_the_variable(tmp_path):
    import socket
    import subprocess
    import sys

    from services.common.settings import REPO_ROOT

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
               "LORAMESH_METRICS_PORT": str(port), "LORAMESH_BIND_HOST": "127.0.0.1",
               "LORAMESH_TAGGER_PORT": str(free_port()), "LORAMESH_NATS_URL": "nats://127.0.0.1:1"}
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "services.tagger"], env=env, capture_output=True, text=True,
                             timeout=60, cwd=REPO_ROOT)
    assert run.returncode != 0
    assert f"LORAMESH_METRICS_PORT={port}" in run.stderr, run.stderr
    assert time.monotonic() - started < 30


def test_the_monitoring_component_scrapes_every_service_envoy_and_nats(tmp_path):
    """deploy/k8s with components/monitoring, as kustomize builds it: each workload but the
    events bridge has a `metrics` port that the PodMonitor selects and the NetworkPolicy
    opens, the services serve their metrics on it, and the NATS pods gain the exporter."""
    import os
    import shutil
    import subprocess

    import kubernetes_validate
    import yaml

    from services.common.settings import REPO_ROOT

    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (its built-in kustomize)")
    base = REPO_ROOT / "deploy" / "k8s"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(base, tmp_path)],
        "components": [os.path.relpath(base / "components" / "monitoring", tmp_path)]}))
    built = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    objects = [o for o in yaml.safe_load_all(built.stdout) if o]
    for obj in objects:
        if obj["apiVersion"] != "monitoring.coreos.com/v1" and "keda.sh" not in obj["apiVersion"]:
            kubernetes_validate.validate(obj, "1.33", strict=True)

    monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    opened = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "metrics-from-prometheus")
    assert opened["spec"]["podSelector"] == {} and opened["spec"]["ingress"][0]["ports"] == [{"port": "metrics"}]
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("loramesh-config"))
    workloads = {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")}
    assert set(workloads) - {"events-bridge"} == {"trainer", "captioner", "tagger", "inference", "envoy", "nats"}
    for name, template in workloads.items():
        labels = template["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        metrics_ports = [p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                         if p["name"] == "metrics"]
        if name == "events-bridge":
            continue
        assert len(metrics_ports) == 1, name
        if name in ("trainer", "captioner", "tagger", "inference"):
            assert config["data"]["LORAMESH_METRICS_PORT"] == str(metrics_ports[0])
    nats = workloads["nats"]["spec"]["containers"]
    exporter = next(c for c in nats if c["name"] == "metrics")
    monitor_port = next(p["containerPort"] for c in nats if c["name"] == "nats" for p in c["ports"] if p["name"] == "monitor")
    assert exporter["args"][-1] == f"http://localhost:{monitor_port}" and "-jsz=all" in exporter["args"]
    assert exporter["image"].rpartition(":")[2] not in ("", "latest")
