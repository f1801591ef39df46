"""Serves every RPC of a service that is not built yet with UNIMPLEMENTED and a message
naming the REST route, so clients learn what is missing instead of getting a 503."""

from __future__ import annotations

import grpc
from google.api import annotations_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

_VERBS = ("get", "put", "post", "delete", "patch")


def http_route(method: MethodDescriptor) -> str:
    """"POST /sessions" for a method's http annotation ("" when it has none)."""
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    for verb in _VERBS:
        path = getattr(rule, verb)
        if path:
            return f"{verb.upper()} {path}"
    return ""


def generic_handler(service: ServiceDescriptor, service_label: str, servicer=None,
                    built: frozenset[str] = frozenset()) -> grpc.GenericRpcHandler:
    """The methods named in `built` served by `servicer`; refusals for the rest."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        if method.name in built:
            make = grpc.unary_stream_rpc_method_handler if method.server_streaming \
                else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = make(getattr(servicer, method.name), request_class.FromString,
                                         response_class.SerializeToString)
            continue
        message = (
            f"{http_route(method) or method.full_name} is not implemented yet: "
            f"the {service_label} service does not serve {service.name}.{method.name} in this release"
        )
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream_refusal(message), request_class.FromString, response_class.SerializeToString
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_refusal(message), request_class.FromString, response_class.SerializeToString
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _unary_refusal(message: str):
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return refuse


def _stream_refusal(message: str):
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        yield  # makes this an async generator, as streaming handlers are

    return refuse


def serve_unimplemented(service_name: str, service: ServiceDescriptor):
    """A `register` callback for services.common.server.main."""

    def register(server: grpc.aio.Server, ctx) -> list[str]:
        server.add_generic_rpc_handlers((generic_handler(service, service_name),))
        return [service.full_name]

    return register
