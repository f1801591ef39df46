"""Every REST route of the services not built yet answers 501 through the gateway, with
a message naming the route."""

from __future__ import annotations

import re

import httpx
import pytest
from google.api import annotations_pb2

from loramesh.v1 import inference_pb2, trainer_pb2
from services.inference.servicer import BUILT_METHODS
from services.trainer.servicer import BUILT_METHODS as TRAINER_METHODS
from tests.conftest import API_KEY

UNBUILT = [
    trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
]


def bindings(method):
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    for binding in [rule, *rule.additional_bindings]:
        for verb in ("get", "put", "post", "delete", "patch"):
            template = getattr(binding, verb)
            if template:
                yield verb.upper(), template, bool(binding.body)


ROUTES = [
    pytest.param(verb, template, has_body, id=f"{verb} {template}")
    for service in UNBUILT
    for method in service.methods
    if method.name not in TRAINER_METHODS | BUILT_METHODS
    for verb, template, has_body in bindings(method)
]


def concrete(template: str) -> str:
    return re.sub(r"\{[^}=]+(=[^}]*)?\}", "demo", template)


def test_every_unbuilt_service_has_routes():
    unbuilt = [m for service in UNBUILT for m in service.methods if m.name not in TRAINER_METHODS | BUILT_METHODS]
    assert len(ROUTES) >= len(unbuilt)


@pytest.mark.parametrize(("verb", "template", "has_body"), ROUTES)
def test_unbuilt_route_answers_501_naming_itself(mesh, jwt_keys, verb, template, has_body):
    headers = {"authorization": f"Bearer {jwt_keys[1]}", "x-key": API_KEY}
    r = httpx.request(verb, mesh.rest_url + concrete(template), headers=headers,
                      json={} if has_body else None, timeout=30)
    assert r.status_code == 501, (r.status_code, r.text)
    message = r.json()["message"]
    assert "not implemented" in message
    assert template.split("{")[0].rstrip("/") in message
