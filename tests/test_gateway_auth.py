"""Gateway auth (JWT on training tasks, X-Key on finetunes) for REST and native gRPC,
and the service-chosen HTTP status for REST clients only."""

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

from gateway import envoy_config, envoy_runner, openapi
from launcher.mesh import free_port
from loramesh.v1 import inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.common.settings import REPO_ROOT
from tests.conftest import API_KEY

DESCRIPTOR = REPO_ROOT / "gen" / "loramesh.pb"
ISSUER = "https://issuer.test"


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Answers the guarded routes, so a passing call proves the gateway let it through."""

    async def GetTrainingTask(self, request, context):
        return trainer_pb2.TrainingTask(id=request.task_id, status="PENDING")

    async def GetFinetuneDetails(self, request, context):
        return trainer_pb2.GetFinetuneDetailsResponse(
            finetune_details=trainer_pb2.FinetuneDetails(finetune_id=request.finetune_id, status="Pending"))


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    async def Txt2Img(self, request, context):
        await context.send_initial_metadata((("x-http-status", "202"),))
        return inference_pb2.Txt2ImgResponse(job_id="job-1", status="pending", position=1)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """Envoy in front of fake trainer/inference servers, with a JWKS and an API key."""
    tmp = tmp_path_factory.mktemp("gateway")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256")
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (tmp / "api-keys").write_text(f"{API_KEY}\n")
    (tmp / "openapi.json").write_text(json.dumps(openapi.build(DESCRIPTOR)))
    upstream = FakeUpstream()
    upstream_port = upstream.start()
    cfg = envoy_config.GatewayConfig(
        descriptor_path=DESCRIPTOR,
        upstreams={"trainer": ("127.0.0.1", upstream_port), "inference": ("127.0.0.1", upstream_port),
                   "tagger": ("127.0.0.1", free_port())},
        rest_ports=[free_port()], websocket_port=free_port(), events_bridge=("127.0.0.1", free_port()),
        admin_port=free_port(), listen_address="127.0.0.1", openapi_path=tmp / "openapi.json",
        jwks_path=tmp / "jwks.json", api_keys_path=tmp / "api-keys", access_log_path=str(tmp / "access.log"),
        jwt_issuer=ISSUER, jwt_audiences=("loramesh", "loramesh-admin"),
    )
    path = envoy_config.write(cfg, tmp / "envoy.yaml")
    proc = envoy_runner.start(path, tmp / "envoy.log")
    envoy_runner.wait_ready(cfg.admin_port)
    def sign(**claims) -> str:
        claims = {"sub": "t", "iss": ISSUER, "aud": "loramesh", "exp": int(time.time()) + 600, **claims}
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm="RS256",
                          headers={"kid": "k1"})

    yield {"url": f"http://127.0.0.1:{cfg.rest_ports[0]}", "token": sign(), "sign": sign, "tmp": tmp,
           "port": cfg.rest_ports[0]}
    envoy_runner.stop(proc)
    upstream.stop()


class FakeUpstream:
    """The fake servers on a grpc.aio event loop of their own thread."""

    def __init__(self):
        self._ready = threading.Event()
        self._loop = None
        self._stop = None
        self.port = 0

    def start(self) -> int:
        threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True).start()
        self._ready.wait(10)
        return self.port

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = grpc.aio.server()
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(FakeTrainer(), server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(FakeInference(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(0)

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)


def test_jwt_guards_training_tasks(gateway):
    url = gateway["url"] + "/api/v1/training/t-1"
    missing = httpx.get(url)
    assert missing.status_code == 401
    assert missing.headers["content-type"] == "application/json"
    assert "Jwt" in missing.json()["message"] or "jwt" in missing.json()["message"].lower()
    assert httpx.get(url, headers={"authorization": "Bearer not.a.token"}).status_code == 401
    ok = httpx.get(url, headers={"authorization": f"Bearer {gateway['token']}"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["id"] == "t-1"


def test_tokens_must_expire_and_come_from_the_configured_issuer_for_our_audience(gateway):
    url = gateway["url"] + "/api/v1/training/t-1"
    sign = gateway["sign"]

    def status(token: str) -> int:
        return httpx.get(url, headers={"authorization": f"Bearer {token}"}).status_code

    assert status(sign(aud="loramesh-admin")) == 200
    assert status(sign(exp=None)) == 401  # valid for ever: refused
    assert status(sign(exp=int(time.time()) - 600)) == 401  # past the 60 s allowed for clock skew
    assert status(sign(iss="https://someone-else.test")) == 401
    # A valid token meant for another API is forbidden rather than unauthenticated.
    assert status(sign(aud="another-api")) == 403
    assert status(sign(aud=None)) == 403


def test_jwt_also_guards_native_grpc(gateway):
    with grpc.insecure_channel(f"127.0.0.1:{gateway['port']}") as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTrainingTask(trainer_pb2.GetTrainingTaskRequest(task_id="t-1"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GetTrainingTask(trainer_pb2.GetTrainingTaskRequest(task_id="t-1"), timeout=10,
                                     metadata=(("authorization", f"Bearer {gateway['token']}"),))
        assert reply.id == "t-1"


def test_api_key_guards_finetunes(gateway):
    url = gateway["url"] + "/v1/finetune_details?finetune_id=f-1"
    missing = httpx.get(url)
    assert missing.status_code == 401
    assert "X-Key" in missing.json()["message"]
    wrong = httpx.get(url, headers={"X-Key": "nope"})
    assert wrong.status_code == 403
    ok = httpx.get(url, headers={"X-Key": API_KEY})
    assert ok.status_code == 200, ok.text
    assert ok.json()["finetune_details"]["finetune_id"] == "f-1"


def test_service_chosen_status_reaches_rest_clients_only(gateway):
    r = httpx.post(gateway["url"] + "/txt2img", json={"prompt": "a cat"})
    assert r.status_code == 202, r.text
    assert r.json() == {"job_id": "job-1", "status": "pending", "position": 1}
    assert "x-http-status" not in r.headers
    with grpc.insecure_channel(f"127.0.0.1:{gateway['port']}") as channel:
        reply = inference_pb2_grpc.InferenceServiceStub(channel).Txt2Img(
            inference_pb2.Txt2ImgRequest(prompt="a cat"), timeout=10)
    assert reply.job_id == "job-1"
