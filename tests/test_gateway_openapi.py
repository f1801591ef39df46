"""The generated OpenAPI document and Envoy config, compared with the descriptor set they
come from."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import descriptor_pb2

from gateway import envoy_config, envoy_runner, openapi
from gateway.routes import PACKAGE, error_style, http_rules, load_descriptor_set
from services.common.settings import REPO_ROOT

DESCRIPTOR = REPO_ROOT / "gen" / "loramesh.pb"
FieldType = descriptor_pb2.FieldDescriptorProto


@pytest.fixture(scope="module")
def descriptors():
    return load_descriptor_set(DESCRIPTOR)


@pytest.fixture(scope="module")
def document():
    return openapi.build(DESCRIPTOR)


def messages(descriptors) -> dict[str, descriptor_pb2.DescriptorProto]:
    return {f".{f.package}.{m.name}": m for f in descriptors.file for m in f.message_type}


def methods(descriptors) -> dict[tuple[str, str], descriptor_pb2.MethodDescriptorProto]:
    return {(s.name, m.name): m for f in descriptors.file if f.package == PACKAGE for s in f.service for m in s.method}


def operation_for(document, verb: str, path: str) -> dict:
    return document["paths"][re.sub(r"\{([^}=]+)=[^}]*\}", r"{\1}", path)][verb.lower()]


def test_every_http_binding_is_an_operation_with_its_parameters_and_body(descriptors, document):
    rpcs = methods(descriptors)
    bindings = list(http_rules(descriptors))
    assert len(bindings) > 50
    documented = sum(len(ops) for ops in document["paths"].values())
    assert documented == len({(verb, re.sub(r"=[^}]*", "", path)) for _, _, verb, path, _ in bindings})
    for service, method, verb, path, rule in bindings:
        operation = operation_for(document, verb, path)
        assert operation["operationId"].startswith(f"{service}_{method}")
        variables = re.findall(r"\{([^}=]+)", path)
        assert [p["name"] for p in operation["parameters"] if p["in"] == "path"] == variables
        request_type = rpcs[(service, method)].input_type
        if rule.body:
            # No body reads as `{}`: the document must not promise a refusal that never comes.
            assert operation["requestBody"]["required"] is False
        if rule.body == "*":
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert schema["$ref"] == f"#/components/schemas/{request_type.removeprefix(f'.{PACKAGE}.')}"
            assert not [p for p in operation["parameters"] if p["in"] == "query"]
        else:
            assert ("requestBody" in operation) == bool(rule.body)
            scalars = {f.name for f in messages(descriptors)[request_type].field if f.type != FieldType.TYPE_MESSAGE}
            query = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
            assert query == scalars - set(variables) - {rule.body}
        # Each seed document's routes answer errors in its own terms (gateway/routes.py ERROR_STYLES).
        error = {"fastapi": "FastAPIError", "generation": "GenerationServerError"}.get(error_style(service, path),
                                                                                      "google.rpc.Status")
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] \
            == f"#/components/schemas/{error}"
        assert ("422" in operation["responses"]) == path.startswith(("/v1/", "/api/v1/"))
        assert ("415" in operation["responses"]) == bool(rule.body)


def test_response_media_types_follow_the_rpc_shape(descriptors, document):
    for service, method, verb, path, rule in http_rules(descriptors):
        rpc = methods(descriptors)[(service, method)]
        responses = operation_for(document, verb, path)["responses"]
        content = responses["200" if "200" in responses else "202"]["content"]
        printed = rpc.output_type  # or the one field response_body names
        if rule.response_body:
            printed = next(f.type_name for f in messages(descriptors)[rpc.output_type].field
                           if f.name == rule.response_body)
        if printed == ".google.api.HttpBody":
            assert content == {"*/*": {"schema": {"type": "string", "format": "binary"}}}
        elif rpc.server_streaming:
            assert list(content) == ["text/event-stream"]
        else:
            assert list(content) == ["application/json"]


def test_every_message_is_a_schema_with_proto_names_and_comments(descriptors, document):
    schemas = document["components"]["schemas"]
    for name, message in messages(descriptors).items():
        if not name.startswith(f".{PACKAGE}."):
            continue
        schema = schemas[name.removeprefix(f".{PACKAGE}.")]
        assert list(schema["properties"]) == [f.name for f in message.field]
    assert "TaggerService" not in schemas
    assert schemas["TagInput"]["properties"]["media_path"]["description"].startswith("Path of a local image")
    assert schemas["Event"]["description"].startswith("The envelope of every message")
    refs = re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document))
    assert set(refs) <= set(schemas)


def test_well_known_types_and_64_bit_integers_use_their_json_forms(descriptors, document):
    json_forms = {".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
                  ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
                  ".google.protobuf.Value": {}}
    sixty_four_bit = {FieldType.TYPE_INT64, FieldType.TYPE_UINT64, FieldType.TYPE_SINT64, FieldType.TYPE_FIXED64,
                      FieldType.TYPE_SFIXED64}
    seen = set()
    for name, message in messages(descriptors).items():
        if not name.startswith(f".{PACKAGE}."):
            continue
        properties = document["components"]["schemas"][name.removeprefix(f".{PACKAGE}.")]["properties"]
        for field in message.field:
            schema = properties[field.name]
            if field.label == FieldType.LABEL_REPEATED and schema.get("type") == "array":
                schema = schema["items"]
            schema = {k: v for k, v in schema.items() if k != "description"}
            if field.type_name in json_forms:
                seen.add(field.type_name)
                assert schema == json_forms[field.type_name], (name, field.name)
            if field.type in sixty_four_bit:
                assert schema["type"] == "string", (name, field.name)  # proto3 JSON quotes them
    assert seen == set(json_forms)
    assert document["components"]["schemas"]["Event"]["properties"]["kind"]["enum"][0] == "EVENT_KIND_UNSPECIFIED"


def test_guarded_routes_name_their_security_scheme(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-Key"}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            expected = ([{"bearer": []}] if path.startswith(envoy_config.JWT_PREFIX) else
                        [{"apiKey": []}] if path.startswith(envoy_config.API_KEY_PREFIX) else None)
            assert operation.get("security") == expected, path


def test_transcoder_serves_every_service_of_the_contract(descriptors):
    cfg = envoy_config.GatewayConfig(descriptor_path=DESCRIPTOR, upstreams={"tagger": ("127.0.0.1", 1)})
    rendered = json.dumps(envoy_config.render(cfg))
    services = sorted(f"{PACKAGE}.{s.name}" for f in descriptors.file if f.package == PACKAGE for s in f.service)
    assert f'"services": {json.dumps(services)}' in rendered


def test_config_with_every_option_passes_envoy_validation(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(
        key.public_key()))]}))
    (tmp_path / "api-keys").write_text("k1\n")
    (tmp_path / "openapi.json").write_text("{}")
    cfg = envoy_config.GatewayConfig(
        descriptor_path=DESCRIPTOR,
        upstreams={name: (name, port) for name, port in
                   [("trainer", 50051), ("captioner", 50052), ("tagger", 50053), ("inference", 50054)]},
        openapi_path=tmp_path / "openapi.json", jwks_path=tmp_path / "jwks.json", jwt_issuer="issuer",
        api_keys_path=tmp_path / "api-keys", dns_upstreams=True, embed_descriptor=True,
    )
    result = envoy_runner.validate(envoy_config.write(cfg, tmp_path / "envoy.yaml"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_k8s_preset_cli_is_deterministic(tmp_path):
    outputs = []
    for name in ("a.yaml", "b.yaml"):
        subprocess.run([sys.executable, "-m", "gateway.envoy_config", "--preset", "k8s", "--descriptor",
                        str(DESCRIPTOR), "--out", str(tmp_path / name)], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        outputs.append((tmp_path / name).read_text())
    assert outputs[0] == outputs[1]
    config = yaml.safe_load(outputs[0])
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["trainer"]["type"] == "STRICT_DNS"
    assert clusters["trainer"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] \
        == {"socket_address": {"address": "trainer", "port_value": 50051}}
    assert "proto_descriptor_bin" in outputs[0] and str(DESCRIPTOR) not in outputs[0]
