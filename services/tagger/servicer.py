"""gRPC layer of the tagger: converts TagRequest/TagResponse to and from the domain."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import json_format

from loramesh.v1 import tagger_pb2, tagger_pb2_grpc
from services.common import ordered_struct
from services.common.server import ServiceContext
from services.tagger.tagging import Tagger


class TaggerServicer(tagger_pb2_grpc.TaggerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self._ctx = ctx
        self._tagger = Tagger(ctx.settings, ctx.residency)

    async def Tag(self, request: tagger_pb2.TagRequest, context) -> bytes:
        raw = json_format.MessageToDict(request.input) if request.HasField("input") else None
        scores = await asyncio.to_thread(self._tagger.tag, raw, request.model_path)
        answer = {key: {"rating": result.rating, "tags": result.tags} for key, result in scores.items()}
        # Already-serialized Struct bytes, so the tags stay in confidence order (see register).
        return ordered_struct.struct_bytes(answer)

    async def FreeTagger(self, request, context) -> tagger_pb2.FreeTaggerResponse:
        freed = await asyncio.to_thread(self._tagger.free)
        return tagger_pb2.FreeTaggerResponse(report=self._ctx.memory_report(freed))


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    servicer = TaggerServicer(ctx)
    service = tagger_pb2.DESCRIPTOR.services_by_name["TaggerService"]
    handlers = {
        # Tag returns Struct bytes it encoded itself, in order.
        "Tag": grpc.unary_unary_rpc_method_handler(
            servicer.Tag, request_deserializer=tagger_pb2.TagRequest.FromString, response_serializer=bytes
        ),
        "FreeTagger": grpc.unary_unary_rpc_method_handler(
            servicer.FreeTagger,
            request_deserializer=tagger_pb2.FreeTaggerRequest.FromString,
            response_serializer=tagger_pb2.FreeTaggerResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    return [service.full_name]
