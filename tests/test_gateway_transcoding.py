"""Envoy in front of small grpc.aio servers: REST transcoding both ways, native gRPC on the
REST port, JSON errors (BadRequest details, unknown routes, 413), SSE streams, request ids,
the access log, and auth that stays closed when nothing is configured."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import any_pb2, json_format, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway import envoy_config, envoy_runner
from launcher.mesh import free_port
from loramesh.v1 import common_pb2, inference_pb2_grpc, tagger_pb2, tagger_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.common.settings import REPO_ROOT

DESCRIPTOR = REPO_ROOT / "gen" / "loramesh.pb"
MAX_REQUEST_BYTES = 64 * 1024
ISSUER = "loramesh-gateway-test"


class EchoTagger(tagger_pb2_grpc.TaggerServiceServicer):
    """Answers with what it received, so a test sees the request as the service saw it."""

    async def Tag(self, request, context):
        metadata = dict(context.invocation_metadata())
        if request.model_path == "bad":
            violation = error_details_pb2.BadRequest.FieldViolation(
                field="model_path", description="no model at 'bad'; give a folder with model.onnx")
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            await context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="model_path: no model at 'bad'", details=[detail])))
        if request.model_path == "queued":
            await context.send_initial_metadata((("x-http-status", "202"),))
        answer = struct_pb2.Struct()
        answer.update({
            "model_path": request.model_path,
            "input": json_format.MessageToDict(request.input),
            "request_id": metadata.get("x-request-id", ""),
        })
        return answer

    async def FreeTagger(self, request, context):
        return tagger_pb2.FreeTaggerResponse(report=common_pb2.MemoryReport(service="tagger", message="nothing loaded"))


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    async def StreamSessionLogs(self, request, context):
        for step in (1, 2):
            yield trainer_pb2.StreamSessionLogsResponse(level="info", message=f"{request.session_id} step {step}",
                                                        step=step)

    async def GetTrainingTask(self, request, context):
        return trainer_pb2.TrainingTask(id=request.task_id, status="PENDING")

    async def GetFinetuneDetails(self, request, context):
        return trainer_pb2.GetFinetuneDetailsResponse(finetune_id=request.finetune_id)


class Upstream:
    """Fake services (the echoing tagger and the trainer above unless others are given) on
    a grpc.aio server with an event loop of its own thread."""

    def __init__(self, *servicers):
        self.servicers = servicers or (EchoTagger(), FakeTrainer())
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0

    def __enter__(self) -> Upstream:
        threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True).start()
        assert self._ready.wait(10), "the fake upstream did not start"
        return self

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = grpc.aio.server()
        for servicer in self.servicers:
            for base, add in _ADDERS.items():
                if isinstance(servicer, base):
                    add(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(0)

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)


_ADDERS = {
    tagger_pb2_grpc.TaggerServiceServicer: tagger_pb2_grpc.add_TaggerServiceServicer_to_server,
    trainer_pb2_grpc.TrainerServiceServicer: trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
    inference_pb2_grpc.InferenceServiceServicer: inference_pb2_grpc.add_InferenceServiceServicer_to_server,
}


def start_gateway(tmp, upstream_port: int, **auth):
    cfg = envoy_config.GatewayConfig(
        descriptor_path=DESCRIPTOR,
        upstreams={name: ("127.0.0.1", upstream_port) for name in ("tagger", "trainer", "inference")},
        rest_ports=[free_port()], websocket_port=free_port(), events_bridge=("127.0.0.1", free_port()),
        admin_port=free_port(), listen_address="127.0.0.1", max_request_bytes=MAX_REQUEST_BYTES,
        access_log_path=str(tmp / "access.log"), **auth,
    )
    proc = envoy_runner.start(envoy_config.write(cfg, tmp / "envoy.yaml"), tmp / "envoy.log")
    try:
        envoy_runner.wait_ready(cfg.admin_port)
    except TimeoutError:
        envoy_runner.stop(proc)
        raise
    return cfg, proc


@pytest.fixture(scope="module")
def upstream():
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    return key, jwks


def token(key, issuer: str = ISSUER) -> str:
    return jwt.encode({"iss": issuer, "sub": "tester", "exp": int(time.time()) + 600}, key, algorithm="RS256",
                      headers={"kid": "k1"})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream, signing_key):
    """A gateway with a JWKS and an issuer set."""
    tmp = tmp_path_factory.mktemp("gateway")
    cfg, proc = start_gateway(tmp, upstream.port, jwks_path=signing_key[1], jwt_issuer=ISSUER)
    yield {"url": f"http://127.0.0.1:{cfg.rest_ports[0]}", "port": cfg.rest_ports[0], "tmp": tmp}
    envoy_runner.stop(proc)


def test_rest_accepts_snake_and_camel_case_and_answers_snake_case(gateway):
    for body in ({"model_path": "/m", "input": ["/a.png"]}, {"modelPath": "/m", "input": ["/a.png"]}):
        r = httpx.post(gateway["url"] + "/tag", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["model_path"] == "/m"
        assert r.json()["input"] == ["/a.png"]
    free = httpx.get(gateway["url"] + "/tag/free")
    assert free.status_code == 200
    # snake_case names, and zero values printed rather than left out.
    report = free.json()["report"]
    assert set(report) == {"service", "replica", "freed", "bytes_freed", "message"}
    assert (report["service"], report["replica"], report["freed"]) == ("tagger", "", [])
    assert float(report["bytes_freed"]) == 0


def test_native_grpc_reaches_the_service_through_the_rest_port(gateway):
    with grpc.insecure_channel(f"127.0.0.1:{gateway['port']}") as channel:
        stub = tagger_pb2_grpc.TaggerServiceStub(channel)
        reply = stub.Tag(tagger_pb2.TagRequest(model_path="/m"), timeout=10)
        assert reply["model_path"] == "/m"
        with pytest.raises(grpc.RpcError) as error:
            stub.Tag(tagger_pb2.TagRequest(model_path="bad"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = rpc_status.from_call(error.value).details
    assert details[0].TypeName() == "google.rpc.BadRequest"


def test_grpc_health_answers_through_the_rest_port(gateway):
    with grpc.insecure_channel(f"127.0.0.1:{gateway['port']}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_invalid_argument_is_a_400_with_the_field_violation(gateway):
    r = httpx.post(gateway["url"] + "/tag", json={"model_path": "bad"})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == code_pb2.INVALID_ARGUMENT
    assert "model_path" in body["message"]
    [detail] = body["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    [violation] = detail["field_violations"]  # snake_case like every answer
    assert violation["field"] == "model_path"
    assert "model.onnx" in violation["description"]


def test_service_status_header_becomes_the_http_status(gateway):
    r = httpx.post(gateway["url"] + "/tag", json={"model_path": "queued"})
    assert r.status_code == 202
    assert "x-http-status" not in r.headers
    assert r.json()["model_path"] == "queued"


def test_gateway_errors_are_json(gateway):
    unknown = httpx.get(gateway["url"] + "/no/such/route")
    assert (unknown.status_code, unknown.headers["content-type"]) == (404, "application/json")
    assert unknown.json()["code"] == code_pb2.NOT_FOUND
    bad_query = httpx.get(gateway["url"] + "/tag/free?bogus=1")
    assert (bad_query.status_code, bad_query.headers["content-type"]) == (400, "application/json")
    assert bad_query.json()["code"] == code_pb2.INVALID_ARGUMENT
    too_big = httpx.post(gateway["url"] + "/tag", json={"model_path": "x" * (MAX_REQUEST_BYTES + 1)})
    assert (too_big.status_code, too_big.headers["content-type"]) == (413, "application/json")
    assert too_big.json()["code"] == code_pb2.RESOURCE_EXHAUSTED
    assert str(MAX_REQUEST_BYTES) in too_big.json()["message"]


def test_server_streams_arrive_as_server_sent_events(gateway):
    with httpx.stream("GET", gateway["url"] + "/sessions/s1/logs/stream") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line.startswith("data: ")]
    assert [(e["message"], e["step"]) for e in events] == [("s1 step 1", 1), ("s1 step 2", 2)]


def test_request_id_reaches_the_service_and_the_access_log(gateway):
    r = httpx.post(gateway["url"] + "/tag", json={"model_path": "/logged"})
    request_id = r.json()["request_id"]
    assert request_id
    log = gateway["tmp"] / "access.log"
    deadline = time.monotonic() + 15  # Envoy flushes its access log periodically
    entries = []
    while not entries and time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        entries = [e for e in map(json.loads, lines) if e["request_id"] == request_id]
        time.sleep(0.2)
    [entry] = entries
    assert (entry["method"], entry["path"], entry["status"], entry["upstream"]) == ("POST", "/tag", 200, "tagger")
    assert isinstance(entry["duration_ms"], int)


def test_jwt_issuer_is_checked(gateway, signing_key):
    url = gateway["url"] + "/api/v1/training/t-1"
    assert httpx.get(url, headers={"authorization": f"Bearer {token(signing_key[0], 'someone-else')}"}) \
        .status_code == 401
    ok = httpx.get(url, headers={"authorization": f"Bearer {token(signing_key[0])}"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["id"] == "t-1"


def test_protected_routes_stay_closed_without_auth_configuration(tmp_path, upstream, signing_key):
    cfg, proc = start_gateway(tmp_path, upstream.port)
    url = f"http://127.0.0.1:{cfg.rest_ports[0]}"
    try:
        training = httpx.get(url + "/api/v1/training/t-1", headers={"authorization": f"Bearer {token(signing_key[0])}"})
        finetune = httpx.get(url + "/v1/finetune_details?finetune_id=f-1", headers={"X-Key": "anything"})
        open_route = httpx.get(url + "/tag/free")
    finally:
        envoy_runner.stop(proc)
    assert (training.status_code, training.json()["code"]) == (401, code_pb2.UNAUTHENTICATED)
    assert (finetune.status_code, finetune.json()["code"]) == (403, code_pb2.PERMISSION_DENIED)
    assert open_route.status_code == 200
