"""The REST routes of the contract, read from the descriptor set's google.api.http annotations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from google.api import annotations_pb2 as http_options  # registers the http option before parsing
from google.api import http_pb2
from google.protobuf import descriptor_pb2

PACKAGE = "loramesh.v1"
# Which upstream serves each proto service.
SERVICE_UPSTREAMS = {
    "TaggerService": "tagger",
    "MemoryService": "tagger",
    "CaptionerService": "captioner",
    "TrainerService": "trainer",
    "InferenceService": "inference",
}
VERBS = ("get", "put", "post", "delete", "patch")


def load_descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(Path(path).read_bytes())


def http_rules(descriptors: descriptor_pb2.FileDescriptorSet) -> Iterator[tuple[str, str, str, str, http_pb2.HttpRule]]:
    """(service, method, VERB, path template, rule) for every binding, additional ones included."""
    for file in descriptors.file:
        if file.package != PACKAGE:
            continue
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[http_options.http]
                for binding in [rule, *rule.additional_bindings]:
                    for verb in VERBS:
                        path = getattr(binding, verb)
                        if path:
                            yield service.name, method.name, verb.upper(), path, binding


def http_bindings(descriptors: descriptor_pb2.FileDescriptorSet) -> Iterator[tuple[str, str, str, str, str]]:
    """(service, method, VERB, path template, body) for every binding, additional ones included."""
    for service, method, verb, path, rule in http_rules(descriptors):
        yield service, method, verb, path, rule.body


# Each seed document's own error terms, by route family; the first family whose rule
# matches a binding wins, and a binding no family claims answers plain google.rpc.Status.
#   fastapi:    seeds 001 (/api/v1/training), 002 (/v1/finetune) and 003 (/v1/inference,
#               /v1/requests, /v1/models) are FastAPI apps: invalid requests are 422 with
#               {"detail": [{"loc", "msg", "type"}]}, other errors carry {"detail": message}.
#   generation: seed 004 (the generation server) adds {"error": message} to every error.
ERROR_STYLES: tuple[tuple[str, dict], ...] = (
    ("fastapi", {"path_prefixes": ("/v1/", "/api/v1/")}),
    ("generation", {"services": ("InferenceService",)}),
)

# Request bodies whose JSON holds anything (no field names to check) or is not JSON at all.
FREE_FORM_TYPES = frozenset({".google.protobuf.Struct", ".google.protobuf.Value",
                             ".google.protobuf.ListValue", ".google.protobuf.Any"})
RAW_BODY_TYPE = ".google.api.HttpBody"


def error_style(service: str, path: str) -> str | None:
    """The error family (ERROR_STYLES) of a binding."""
    for style, rule in ERROR_STYLES:
        if service in rule.get("services", ()) or path.startswith(rule.get("path_prefixes", ())):
            return style
    return None


class Messages:
    """The request messages of a descriptor set and the JSON names each accepts."""

    def __init__(self, descriptors: descriptor_pb2.FileDescriptorSet):
        self.by_name: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.methods: dict[tuple[str, str], descriptor_pb2.MethodDescriptorProto] = {}
        for file in descriptors.file:
            for message in file.message_type:
                self._add(f".{file.package}", message)
            for service in file.service:
                for method in service.method:
                    self.methods[(service.name, method.name)] = method

    def _add(self, scope: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{scope}.{message.name}"
        self.by_name[name] = message
        for nested in message.nested_type:
            self._add(name, nested)

    def body_type(self, service: str, method: str, body: str) -> str | None:
        """What a binding's body fills: None when there is no JSON body (none, or raw
        HttpBody bytes), "" when its JSON has no field names to check (a scalar field or a
        free-form type), else the message."""
        type_name = self.methods[(service, method)].input_type
        if body and body != "*":
            field = next(f for f in self.by_name[type_name].field if f.name == body)
            type_name = field.type_name if field.type == field.TYPE_MESSAGE else ""
        if not body or type_name == RAW_BODY_TYPE:
            return None
        return "" if type_name in FREE_FORM_TYPES else type_name

    def json_fields(self, type_name: str) -> dict[str, tuple[str, str | None]]:
        """JSON name -> (kind, message) for every field of a message, under its proto name and
        its json_name (the transcoder accepts both). kind is "message" (an object, or a list of
        them), "map" (an object whose values are that message) or "value" (not checked)."""
        fields: dict[str, tuple[str, str | None]] = {}
        for field in self.by_name[type_name].field:
            shape: tuple[str, str | None] = ("value", None)
            nested = self.by_name.get(field.type_name) if field.type == field.TYPE_MESSAGE else None
            if nested is not None and nested.options.map_entry:
                value = nested.field[1]
                if value.type == value.TYPE_MESSAGE and self._checked(value.type_name):
                    shape = ("map", value.type_name)
            elif nested is not None and self._checked(field.type_name):
                shape = ("message", field.type_name)
            fields[field.name] = shape
            fields[field.json_name or field.name] = shape
        return fields

    def _checked(self, type_name: str) -> bool:
        # Well-known types print as JSON scalars or free-form values: nothing to check inside.
        return type_name in self.by_name and not type_name.startswith(".google.")
