"""gRPC layer of the captioner: hands each request to the API as the fields the client sent,
and converts what comes back to protos."""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from loramesh.v1 import captioner_pb2, captioner_pb2_grpc
from services.captioner.api import CaptionerAPI
from services.common.server import ServiceContext


def _fields(request) -> dict:
    """The fields the client set, by proto name; unset ones are left out."""
    return json_format.MessageToDict(request, preserving_proto_field_name=True)


def _request_id(context) -> str:
    return dict(context.invocation_metadata() or ()).get("x-request-id") or "unknown"


def _timings(t) -> captioner_pb2.Timings:
    return captioner_pb2.Timings(load_seconds=t.load_seconds, decode_seconds=t.decode_seconds,
                                 generate_seconds=t.generate_seconds, total_seconds=t.total_seconds)


def _audio(a) -> captioner_pb2.AudioCaption:
    return captioner_pb2.AudioCaption(caption=a.caption, has_audio=a.has_audio, model_path=a.model_path,
                                      duration_seconds=a.duration_seconds, message=a.message)


class CaptionerServicer(captioner_pb2_grpc.CaptionerServiceServicer):
    def __init__(self, api: CaptionerAPI, ctx: ServiceContext):
        self._api = api
        self._ctx = ctx

    async def Caption(self, request, context):
        result = await self._api.caption(_request_id(context), _fields(request))
        return captioner_pb2.CaptionResponse(
            caption=result.caption, model_type=result.options.model_type, model_path=result.options.model_path,
            frame_captions=[captioner_pb2.FrameCaption(frame_index=f.frame_index,
                                                       timestamp_seconds=f.timestamp_seconds, caption=f.caption)
                            for f in result.frames],
            audio=_audio(result.audio) if result.audio else None, timings=_timings(result.timings),
        )

    async def CaptionBatch(self, request, context):
        result = await self._api.caption_batch(_request_id(context), _fields(request))
        return captioner_pb2.CaptionBatchResponse(
            captions=[captioner_pb2.BatchCaption(source=source, caption=caption) for source, caption in result.captions],
            model_type=result.options.model_type, model_path=result.options.model_path,
            timings=_timings(result.timings),
        )

    async def CaptionAudio(self, request, context):
        result, timings = await self._api.caption_audio(_request_id(context), _fields(request))
        return captioner_pb2.CaptionAudioResponse(caption=result.caption, model_path=result.model_path,
                                                  duration_seconds=result.duration_seconds,
                                                  sample_rate=result.sample_rate, timings=_timings(timings))

    async def UnloadCaptionModel(self, request, context):
        freed = await self._api.unload_vision()
        return captioner_pb2.UnloadCaptionModelResponse(report=self._ctx.memory_report(freed))

    async def UnloadAudioModel(self, request, context):
        freed = await self._api.unload_audio()
        return captioner_pb2.UnloadAudioModelResponse(report=self._ctx.memory_report(freed))


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    api = CaptionerAPI(ctx.settings, ctx.residency, ctx.events)
    captioner_pb2_grpc.add_CaptionerServiceServicer_to_server(CaptionerServicer(api, ctx), server)
    return [captioner_pb2.DESCRIPTOR.services_by_name["CaptionerService"].full_name]
