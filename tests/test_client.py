"""The Python client (loramesh.client) against the real mesh: its calls and the REST routes
give equal answers for the same requests, one service at a time; errors carry the field
violations; every RPC of the contract has a typed method."""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import json

import httpx
import pytest
from google.protobuf import json_format
from PIL import Image

from loramesh.client import AsyncClient, Client, errors, stubgen
from loramesh.client.services import InferenceService, TaggerService, method_name
from loramesh.v1 import captioner_pb2, common_pb2, inference_pb2, tagger_pb2, trainer_pb2
from tests.conftest import API_KEY, violated_fields
from tests.test_trainer_sessions import payload


def as_dict(message) -> dict:
    """A message as the gateway prints it (proto names, fields without presence printed)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


@pytest.fixture(scope="module")
def client(mesh):
    with Client(mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def rest(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as rest:
        yield rest


def test_every_rpc_has_a_typed_method():
    for module, name, cls in [(tagger_pb2, "TaggerService", Client().tagger),
                              (trainer_pb2, "TrainerService", Client().trainer),
                              (captioner_pb2, "CaptionerService", Client().captioner),
                              (inference_pb2, "InferenceService", Client().inference),
                              (common_pb2, "MemoryService", Client().memory)]:
        for rpc in module.DESCRIPTOR.services_by_name[name].methods:
            method = getattr(cls, method_name(rpc.name))
            signature = inspect.signature(method)
            assert [p for p in signature.parameters if p not in ("request", "timeout", "metadata")] == \
                [f.name for f in rpc.input_type.fields]
            assert rpc.output_type.name in str(signature.return_annotation)
    assert method_name("Txt2Img") == "txt2img" and method_name("GetCivitaiModel") == "get_civitai_model"
    doc = TaggerService.tag.__doc__
    assert "POST /tag" in doc and "input" in doc
    assert "GET /queue/{job_id}/events" in InferenceService.stream_job_events.__doc__


def test_the_static_types_are_current():
    """services.pyi (what editors and type checkers read) has every method, as `make protos`
    writes it."""
    text = stubgen.STUB_PATH.read_text()
    assert text == stubgen.render(), "run python -m loramesh.client.stubgen (make protos does)"
    ast.parse(text)
    assert "    def tag(\n" in text and ") -> struct_pb2.Struct:" in text
    assert "    async def create_session(\n" in text
    assert ") -> AsyncResponseStream[inference_pb2.StreamJobEventsResponse]:" in text


def test_a_misspelt_field_is_refused_before_any_call():
    with pytest.raises(TypeError, match=r"unknown field 'inptu'; TagRequest has: model_path, input"):
        Client("http://127.0.0.1:1").tagger.tag(inptu=["x.png"])


def test_an_unreachable_gateway_is_unavailable():
    with Client("http://127.0.0.1:1") as client:
        with pytest.raises(errors.Unavailable, match="cannot reach the loramesh gateway at http://127.0.0.1:1"):
            client.wait_ready(timeout=0.5)
        with pytest.raises(errors.Unavailable):
            client.tagger.free_tagger(timeout=5)


def test_tagger_client_equals_rest(client, rest, media_dir):
    body = {"input": [str(media_dir / "cat.png"), {"media_path": str(media_dir / "dog.png"), "general_threshold": 0.2}]}
    expected = rest.post("/tag", json=body)
    assert expected.status_code == 200, expected.text
    assert json_format.MessageToDict(client.tagger.tag(**body)) == expected.json()
    # The same request as a message.
    request = tagger_pb2.TagRequest()
    json_format.ParseDict(body, request)
    assert json_format.MessageToDict(client.tagger.tag(request)) == expected.json()


def test_bad_input_raises_with_the_same_field_violations_as_rest(client, rest, media_dir):
    body = {"input": [{"media_path": str(media_dir / "cat.png"), "general_threshold": 2, "max_frame_count": 0}]}
    answer = rest.post("/tag", json=body)
    assert answer.status_code == 400
    with pytest.raises(errors.InvalidArgument) as raised:
        client.tagger.tag(**body)
    assert sorted(v.field for v in raised.value.violations) == sorted(violated_fields(answer)) == \
        ["input[0].general_threshold", "input[0].max_frame_count"]
    assert all(v.description for v in raised.value.violations)
    assert raised.value.method == "TaggerService.Tag"
    assert "general_threshold" in str(raised.value)


def test_captioner_client_equals_rest(client, rest, media_dir):
    body = {"image_path": str(media_dir / "cat.png"), "max_new_tokens": 16}
    expected = rest.post("/caption", json=body)
    assert expected.status_code == 200, expected.text
    answer = as_dict(client.captioner.caption(**body))
    for key in ("caption", "model_type", "model_path"):
        assert answer[key] == expected.json()[key]
    with pytest.raises(errors.InvalidArgument) as raised:
        client.captioner.caption(image_path=str(media_dir / "cat.png"), model_type="gpt")
    refused = rest.post("/caption", json={"image_path": str(media_dir / "cat.png"), "model_type": "gpt"})
    assert [v.field for v in raised.value.violations] == violated_fields(refused) == ["model_type"]


def test_trainer_client_equals_rest_and_streams_the_log(client, rest, media_dir, dataset_dir, models_dir):
    body = payload("client-session", media_dir / "output" / "client", dataset_dir, models_dir / "tiny-sdxl.safetensors")
    created = client.trainer.create_session(session_id="client-session", max_steps=body["maxSteps"],
                                            config=body["config"])
    assert created.session_id == "client-session" and created.max_steps == 3000
    # The log stream is an iterator; it carries the state changes the session goes through.
    with client.trainer.stream_session_logs(session_id="client-session", follow=True) as lines:
        for line in lines:
            if line.kind == "status" and "waiting" in line.message:
                break
    session = client.trainer.get_session(session_id="client-session")
    assert session.state == "waiting"
    assert as_dict(session) == rest.get("/sessions/client-session").json()
    listed = {s["session_id"]: s for s in rest.get("/sessions").json()["sessions"]}
    assert as_dict(client.trainer.list_sessions().sessions[0]) in listed.values()
    # A second create is ALREADY_EXISTS, as REST's 409.
    with pytest.raises(errors.AlreadyExists):
        client.trainer.create_session(session_id="client-session", config=body["config"])
    assert rest.post("/sessions", json=body | {"sessionId": "client-session"}).status_code == 409
    deleted = client.trainer.delete_session(session_id="client-session")
    assert deleted.deleted
    with pytest.raises(errors.NotFound, match="client-session"):
        client.trainer.get_session(session_id="client-session")


def test_trainer_auth_metadata_reaches_the_gateway(mesh, rest, jwt_keys):
    _, token = jwt_keys
    with Client(mesh.rest_url) as anonymous:
        with pytest.raises(errors.Unauthenticated):
            anonymous.trainer.list_training_tasks(timeout=30)
        with pytest.raises(errors.Unauthenticated):
            anonymous.trainer.get_finetune_details(finetune_id="f-none", timeout=30)
    with Client(mesh.rest_url, token=token, api_key=API_KEY) as signed:
        tasks = signed.trainer.list_training_tasks(timeout=30)
        expected = rest.get("/api/v1/training", headers={"authorization": f"Bearer {token}"})
        assert json.loads(tasks.data) == expected.json()
        with pytest.raises(errors.NotFound):
            signed.trainer.get_finetune_details(finetune_id="f-none", timeout=30)
        assert rest.get("/v1/finetune_details?finetune_id=f-none", headers={"X-Key": API_KEY}).status_code == 404


def test_the_token_and_key_come_from_the_environment(mesh, jwt_keys, monkeypatch):
    _, token = jwt_keys
    monkeypatch.setenv("LORAMESH_URL", mesh.rest_url)
    monkeypatch.setenv("LORAMESH_TOKEN", token)
    with Client() as client:
        assert client.url == mesh.rest_url
        assert json.loads(client.trainer.list_training_tasks(timeout=30).data) is not None


def test_inference_client_equals_rest(client, rest):
    assert as_dict(client.inference.list_catalog_models()) == rest.get("/v1/models").json()
    assert as_dict(client.inference.get_options()) == rest.get("/options").json()
    with pytest.raises(errors.NotFound, match="no-such-job"):
        client.inference.get_job(job_id="no-such-job")
    assert rest.get("/queue/no-such-job").status_code == 404


def test_inference_job_events_and_outputs_through_the_client(client, rest):
    created = client.inference.create_inference(
        model="sdxl", prompts=[{"prompt": "a pop tart", "width": 64, "height": 64, "sample_steps": 3, "seed": 7}])
    events = [e.event for e in client.inference.stream_job_events(job_id=created.request_id)]
    assert "job_progress" in events and events[-1] == "job_status_changed"
    job = client.inference.get_job(job_id=created.request_id)
    assert job.status == "completed" and as_dict(job) == rest.get(f"/queue/{created.request_id}").json()
    image = client.inference.download_output(job.outputs[0])
    assert image == rest.get(f"/output/{job.outputs[0]}").content
    assert Image.open(io.BytesIO(image)).size == (64, 64)


def test_memory_client_frees_every_service(client):
    answer = client.memory.free_vram(timeout_seconds=20)
    # A replica busy with a model may answer late; it is then named in `unanswered`.
    services = {r.service for r in answer.reports} | {u.split("@")[0] for u in answer.unanswered}
    assert services == {"trainer", "captioner", "tagger", "inference"}
    assert answer.total_bytes_freed == sum(r.bytes_freed for r in answer.reports)


def test_async_client_gives_the_same_answers(mesh, rest, media_dir):
    body = {"input": [str(media_dir / "cat.png")]}
    expected = rest.post("/tag", json=body).json()

    async def run():
        async with AsyncClient(mesh.rest_url, timeout=120) as client:
            await client.wait_ready()
            tagged = await client.tagger.tag(**body)
            models = await client.inference.list_catalog_models()
            with pytest.raises(errors.InvalidArgument) as raised:
                await client.tagger.tag(input=[{"media_path": str(media_dir / "cat.png"), "general_threshold": -1}])
            missing = []
            with pytest.raises(errors.NotFound):
                async for event in client.inference.stream_job_events(job_id="no-such-job"):
                    missing.append(event)
            return tagged, models, raised.value, missing

    tagged, models, refused, missing = asyncio.run(run())
    assert json_format.MessageToDict(tagged) == expected
    assert as_dict(models) == rest.get("/v1/models").json()
    assert [v.field for v in refused.violations] == ["input[0].general_threshold"]
    assert missing == []
