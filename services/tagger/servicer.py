"""gRPC layer of the tagger: converts TagRequest/TagResponse to and from the domain."""

from __future__ import annotations

import asyncio
import json

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format

from loramesh.v1 import tagger_pb2, tagger_pb2_grpc
from services.common.server import ServiceContext
from services.tagger.inputs import parse_inputs
from services.tagger.tagging import Tagger


class TaggerServicer(tagger_pb2_grpc.TaggerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self._ctx = ctx
        self._tagger = Tagger(ctx.settings, ctx.residency)

    async def Tag(self, request: tagger_pb2.TagRequest, context) -> httpbody_pb2.HttpBody:
        raw = json_format.MessageToDict(request.input) if request.HasField("input") else None
        items = parse_inputs(raw, self._ctx.settings.media.max_video_frames)
        scores = await asyncio.to_thread(self._tagger.tag, items, request.model_path)
        answer = {key: {"rating": result.rating, "tags": result.tags} for key, result in scores.items()}
        return httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(answer).encode())

    async def FreeTagger(self, request, context) -> tagger_pb2.FreeTaggerResponse:
        freed = await asyncio.to_thread(self._tagger.free)
        return tagger_pb2.FreeTaggerResponse(report=self._ctx.memory_report(freed))


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    tagger_pb2_grpc.add_TaggerServiceServicer_to_server(TaggerServicer(ctx), server)
    return [tagger_pb2.DESCRIPTOR.services_by_name["TaggerService"].full_name]
