"""The gateway's strictness and each seed document's own error terms, through a real Envoy in
front of fake services: unknown JSON fields and non-JSON bodies are refused before any
service sees them, every refusal is one plain google.rpc.Status JSON object, the generation
server's routes add {"error"}, the FastAPI-served routes answer 422 {"detail": [...]} for
invalid requests and {"detail": message} otherwise, and native gRPC is left as it was."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from google.protobuf import any_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway import envoy_runner
from loramesh.v1 import inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import API_KEY, violated_fields
from tests.test_gateway_transcoding import MAX_REQUEST_BYTES, EchoTagger, Upstream, start_gateway

SEEN: list[tuple[str, dict]] = []  # (RPC, request as JSON) for every call a fake service received


async def invalid(context, *violations):
    """Aborts as the services do: INVALID_ARGUMENT with a BadRequest detail."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]))
    await context.abort_with_status(rpc_status.to_status(status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="; ".join(f"{f}: {d}" for f, d in violations), details=[detail])))


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    async def CreateInference(self, request, context):
        SEEN.append(("CreateInference", json_format.MessageToDict(request)))
        if request.model != "sdxl":
            await invalid(context, ("model", "unknown model; use one of sdxl"),
                          ("prompts[0].width", "must be a multiple of 8"))
        return inference_pb2.CreateInferenceResponse(request_id="r-1", status="queued")

    async def GetRequestStatus(self, request, context):
        if request.request_id == "bad":
            await invalid(context, ("request_id", "must be a job id"))
        await context.abort(grpc.StatusCode.NOT_FOUND, f"Job not found: '{request.request_id}'")

    async def GetJob(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"Job not found: '{request.job_id}'")

    async def Txt2Img(self, request, context):
        SEEN.append(("Txt2Img", json_format.MessageToDict(request)))
        await context.send_initial_metadata((("x-http-status", "202"),))
        return inference_pb2.Txt2ImgResponse(job_id="job-1", status="pending", position=1)


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    async def CreateSession(self, request, context):
        SEEN.append(("CreateSession", json_format.MessageToDict(request, preserving_proto_field_name=True)))
        return trainer_pb2.Session(session_id=request.session_id, max_steps=request.max_steps)

    async def GetFinetuneDetails(self, request, context):
        await invalid(context, ("finetune_id", "no finetune with that id"))


class CountingTagger(EchoTagger):
    async def Tag(self, request, context):
        SEEN.append(("Tag", json_format.MessageToDict(request, preserving_proto_field_name=True)))
        return await super().Tag(request, context)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strict")
    (tmp / "api-keys").write_text(f"{API_KEY}\n")
    with Upstream(CountingTagger(), FakeTrainer(), FakeInference()) as upstream:
        cfg, proc = start_gateway(tmp, upstream.port, api_keys_path=tmp / "api-keys")
        yield {"url": f"http://127.0.0.1:{cfg.rest_ports[0]}", "port": cfg.rest_ports[0]}
        envoy_runner.stop(proc)


def post(gateway, path, body, **kw):
    SEEN.clear()
    return httpx.post(gateway["url"] + path, json=body, timeout=10, **kw)


def assert_status_body(r, status, code):
    """One JSON object with the google.rpc.Status fields and a plain-text message."""
    assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), r.text
    body = r.json()
    assert body["code"] == code and isinstance(body["details"], list)
    assert body["message"] and not body["message"].lstrip().startswith("{"), body
    return body


def test_an_unknown_body_field_is_refused_naming_it_and_what_is_allowed(gateway):
    r = post(gateway, "/tag", {"model_path": "/m", "input": ["/a.png"], "treshold": 0.5})
    body = assert_status_body(r, 400, code_pb2.INVALID_ARGUMENT)
    assert violated_fields(r) == ["treshold"]
    assert body["message"] == "treshold: unknown field; allowed: model_path, input"
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert SEEN == []  # the service never saw it


def test_a_misspelt_generation_field_is_refused_in_the_documents_terms(gateway):
    r = post(gateway, "/txt2img", {"prompt": "a cat", "step": 30})
    body = assert_status_body(r, 400, code_pb2.INVALID_ARGUMENT)
    assert violated_fields(r) == ["step"]
    assert "steps" in body["message"]  # what is allowed
    assert body["error"] == body["message"]
    assert SEEN == []
    ok = post(gateway, "/txt2img", {"prompt": "a cat", "steps": 30, "cfgScale": 5})
    assert (ok.status_code, ok.json()["job_id"]) == (202, "job-1")
    assert SEEN == [("Txt2Img", {"prompt": "a cat", "steps": 30, "cfgScale": 5.0})]


def test_unknown_nested_fields_on_v1_inference_are_a_fastapi_422(gateway):
    r = post(gateway, "/v1/inference", {"model": "sdxl", "prompts": [{"prompt": "x"}, {"prompt": "y", "widht": 64}],
                                        "loras": [{"path": "a.safetensors", "scale": 1}]})
    body = assert_status_body(r, 422, code_pb2.INVALID_ARGUMENT)
    assert violated_fields(r) == ["prompts[1].widht", "loras[0].scale"]
    assert [d["loc"] for d in body["detail"]] == [["body", "prompts", 1, "widht"], ["body", "loras", 0, "scale"]]
    assert all(d["type"] == "value_error" and "unknown field" in d["msg"] for d in body["detail"])
    assert "network_multiplier" in body["detail"][1]["msg"]  # the LoRA item's own fields
    assert SEEN == []


def test_free_form_values_and_camel_case_names_pass(gateway):
    config = {"job": "extension", "config": {"anything": [{"goes": {"here": 1}}], "with\"quotes": "a\\"}}
    r = post(gateway, "/sessions", {"sessionId": "s1", "maxSteps": 10, "config": config})
    assert r.status_code == 200, r.text
    assert r.json()["session_id"] == "s1"
    assert SEEN == [("CreateSession", {"session_id": "s1", "max_steps": 10, "config": config})]
    # An escaped key is the name it spells.
    r = httpx.post(gateway["url"] + "/tag", content=b'{"model\\u005fpath": "/m", "input": ["/a.png"]}',
                   headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["model_path"]) == (200, "/m")


def test_malformed_json_is_a_400_naming_the_problem(gateway):
    for text in (b'{"prompt": "x",', b'{"prompt": "x"} extra', b'{"prompt": "unterminated}'):
        r = httpx.post(gateway["url"] + "/txt2img", content=text, headers={"content-type": "application/json"})
        body = assert_status_body(r, 400, code_pb2.INVALID_ARGUMENT)
        assert "not valid JSON" in body["message"] and "byte" in body["message"]


def test_a_body_must_be_json(gateway):
    r = httpx.post(gateway["url"] + "/tag", content=b'{"model_path": "/m"}', headers={"content-type": "text/plain"})
    body = assert_status_body(r, 415, code_pb2.INVALID_ARGUMENT)
    assert "Content-Type" in body["message"] and "application/json" in body["message"] and "text/plain" in body["message"]
    for content_type in ("application/json; charset=utf-8", "application/vnd.loramesh+json"):
        r = httpx.post(gateway["url"] + "/tag", content=b'{"model_path": "/m"}',
                       headers={"content-type": content_type})
        assert r.status_code == 200, (content_type, r.text)
    # A bodyless POST needs no content type, as the documents' curl examples send them.
    assert httpx.post(gateway["url"] + "/tag").status_code == 200


def test_every_gateway_refusal_is_plain_json(gateway):
    missing_key = httpx.get(gateway["url"] + "/v1/finetune_details?finetune_id=f-1")
    assert "X-Key" in assert_status_body(missing_key, 401, code_pb2.UNAUTHENTICATED)["message"]
    wrong_key = httpx.get(gateway["url"] + "/v1/finetune_details?finetune_id=f-1", headers={"X-Key": "nope"})
    assert_status_body(wrong_key, 403, code_pb2.PERMISSION_DENIED)
    jwt = httpx.get(gateway["url"] + "/api/v1/training/t-1")
    assert_status_body(jwt, 401, code_pb2.UNAUTHENTICATED)
    assert_status_body(httpx.get(gateway["url"] + "/no/such/route"), 404, code_pb2.NOT_FOUND)
    assert_status_body(httpx.get(gateway["url"] + "/tag/free?bogus=1"), 400, code_pb2.INVALID_ARGUMENT)
    too_big = post(gateway, "/tag", {"model_path": "x" * MAX_REQUEST_BYTES})
    assert str(MAX_REQUEST_BYTES) in assert_status_body(too_big, 413, code_pb2.RESOURCE_EXHAUSTED)["message"]
    # Routes of no seed document add nothing.
    assert set(too_big.json()) == {"code", "message", "details"}
    # The transcoder's own refusal of a path value the body contradicts.
    clash = post(gateway, "/sessions/a/steps", {"session_id": "b", "steps": 1})
    assert "conflicting" in assert_status_body(clash, 400, code_pb2.INVALID_ARGUMENT)["message"]


def test_generation_server_errors_carry_error(gateway):
    for r, status, code in ((httpx.get(gateway["url"] + "/queue/nope"), 404, code_pb2.NOT_FOUND),
                            (httpx.get(gateway["url"] + "/queue/nope/bogus"), 404, code_pb2.NOT_FOUND),
                            (post(gateway, "/txt2img", {"prompt": "x" * MAX_REQUEST_BYTES}), 413,
                             code_pb2.RESOURCE_EXHAUSTED)):
        body = assert_status_body(r, status, code)
        assert body["error"] == body["message"]
    assert "nope" in httpx.get(gateway["url"] + "/queue/nope").json()["error"]


def test_fastapi_documents_answer_in_their_terms(gateway):
    r = post(gateway, "/v1/inference", {"model": "flux2", "prompts": [{"prompt": "x"}]})
    body = assert_status_body(r, 422, code_pb2.INVALID_ARGUMENT)
    assert body["detail"] == [
        {"loc": ["body", "model"], "msg": "unknown model; use one of sdxl", "type": "value_error"},
        {"loc": ["body", "prompts", 0, "width"], "msg": "must be a multiple of 8", "type": "value_error"},
    ]
    assert violated_fields(r) == ["model", "prompts[0].width"]  # the google.rpc.Status stays
    path = httpx.get(gateway["url"] + "/v1/requests/bad/status")
    assert assert_status_body(path, 422, code_pb2.INVALID_ARGUMENT)["detail"][0]["loc"] == ["path", "request_id"]
    query = httpx.get(gateway["url"] + "/v1/finetune_details?finetune_id=f-9", headers={"X-Key": API_KEY})
    assert assert_status_body(query, 422, code_pb2.INVALID_ARGUMENT)["detail"][0]["loc"] == ["query", "finetune_id"]
    # Other errors keep their status, with FastAPI's {"detail": message}.
    missing = httpx.get(gateway["url"] + "/v1/requests/nope/status")
    assert assert_status_body(missing, 404, code_pb2.NOT_FOUND)["detail"] == "Job not found: 'nope'"
    unauthorized = httpx.get(gateway["url"] + "/v1/finetune_details?finetune_id=f-1")
    assert "X-Key" in unauthorized.json()["detail"]
    assert "Jwt" in httpx.get(gateway["url"] + "/api/v1/training/t-1").json()["detail"]
    assert isinstance(httpx.get(gateway["url"] + "/v1/no-such-route").json()["detail"], str)


def test_other_routes_keep_the_plain_status(gateway):
    r = post(gateway, "/tag", {"model_path": "bad"})
    assert set(assert_status_body(r, 400, code_pb2.INVALID_ARGUMENT)) == {"code", "message", "details"}


def test_native_grpc_is_unaffected(gateway):
    with grpc.insecure_channel(f"127.0.0.1:{gateway['port']}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        reply = stub.Txt2Img(inference_pb2.Txt2ImgRequest(prompt="a cat", steps=3), timeout=10)
        assert reply.job_id == "job-1"
        with pytest.raises(grpc.RpcError) as error:
            stub.CreateInference(inference_pb2.CreateInferenceRequest(model="flux2"), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [detail] = rpc_status.from_call(error.value).details
        assert detail.TypeName() == "google.rpc.BadRequest"
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetJob(inference_pb2.GetJobRequest(job_id="nope"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == "Job not found: 'nope'"
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            trainer.GetFinetuneDetails(trainer_pb2.GetFinetuneDetailsRequest(finetune_id="f-1"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not refused.value.details().startswith("{")


def test_a_large_body_is_checked_whole(gateway):
    # Long strings (a base64 ZIP) are skipped in one search; a field after them is still seen.
    blob = "QUJD" * (MAX_REQUEST_BYTES // 8)
    r = post(gateway, "/tag", {"model_path": blob, "input": ["/a.png"], "inptu": 1})
    assert violated_fields(r) == ["inptu"]
    escaped = json.dumps({"model_path": 'q"\\' * 1000, "input": ["/a.png"]})
    r = httpx.post(gateway["url"] + "/tag", content=escaped, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [
    '{"input": ' + "[" * 30_000 + "]" * 30_000 + "}",
    '{"input": ["' + "\\u00e9" * 9_000 + '"], "model_path": "' + "\\" * 3 + '"}',
    '{"input": [1e999999], "model_path": null}',
    '{"input": "\\ud800"}',
    '{"' + "k" * 60_000 + '": 1}',
    '[' * 10 + ']' * 10,
], ids=["deep nesting", "escapes", "huge number", "lone surrogate", "huge key", "array body"])
def test_hostile_json_is_a_4xx_never_a_5xx(gateway, body):
    assert len(body) < MAX_REQUEST_BYTES  # checked by the JSON reader, not refused for size
    r = httpx.post(gateway["url"] + "/tag", content=body.encode(), headers={"content-type": "application/json"},
                   timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json" and r.json()["code"] == 3, r.text[:300]
