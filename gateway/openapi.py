"""An OpenAPI 3.1 document generated from the contract's google.api.http annotations:
every route, its parameters, request and response schemas and the proto comments.

    python -m gateway.openapi --descriptor gen/loramesh.pb --out var/openapi.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from google.protobuf import descriptor_pb2

from gateway.envoy_config import API_KEY_PREFIX, JWT_PREFIX
from gateway.routes import PACKAGE, error_style, http_rules, load_descriptor_set

FieldType = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    FieldType.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldType.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldType.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldType.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldType.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldType.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldType.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings.
    FieldType.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldType.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldType.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldType.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldType.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldType.TYPE_BOOL: {"type": "boolean"},
    FieldType.TYPE_STRING: {"type": "string"},
    FieldType.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN = {
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    ".google.protobuf.Value": {},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    ".google.protobuf.Empty": {"type": "object"},
    ".google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}},
                             "additionalProperties": True},
}
_HTTP_BODY = ".google.api.HttpBody"
_STATUS_SCHEMA = {
    "type": "object",
    "description": "google.rpc.Status: the gRPC code, a message naming the problem, and details "
                   "(google.rpc.BadRequest field violations for invalid requests).",
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object", "additionalProperties": True}},
    },
}
_STATUS_REF = {"$ref": "#/components/schemas/google.rpc.Status"}
# Each seed document's own error terms (gateway/routes.py ERROR_STYLES), added to the status.
_STYLE_SCHEMAS = {
    "generation": ("GenerationServerError", {"allOf": [_STATUS_REF, {"type": "object", "properties": {
        "error": {"type": "string", "description": "The message, as the generation server's document has it."}}}]}),
    "fastapi": ("FastAPIError", {"allOf": [_STATUS_REF, {"type": "object", "properties": {
        "detail": {"type": "string", "description": "The message, as FastAPI's HTTPException has it."}}}]}),
}
_VALIDATION_SCHEMA = {"allOf": [_STATUS_REF, {"type": "object", "properties": {"detail": {
    "type": "array", "description": "FastAPI's validation errors, one per bad field.",
    "items": {"type": "object", "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "description": "where the field was sent (body, query, path), then its path"},
        "msg": {"type": "string"},
        "type": {"type": "string"},
    }},
}}}]}


class _Index:
    """Messages, enums and comments of a descriptor set, by fully qualified name."""

    def __init__(self, descriptors: descriptor_pb2.FileDescriptorSet):
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[tuple, str] = {}
        self.methods: dict[tuple[str, str], descriptor_pb2.MethodDescriptorProto] = {}
        for file in descriptors.file:
            for location in file.source_code_info.location:
                text = location.leading_comments.strip()
                if text:
                    self.comments[(file.name, *location.path)] = " ".join(text.split())
            for i, message in enumerate(file.message_type):
                self._add_message(file, f".{file.package}", message, (4, i))
            for enum in file.enum_type:
                self.enums[f".{file.package}.{enum.name}"] = enum
            for s, service in enumerate(file.service):
                for m, method in enumerate(service.method):
                    self.methods[(service.name, method.name)] = method
                    self.comments.setdefault(("method", service.name, method.name),
                                             self.comments.get((file.name, 6, s, 2, m), ""))

    def _add_message(self, file, scope: str, message, path: tuple) -> None:
        name = f"{scope}.{message.name}"
        self.messages[name] = message
        self.comments[("message", name)] = self.comments.get((file.name, *path), "")
        for f, field in enumerate(message.field):
            self.comments[("field", name, field.name)] = self.comments.get((file.name, *path, 2, f), "")
        for i, nested in enumerate(message.nested_type):
            self._add_message(file, name, nested, (*path, 3, i))
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum


def _schema_name(full_name: str) -> str:
    return full_name.lstrip(".").removeprefix(PACKAGE + ".")


def _field_schema(index: _Index, field: descriptor_pb2.FieldDescriptorProto, wanted: set[str]) -> dict:
    if field.type == FieldType.TYPE_MESSAGE:
        entry = index.messages.get(field.type_name)
        if entry is not None and entry.options.map_entry:
            return {"type": "object",
                    "additionalProperties": _field_schema(index, entry.field[1], wanted)}
        item = _message_ref(index, field.type_name, wanted)
    elif field.type == FieldType.TYPE_ENUM:
        item = {"type": "string", "enum": [v.name for v in index.enums[field.type_name].value]}
    else:
        item = dict(_SCALARS[field.type])
    if field.label == FieldType.LABEL_REPEATED:
        return {"type": "array", "items": item}
    return item


def _message_ref(index: _Index, type_name: str, wanted: set[str]) -> dict:
    if type_name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[type_name])
    wanted.add(type_name)
    return {"$ref": f"#/components/schemas/{_schema_name(type_name)}"}


def _message_schema(index: _Index, type_name: str, wanted: set[str]) -> dict:
    message = index.messages[type_name]
    properties = {}
    for field in message.field:
        schema = _field_schema(index, field, wanted)
        comment = index.comments.get(("field", type_name, field.name))
        if comment:
            schema = {**schema, "description": comment} if "$ref" not in schema else \
                {"allOf": [schema], "description": comment}
        properties[field.name] = schema
    schema = {"type": "object", "properties": properties}
    if index.comments.get(("message", type_name)):
        schema["description"] = index.comments[("message", type_name)]
    return schema


def _path_parameter(index: _Index, request_type: str, name: str, wanted: set[str]) -> dict:
    """A path variable, typed like the (possibly nested, `a.b`) request field it fills."""
    schema: dict = {"type": "string"}
    message = index.messages.get(request_type)
    for part in name.split("."):
        field = next((f for f in message.field if f.name == part), None) if message else None
        if field is None:
            break
        if field.type == FieldType.TYPE_MESSAGE:
            message = index.messages.get(field.type_name)
        else:
            schema = _field_schema(index, field, wanted)
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _response_content(index: _Index, method, response_body: str, wanted: set[str]) -> dict:
    # With response_body the transcoder prints only that field of the response (Envoy 1.40
    # allows it for a google.api.HttpBody field only).
    field = next((f for f in index.messages[method.output_type].field if f.name == response_body), None)
    if (field.type_name if field else method.output_type) == _HTTP_BODY:
        return {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    schema = _field_schema(index, field, wanted) if field else _message_ref(index, method.output_type, wanted)
    if method.server_streaming:
        return {"text/event-stream": {"schema": schema}}
    return {"application/json": {"schema": schema}}


def _operation(index: _Index, service: str, method_name: str, path: str, rule, wanted: set[str]) -> dict:
    method = index.methods[(service, method_name)]
    request = index.messages[method.input_type]
    body = rule.body
    path_params = re.findall(r"\{([^}=]+)(?:=[^}]*)?\}", path)
    comment = index.comments.get(("method", service, method_name), "")
    operation: dict = {
        "operationId": f"{service}_{method_name}",
        "tags": [service],
        "summary": comment.split(". ")[0].rstrip(".") or method_name,
        "description": comment,
        "parameters": [_path_parameter(index, method.input_type, p, wanted) for p in path_params],
    }
    # A body may be left out: the transcoder reads no body as `{}`, every field its default,
    # and the service names any field it needs (the documents' own examples POST /vram/free
    # and the unload routes without one).
    if body == "*":
        operation["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": _message_ref(index, method.input_type, wanted)}}}
    elif body:
        field = next(f for f in request.field if f.name == body)
        operation["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": _field_schema(index, field, wanted)}}}
    if body != "*":
        # Fields outside the path and body travel as query parameters (scalars only).
        taken = {p.split(".")[0] for p in path_params} | {body}
        for field in request.field:
            if field.name in taken or field.type == FieldType.TYPE_MESSAGE:
                continue
            operation["parameters"].append({
                "name": field.name, "in": "query", "required": False,
                "schema": _field_schema(index, field, wanted),
                "description": index.comments.get(("field", method.input_type, field.name), ""),
            })
    style = error_style(service, path)
    schema = f"#/components/schemas/{_STYLE_SCHEMAS[style][0]}" if style else _STATUS_REF["$ref"]
    error = {"content": {"application/json": {"schema": {"$ref": schema}}}}
    # The RPCs that queue work say so in their contract comment; the gateway answers them 202.
    success = ("202", "Accepted: queued, to follow by its id") if "Answers 202" in comment else ("200", "OK")
    responses = {
        success[0]: {"description": success[1],
                     "content": _response_content(index, method, rule.response_body, wanted)},
        "400": {"description": "Invalid request: the message and the BadRequest detail name each bad field "
                               "(an unknown JSON field included)", **error},
    }
    if style == "fastapi":
        responses["400"]["description"] = "Malformed request (not JSON, unknown query parameter)"
        responses["422"] = {"description": "Invalid request: one validation error per bad field (an unknown JSON "
                                           "field included), beside the BadRequest detail",
                            "content": {"application/json": {"schema": {
                                "$ref": "#/components/schemas/HTTPValidationError"}}}}
    if body:
        responses["415"] = {"description": "A request body whose Content-Type is not application/json", **error}
    if path.startswith(JWT_PREFIX):
        operation["security"] = [{"bearer": []}]
        responses["401"] = {"description": "Missing, expired or invalid bearer token", **error}
    if path.startswith(API_KEY_PREFIX):
        operation["security"] = [{"apiKey": []}]
        responses["401"] = {"description": "Missing X-Key header", **error}
        responses["403"] = {"description": "X-Key is not an accepted key", **error}
    responses["404"] = {"description": "Not found (or no such route)", **error}
    responses["413"] = {"description": "Request body over the gateway's size limit", **error}
    responses["default"] = {"description": "Error: the gRPC status mapped to HTTP", **error}
    operation["responses"] = responses
    return operation


def build(descriptor_path: Path) -> dict:
    descriptors = load_descriptor_set(descriptor_path)
    index = _Index(descriptors)
    wanted: set[str] = set()
    paths: dict[str, dict] = {}
    seen_ids: set[str] = set()
    for service, method, verb, path, rule in http_rules(descriptors):
        openapi_path = re.sub(r"\{([^}=]+)=[^}]*\}", r"{\1}", path)
        operation = _operation(index, service, method, path, rule, wanted)
        while operation["operationId"] in seen_ids:  # additional bindings of one RPC
            operation["operationId"] += "_alt"
        seen_ids.add(operation["operationId"])
        paths.setdefault(openapi_path, {})[verb.lower()] = operation
    # Every message of the contract is documented, also those only sent inside a Value or
    # published as events (TagInput, Event), not only those the routes reach.
    wanted |= {name for name, message in index.messages.items()
               if name.startswith(f".{PACKAGE}.") and not message.options.map_entry}
    schemas: dict[str, dict] = {"google.rpc.Status": _STATUS_SCHEMA, "HTTPValidationError": _VALIDATION_SCHEMA,
                                **dict(_STYLE_SCHEMAS.values())}
    done: set[str] = set()
    while wanted - done:
        name = sorted(wanted - done)[0]
        done.add(name)
        schemas[_schema_name(name)] = _message_schema(index, name, wanted)
    return {
        "openapi": "3.1.0",
        "info": {"title": "loramesh", "version": "v1",
                 "description": "LoRA training, captioning, tagging and generation. Requests accept "
                                "snake_case and camelCase field names; responses use snake_case."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Key"},
            },
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptor", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(build(args.descriptor), indent=2, sort_keys=False) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
