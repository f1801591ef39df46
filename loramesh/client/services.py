"""One class per gRPC service of the mesh, with one method per RPC, made from the service
descriptors of the generated stubs so every RPC the contract has is here and none is
written by hand.

A method takes the request message, or its fields as keywords (dicts for message,
Struct and Value fields), and returns the response message; server-streaming RPCs return
an iterator of messages that can be cancelled. Each method carries a real signature
(`inspect.signature(client.tagger.tag)` lists the request's fields with their types) and a
docstring naming its REST route. Failures raise `loramesh.client.errors.LorameshError`
subclasses.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any, Generic, TypeVar

import grpc
from google.api import annotations_pb2
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from loramesh.client.errors import error_from_rpc
from loramesh.v1 import captioner_pb2, common_pb2, inference_pb2, tagger_pb2, trainer_pb2

__all__ = [
    "TrainerService", "CaptionerService", "TaggerService", "InferenceService", "MemoryService",
    "AsyncTrainerService", "AsyncCaptionerService", "AsyncTaggerService", "AsyncInferenceService",
    "AsyncMemoryService", "ResponseStream", "AsyncResponseStream", "method_name",
]

T = TypeVar("T")

# Keyword arguments every method takes besides the request's fields.
_CALL_OPTIONS = ("timeout", "metadata")


def method_name(rpc: str) -> str:
    """The Python name of an RPC: CreateSession -> create_session, Txt2Img -> txt2img."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", rpc).lower()


# ---- requests from keyword fields -------------------------------------------------------

def build_request(cls: type[Message], request: Any, fields: dict[str, Any], where: str) -> Message:
    """The request message: `request` itself, or one made from a dict or keyword fields.
    A field given as None is left unset."""
    if request is not None:
        if fields:
            raise TypeError(f"{where}() takes a request message or keyword fields, not both")
        if isinstance(request, cls):
            return request
        if not isinstance(request, dict):
            raise TypeError(f"{where}() takes a {cls.DESCRIPTOR.full_name} or a dict, not {type(request).__name__}")
        fields = request
    message = cls()
    descriptor = cls.DESCRIPTOR
    by_json_name = {f.json_name: f for f in descriptor.fields}
    for name, value in fields.items():
        if value is None:
            continue
        field = descriptor.fields_by_name.get(name) or by_json_name.get(name)
        if field is None:
            allowed = ", ".join(f.name for f in descriptor.fields) or "none"
            raise TypeError(f"{where}() got an unknown field {name!r}; {descriptor.name} has: {allowed}")
        try:
            _assign(message, field, value)
        except (TypeError, ValueError, AttributeError, json_format.ParseError) as exc:
            raise TypeError(f"{where}(): field {field.name}: {exc}") from None
    return message


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is None:
        if _is_repeated(field):
            target.extend(value)
        else:
            setattr(message, field.name, value)
    elif field.message_type.GetOptions().map_entry:
        json_format.ParseDict({field.name: value}, message)
    elif _is_repeated(field):
        for item in value:
            if isinstance(item, Message):
                target.add().CopyFrom(item)
            else:
                json_format.ParseDict(item, target.add())
    elif isinstance(value, Message):
        target.CopyFrom(value)
    elif isinstance(value, datetime) and field.message_type.full_name == "google.protobuf.Timestamp":
        target.FromDatetime(value)
    else:
        target.SetInParent()
        json_format.ParseDict(value, target)


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


# ---- signatures -------------------------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_STRING: str, FieldDescriptor.TYPE_BYTES: bytes, FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_DOUBLE: float, FieldDescriptor.TYPE_FLOAT: float,
}
# What a dict or list stands for in a well-known type.
_WELL_KNOWN = {"google.protobuf.Struct": dict[str, Any], "google.protobuf.Value": Any,
               "google.protobuf.ListValue": list[Any], "google.protobuf.Timestamp": datetime}


def _annotation(field: FieldDescriptor) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict[str, Any]
    if field.message_type is not None:
        cls = message_factory.GetMessageClass(field.message_type)
        kind = _WELL_KNOWN.get(field.message_type.full_name, dict[str, Any])
        single = Any if kind is Any else cls | kind
    elif field.type == FieldDescriptor.TYPE_ENUM:
        single = int | str
    else:
        single = _SCALARS.get(field.type, int)
    return list[single] if _is_repeated(field) else single


def _signature(method: MethodDescriptor, streaming_result: type) -> inspect.Signature:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_ONLY, default=None,
                          annotation=request_cls | dict[str, Any] | None),
    ]
    params += [inspect.Parameter(f.name, kw, default=None, annotation=_annotation(f) | None)
               for f in method.input_type.fields]
    params += [inspect.Parameter("timeout", kw, default=None, annotation=float | None),
               inspect.Parameter("metadata", kw, default=(), annotation=tuple[tuple[str, str], ...])]
    if method.server_streaming:
        result = streaming_result[response_cls]
    else:
        result = response_cls
    return inspect.Signature(params, return_annotation=result)


def _route(method: MethodDescriptor) -> str:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return ""
    rule = options.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    return f"{verb.upper()} {getattr(rule, verb)}" if verb and verb != "custom" else ""


def _docstring(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    route = _route(method)
    kind = "a stream of " if method.server_streaming else ""
    return (f"{service.name}.{method.name}({method.input_type.name}) -> {kind}{method.output_type.name}"
            + (f"\n\nREST: {route}" if route else "")
            + f"\n\nFields: {', '.join(f.name for f in method.input_type.fields) or 'none'}.")


# ---- streams ----------------------------------------------------------------------------

class ResponseStream(Generic[T]):
    """The messages of a server stream, as they arrive. `cancel()` ends it early (the
    iteration then stops quietly); a failure raises the matching LorameshError."""

    def __init__(self, call, where: str):
        self._call = call
        self._where = where
        self._cancelled = False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise error_from_rpc(exc, self._where) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncResponseStream(Generic[T]):
    """The grpc.aio counterpart of ResponseStream: `async for message in stream`."""

    def __init__(self, call, where: str):
        self._call = call
        self._where = where
        self._cancelled = False
        self._messages = call.__aiter__()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._messages.__anext__()
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise error_from_rpc(exc, self._where) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncResponseStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


# ---- services ---------------------------------------------------------------------------

class _Service:
    """Base of the service classes: the subclass names its descriptor and whether its
    methods are coroutines; the methods are made once, when the class is defined."""

    descriptor: ServiceDescriptor

    def __init__(self, channel, metadata: tuple[tuple[str, str], ...] = (), timeout: float | None = None):
        self._metadata = tuple(metadata)
        self._timeout = timeout
        self._callables = {}
        for method in self.descriptor.methods:
            path = f"/{self.descriptor.full_name}/{method.name}"
            make = channel.unary_stream if method.server_streaming else channel.unary_unary
            self._callables[method.name] = make(
                path, request_serializer=message_factory.GetMessageClass(method.input_type).SerializeToString,
                response_deserializer=message_factory.GetMessageClass(method.output_type).FromString)

    def __init_subclass__(cls, descriptor: ServiceDescriptor | None = None, asynchronous: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if descriptor is None:
            return
        cls.descriptor = descriptor
        for method in descriptor.methods:
            name = method_name(method.name)
            clash = {f.name for f in method.input_type.fields} & set(_CALL_OPTIONS)
            if clash:
                raise TypeError(f"{method.full_name}: request field(s) {clash} clash with call options")
            function = _async_method(method) if asynchronous else _sync_method(method)
            function.__name__ = name
            function.__qualname__ = f"{cls.__name__}.{name}"
            function.__doc__ = _docstring(descriptor, method)
            function.__signature__ = _signature(method, AsyncResponseStream if asynchronous else ResponseStream)
            setattr(cls, name, function)

    def _options(self, timeout: float | None, metadata) -> dict[str, Any]:
        return {"timeout": self._timeout if timeout is None else timeout,
                "metadata": self._metadata + tuple(metadata)}


def _sync_method(method: MethodDescriptor):
    request_cls = message_factory.GetMessageClass(method.input_type)
    where = f"{method.containing_service.name}.{method.name}"

    if method.server_streaming:
        def call(self, request=None, /, *, timeout=None, metadata=(), **fields):
            message = build_request(request_cls, request, fields, method_name(method.name))
            return ResponseStream(self._callables[method.name](message, **self._options(timeout, metadata)), where)
    else:
        def call(self, request=None, /, *, timeout=None, metadata=(), **fields):
            message = build_request(request_cls, request, fields, method_name(method.name))
            try:
                return self._callables[method.name](message, **self._options(timeout, metadata))
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, where) from None
    return call


def _async_method(method: MethodDescriptor):
    request_cls = message_factory.GetMessageClass(method.input_type)
    where = f"{method.containing_service.name}.{method.name}"

    if method.server_streaming:
        def call(self, request=None, /, *, timeout=None, metadata=(), **fields):
            message = build_request(request_cls, request, fields, method_name(method.name))
            return AsyncResponseStream(self._callables[method.name](message, **self._options(timeout, metadata)),
                                       where)
    else:
        async def call(self, request=None, /, *, timeout=None, metadata=(), **fields):
            message = build_request(request_cls, request, fields, method_name(method.name))
            try:
                return await self._callables[method.name](message, **self._options(timeout, metadata))
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, where) from None
    return call


def _service(module, name: str) -> ServiceDescriptor:
    return module.DESCRIPTOR.services_by_name[name]


class TrainerService(_Service, descriptor=_service(trainer_pb2, "TrainerService")):
    """Training sessions (`/sessions*`), training tasks (`/api/v1/training*`, needs a
    token) and finetunes (`/v1/finetune*`, needs an API key)."""


class CaptionerService(_Service, descriptor=_service(captioner_pb2, "CaptionerService")):
    """Florence-2 / JoyCaption image and video captions, audio captions."""


class TaggerService(_Service, descriptor=_service(tagger_pb2, "TaggerService")):
    """WD14 tags of images and videos."""


class InferenceService(_Service, descriptor=_service(inference_pb2, "InferenceService")):
    """Image and video generation: the async `/v1` API and the generation server."""

    def download_output(self, path: str, *, timeout: float | None = None) -> bytes:
        """The bytes of an output file (`Job.outputs` entries are paths relative to the
        output root)."""
        return b"".join(chunk.data for chunk in self.browse_output(path=path, timeout=timeout))


class MemoryService(_Service, descriptor=_service(common_pb2, "MemoryService")):
    """`POST /vram/free`: frees accelerator memory in every service."""


class AsyncTrainerService(_Service, descriptor=_service(trainer_pb2, "TrainerService"), asynchronous=True):
    __doc__ = TrainerService.__doc__


class AsyncCaptionerService(_Service, descriptor=_service(captioner_pb2, "CaptionerService"), asynchronous=True):
    __doc__ = CaptionerService.__doc__


class AsyncTaggerService(_Service, descriptor=_service(tagger_pb2, "TaggerService"), asynchronous=True):
    __doc__ = TaggerService.__doc__


class AsyncInferenceService(_Service, descriptor=_service(inference_pb2, "InferenceService"), asynchronous=True):
    __doc__ = InferenceService.__doc__

    async def download_output(self, path: str, *, timeout: float | None = None) -> bytes:
        """The bytes of an output file (relative to the output root)."""
        return b"".join([chunk.data async for chunk in self.browse_output(path=path, timeout=timeout)])


class AsyncMemoryService(_Service, descriptor=_service(common_pb2, "MemoryService"), asynchronous=True):
    __doc__ = MemoryService.__doc__
