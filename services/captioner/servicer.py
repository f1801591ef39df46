"""gRPC layer of the captioner: checks requests, runs captioning on the model thread and
converts results to protos."""

from __future__ import annotations

import asyncio

import grpc

from loramesh.v1 import captioner_pb2, captioner_pb2_grpc
from loramesh.v1.events_pb2 import EVENT_KIND_PROGRESS, EVENT_KIND_STATUS
from services.captioner import audio as audio_lm
from services.captioner import options as opts
from services.captioner.captioning import AudioResult, Captioning, Timings
from services.common.errors import InvalidInput, Violations
from services.common.model_thread import ModelThread
from services.common.server import ServiceContext

MAX_BATCH_IMAGES = 512


def _opt(message, name):
    return getattr(message, name) if message.HasField(name) else None


def _audio_options(bad: Violations, request, prefix: str) -> audio_lm.AudioOptions:
    """AudioOptions from `<prefix>prompt`, `<prefix>max_new_tokens`, ... of a request."""
    values = {name: _opt(request, f"{prefix}{name}") for name in
              ("max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "repetition_penalty",
               "target_sample_rate", "max_audio_seconds")}
    prompt = getattr(request, f"{prefix}prompt")
    options = audio_lm.AudioOptions(
        **{k: v for k, v in values.items() if v is not None},
        **({"prompt": prompt} if prompt else {}),
        seed=_opt(request, "seed"),
    )
    try:
        options.check(prefix)
    except InvalidInput as exc:
        for field, description in exc.violations:
            bad.add(field, description)
    return options


def _timings(t: Timings) -> captioner_pb2.Timings:
    return captioner_pb2.Timings(load_seconds=t.load_seconds, decode_seconds=t.decode_seconds,
                                 generate_seconds=t.generate_seconds, total_seconds=t.total_seconds)


def _audio(a: AudioResult) -> captioner_pb2.AudioCaption:
    return captioner_pb2.AudioCaption(caption=a.caption, has_audio=a.has_audio, model_path=a.model_path,
                                      duration_seconds=a.duration_seconds, message=a.message)


class CaptionerServicer(captioner_pb2_grpc.CaptionerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self._ctx = ctx
        self._captioning = Captioning(ctx.settings, ctx.residency)
        self._thread = ModelThread("captioner-models")  # every model call runs here

    async def _tracked(self, context, what: str, fn, *args, progress: bool = True, **kwargs):
        """Runs a long call with progress events under its request id (the gateway's
        x-request-id), and a status event when it ends or fails."""
        request_id = dict(context.invocation_metadata() or ()).get("x-request-id") or "unknown"
        loop = asyncio.get_running_loop()
        events = self._ctx.events

        def on_batch(done: int, total: int) -> None:
            data = {"done": done, "total": total, "message": f"{what}: {done}/{total} images captioned"}
            loop.call_soon_threadsafe(asyncio.ensure_future, events.publish(request_id, EVENT_KIND_PROGRESS, data))

        if progress:
            kwargs["on_batch"] = on_batch
        try:
            result = await self._thread.run(fn, *args, **kwargs)
        except Exception as exc:
            await events.publish(request_id, EVENT_KIND_STATUS, {"status": "failed", "message": what,
                                                                 "error": str(exc)})
            raise
        await events.publish(request_id, EVENT_KIND_STATUS, {"status": "completed", "message": what})
        return result

    async def Caption(self, request, context):
        bad = Violations()
        source = opts.one_source(bad, **{name: getattr(request, name) for name in opts.INPUTS})
        options = opts.vision_options(
            bad, model_type=request.model_type, model_path=request.model_path,
            max_new_tokens=_opt(request, "max_new_tokens"), num_beams=_opt(request, "num_beams"), task=request.task,
            prompt=request.prompt, temperature=_opt(request, "temperature"), top_p=_opt(request, "top_p"),
            seed=_opt(request, "seed"),
        )
        count, sample_method, combine_method = opts.video_settings(
            bad, source, num_frames=_opt(request, "num_frames"), sample_method=request.sample_method,
            combine_method=request.combine_method, do_audio=request.do_audio,
            max_frames=self._ctx.settings.media.max_video_frames,
        )
        audio_options = _audio_options(bad, request, "audio_") if request.do_audio else None
        roots = self._ctx.settings.model_roots
        opts.check_model_path(bad, request.model_path, "model_path", roots)
        opts.check_model_path(bad, request.audio_model_path, "audio_model_path", roots)
        bad.raise_if_any()
        result = await self._tracked(
            context, "caption", self._captioning.caption, source, options, num_frames=count,
            sample_method=sample_method, combine_method=combine_method, audio_model_path=request.audio_model_path,
            audio_options=audio_options,
        )
        return captioner_pb2.CaptionResponse(
            caption=result.caption, model_type=options.model_type, model_path=options.model_path,
            frame_captions=[captioner_pb2.FrameCaption(frame_index=f.frame_index,
                                                       timestamp_seconds=f.timestamp_seconds, caption=f.caption)
                            for f in result.frames],
            audio=_audio(result.audio) if result.audio else None, timings=_timings(result.timings),
        )

    async def CaptionBatch(self, request, context):
        bad = Violations()
        sources = [opts.Source(f"image_paths[{i}]", p, is_url=False, is_video=False)
                   for i, p in enumerate(request.image_paths)]
        sources += [opts.Source(f"image_urls[{i}]", u, is_url=True, is_video=False)
                    for i, u in enumerate(request.image_urls)]
        if not sources:
            bad.add("image_paths", "at least one image path or URL is required")
        elif len(sources) > MAX_BATCH_IMAGES:
            bad.add("image_paths", f"at most {MAX_BATCH_IMAGES} images per call (got {len(sources)})")
        o = request.options
        options = opts.vision_options(
            bad, model_type=o.model_type, model_path=o.model_path, max_new_tokens=_opt(o, "max_new_tokens"),
            num_beams=_opt(o, "num_beams"), task=o.task, prompt=o.prompt, temperature=_opt(o, "temperature"),
            top_p=_opt(o, "top_p"), seed=_opt(o, "seed"), prefix="options.",
        )
        opts.check_model_path(bad, o.model_path, "options.model_path", self._ctx.settings.model_roots)
        batch_size = _opt(request, "batch_size") or 8
        if not 1 <= batch_size <= 64:
            bad.add("batch_size", f"must be between 1 and 64 (got {batch_size})")
        bad.raise_if_any()
        captions, timings = await self._tracked(context, "caption batch", self._captioning.caption_batch, sources,
                                                options, batch_size)
        return captioner_pb2.CaptionBatchResponse(
            captions=[captioner_pb2.BatchCaption(source=s.value, caption=c) for s, c in zip(sources, captions,
                                                                                         strict=True)],
            model_type=options.model_type, model_path=options.model_path, timings=_timings(timings),
        )

    async def CaptionAudio(self, request, context):
        bad = Violations()
        source = opts.one_source(bad, audio_path=request.audio_path, audio_url=request.audio_url,
                                 video_path=request.video_path, video_url=request.video_url)
        options = _audio_options(bad, request, "")
        opts.check_model_path(bad, request.model_path, "model_path", self._ctx.settings.model_roots)
        bad.raise_if_any()
        timings = Timings()

        def run() -> AudioResult:
            raw = self._captioning.read(source)
            return self._captioning.caption_audio(raw, source.field, request.model_path, options, timings)

        result = await self._tracked(context, "audio caption", run, progress=False)
        if not result.has_audio:
            raise InvalidInput(source.field, "has no audio track")
        timings.total_seconds = timings.decode_seconds + timings.generate_seconds
        return captioner_pb2.CaptionAudioResponse(caption=result.caption, model_path=result.model_path,
                                                  duration_seconds=result.duration_seconds,
                                                  sample_rate=result.sample_rate, timings=_timings(timings))

    async def UnloadCaptionModel(self, request, context):
        freed = await self._thread.run(self._captioning.unload_vision)
        return captioner_pb2.UnloadCaptionModelResponse(report=self._ctx.memory_report(freed))

    async def UnloadAudioModel(self, request, context):
        freed = await self._thread.run(self._captioning.unload_audio)
        return captioner_pb2.UnloadAudioModelResponse(report=self._ctx.memory_report(freed))


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    captioner_pb2_grpc.add_CaptionerServiceServicer_to_server(CaptionerServicer(ctx), server)
    return [captioner_pb2.DESCRIPTOR.services_by_name["CaptionerService"].full_name]
