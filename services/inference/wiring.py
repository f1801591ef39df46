"""Builds the inference service inside a running process: the job store, the pipeline host
and the model thread they share, the worker that takes jobs off the queue, the API object
and its servicer; and hooks them into start-up, shutdown and /vram/free."""

from __future__ import annotations

import asyncio

import grpc
import nats.errors

from loramesh.v1 import inference_pb2, inference_pb2_grpc
from services.common import logs
from services.common.devices import device_and_dtype
from services.common.model_thread import ModelThread
from services.common.server import ServiceContext
from services.inference import assistant, jobs
from services.inference.api import InferenceAPI
from services.inference.jobs import JobStore
from services.inference.pipelines import PipelineHost, resolve_model_classes
from services.inference.servicer import InferenceServicer
from services.inference.upscaling import UpscalerHost
from services.inference.worker import Worker

log = logs.get(__name__)


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    settings = ctx.settings
    resolve_model_classes()
    store = JobStore(ctx.nats, ack_wait=settings.inference.ack_wait_s, history_s=settings.inference.history_s)
    host = PipelineHost(*device_and_dtype(settings.device), ctx.residency)
    thread = ModelThread("inference")  # loads and generation share the device, one at a time
    upscalers = UpscalerHost(*device_and_dtype(settings.device), ctx.residency)
    worker = Worker(settings, store, ctx.events, host, thread, upscalers)
    api = InferenceAPI(settings, store, ctx.events, host, thread, upscalers)
    llm_settings = assistant.SettingsStore(ctx.nats.jetstream(), {assistant.OLLAMA: settings.ollama,
                                                                  assistant.ASSISTANT: settings.assistant})
    enhancer = assistant.PromptEnhancer(llm_settings, assistant.EnhancementStore(ctx.nats, ack_wait=0))
    helper = assistant.Assistant(llm_settings, assistant.ChatStore(ctx.nats, ack_wait=0), api.root)

    async def setup_llm() -> None:
        await llm_settings.setup()
        await enhancer.setup()
        await helper.setup()

    async def start() -> None:
        await store.setup()
        await setup_llm()

        async def on_unload(_msg) -> None:
            await api.drop_pipeline()

        await ctx.nats.subscribe(jobs.UNLOAD_SUBJECT, cb=on_unload)

        async def on_unload_upscaler(_msg) -> None:
            await api.drop_upscaler()

        await ctx.nats.subscribe(jobs.UNLOAD_UPSCALER_SUBJECT, cb=on_unload_upscaler)
        loop = asyncio.get_running_loop()

        def announce(kind: int, data: dict) -> None:  # on the model thread
            ctx.events.publish_from_thread(loop, data["model_name"], kind, {**data, "replica": settings.replica})

        host.announce = upscalers.announce = announce
        worker.start()
        if settings.inference.status_interval_s:
            status_task.append(loop.create_task(publish_status()))

    status_task: list[asyncio.Task] = []

    def replica_status() -> dict:
        # Off the event loop: a load in progress holds the hosts' and residency's locks.
        model, upscaler = host.resident(), upscalers.resident()
        return {"service": "inference", "replica": settings.replica, "model_loaded": model is not None,
                "model_name": model[0] if model else None, "model_architecture": model[1] if model else None,
                "upscaler_loaded": upscaler is not None, "upscaler_name": upscaler,
                "current_job_id": worker.current_job_id, "resident_bytes": ctx.residency.total_bytes}

    async def publish_status() -> None:
        """This replica's server_status, every LORAMESH_STATUS_INTERVAL_S."""
        while True:
            try:
                await ctx.events.publish_status(settings.replica, await asyncio.to_thread(replica_status))
            except nats.errors.Error:
                pass  # NATS away: the next one goes out once it is back
            except Exception:
                log.exception("server_status failed")
            await asyncio.sleep(settings.inference.status_interval_s)

    async def stop_status() -> None:
        for task in status_task:
            task.cancel()

    ctx.free_memory = api.free_memory
    ctx.on_start.append(start)
    ctx.on_reconnect.append(store.setup)
    ctx.on_reconnect.append(setup_llm)
    ctx.on_shutdown.append(worker.stop)
    ctx.on_shutdown.append(stop_status)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(api, enhancer, helper), server)
    return [inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]
