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
