"""Builds the inference service inside a running process: the job store, the pipeline host
and the model thread they share, the worker that takes jobs off the queue, the API object
and its servicer; and hooks them into start-up, shutdown and /vram/free."""

from __future__ import annotations

import grpc

from loramesh.v1 import inference_pb2
from services.common.devices import device_and_dtype
from services.common.model_thread import ModelThread
from services.common.server import ServiceContext
from services.common.unimplemented import generic_handler
from services.inference import assistant, jobs
from services.inference.api import InferenceAPI
from services.inference.jobs import JobStore
from services.inference.pipelines import PipelineHost, resolve_model_classes
from services.inference.servicer import BUILT_METHODS, InferenceServicer
from services.inference.upscaling import UpscalerHost
from services.inference.worker import Worker


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
        worker.start()

    ctx.free_memory = api.free_memory
    ctx.on_start.append(start)
    ctx.on_reconnect.append(store.setup)
    ctx.on_reconnect.append(setup_llm)
    ctx.on_shutdown.append(worker.stop)
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    servicer = InferenceServicer(api, enhancer, helper)
    server.add_generic_rpc_handlers((generic_handler(service, "inference", servicer, BUILT_METHODS),))
    return [service.full_name]
