"""What the captioner's routes do, on any replica: check the request, run it on the one model
thread, and publish its progress and outcome as events under the request's id (the gateway's
x-request-id), so a client can follow a long caption from the events stream."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from loramesh.v1.events_pb2 import EVENT_KIND_PROGRESS, EVENT_KIND_STATUS
from services.captioner import requests
from services.captioner.captioning import AudioResult, BatchResult, Captioning, CaptionResult, Timings
from services.common import bus, logs
from services.common.bus import EventPublisher
from services.common.model_thread import ModelThread
from services.common.residency import Freed, Residency
from services.common.settings import Settings

log = logs.get(__name__)


class CaptionerAPI:
    def __init__(self, settings: Settings, residency: Residency, events: EventPublisher):
        self.settings = settings
        self.events = events
        self.captioning = Captioning(settings, residency)
        self.thread = ModelThread("captioner-models")  # every model call runs here

    async def caption(self, request_id: str, fields: Mapping[str, Any]) -> CaptionResult:
        job = requests.caption_job(fields, self.settings)
        return await self._tracked(request_id, "caption", self.captioning.caption, job)

    async def caption_batch(self, request_id: str, fields: Mapping[str, Any]) -> BatchResult:
        job = requests.batch_job(fields, self.settings)
        return await self._tracked(request_id, "caption batch", self.captioning.caption_batch, job)

    async def caption_audio(self, request_id: str, fields: Mapping[str, Any]) -> tuple[AudioResult, Timings]:
        job = requests.audio_job(fields, self.settings)
        return await self._tracked(request_id, "audio caption", self.captioning.caption_audio_file, job,
                                   progress=False)

    async def unload_vision(self) -> list[Freed]:
        return await self.thread.run(self.captioning.unload_vision)

    async def unload_audio(self) -> list[Freed]:
        return await self.thread.run(self.captioning.unload_audio)

    async def _tracked(self, request_id: str, what: str, fn, job, *, progress: bool = True):
        """Runs `fn(job)` with progress events after each batch, and a status event when it
        ends or fails."""
        loop = asyncio.get_running_loop()
        events = self.events

        def on_batch(done: int, total: int) -> None:
            data = {"done": done, "total": total, "message": f"{what}: {done}/{total} images captioned"}
            loop.call_soon_threadsafe(asyncio.ensure_future, events.publish(request_id, EVENT_KIND_PROGRESS, data))

        async def status(data: dict) -> None:
            # The caption is the answer; its status event is news for watchers, so a NATS
            # outage costs the event, not the caption.
            try:
                await events.publish(request_id, EVENT_KIND_STATUS, data)
            except bus.NATS_UNREACHABLE_ERRORS as exc:
                log.warning("status event not published", error=type(exc).__name__)

        try:
            result = await self.thread.run(fn, job, **({"on_batch": on_batch} if progress else {}))
        except Exception as exc:
            await status({"status": "failed", "message": what, "error": str(exc)})
            raise
        await status({"status": "completed", "message": what})
        return result
