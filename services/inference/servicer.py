"""gRPC layer of the inference service: converts requests and job records to and from
protos for both APIs (async v1 and generation server). Upscaling, video, conversion,
downloads, previews and the LLM helpers are not served yet and answer UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

from loramesh.v1 import inference_pb2, inference_pb2_grpc
from services.common import bus, logs
from services.common.model_thread import ModelThread
from services.common.server import ServiceContext
from services.common.unimplemented import generic_handler
from services.inference import catalog, jobs, output_browser, samplers
from services.inference.api import InferenceAPI
from services.inference.jobs import JobRecord, JobStore
from services.inference.model_files import LIST_KEYS, MODEL_TYPES
from services.inference.model_loading import ARCHITECTURE_PRESETS, preset_name
from services.inference.pipelines import PipelineHost
from services.inference.worker import Worker, device_and_dtype, iso

log = logs.get(__name__)

QUANTIZATION_TYPES = [
    ("f32", "F32 (32-bit float)", 32), ("f16", "F16 (16-bit float)", 16), ("bf16", "BF16 (Brain float 16)", 16),
    ("q8_0", "Q8_0 (8-bit)", 8), ("q5_0", "Q5_0 (5-bit)", 5), ("q5_1", "Q5_1 (5-bit)", 5), ("q4_0", "Q4_0 (4-bit)", 4),
    ("q4_1", "Q4_1 (4-bit)", 4), ("q4_k", "Q4_K (4-bit K-quant)", 4), ("q5_k", "Q5_K (5-bit K-quant)", 5),
    ("q6_k", "Q6_K (6-bit K-quant)", 6), ("q8_k", "Q8_K (8-bit K-quant)", 8), ("q3_k", "Q3_K (3-bit K-quant)", 3),
    ("q2_k", "Q2_K (2-bit K-quant)", 2),
]
COMPONENTS = ("vae", "clip_l", "clip_g", "t5xxl", "controlnet", "llm", "llm_vision")


def _value(text: str | None) -> struct_pb2.Value:
    """A string, or null when absent (documented `string|null` fields)."""
    value = struct_pb2.Value()
    if text is None:
        value.null_value = struct_pb2.NULL_VALUE
    else:
        value.string_value = text
    return value


def _struct(data: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


def _request_dict(request) -> dict:
    return json_format.MessageToDict(request, preserving_proto_field_name=True)


async def _accepted(context) -> None:
    await context.send_initial_metadata((("x-http-status", "202"),))


def _components(plan: dict | None) -> inference_pb2.LoadedComponents:
    if plan is None:
        return inference_pb2.LoadedComponents()
    given = plan.get("components") or {}
    return inference_pb2.LoadedComponents(**{name: _value(given.get(name)) for name in COMPONENTS})


def job_fields(r: JobRecord) -> dict:
    """The documented Job object's fields (GET /queue, GET /queue/{id})."""
    fields = dict(job_id=r.job_id, type=r.type, status=r.status, created_at=iso(r.created_at),
                  outputs=list(r.outputs), progress=inference_pb2.JobProgress(**_progress(r)),
                  params=_struct(r.params))
    if r.started_at is not None:
        fields["started_at"] = iso(r.started_at)
    if r.completed_at is not None and r.status in (jobs.COMPLETED, jobs.FAILED):
        fields["completed_at"] = iso(r.completed_at)
    if r.error:
        fields["error"] = r.error
    return fields


def _progress(r: JobRecord) -> dict:
    if r.progress:
        return r.progress
    images = len(r.spec["images"])
    steps = r.spec["images"][0]["steps"] if images else 0
    return {"step": 0, "total_steps": steps, "current_image": 0, "total_images": images,
            "all_steps": steps * images, "current_all_steps": 0, "percentage": 0.0}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, api: InferenceAPI):
        self._api = api
        self._settings = api.settings

    # ---- async v1 API ------------------------------------------------------------------

    async def CreateInference(self, request, context):
        record = await self._api.submit_v1(_request_dict(request))
        base = f"{self._settings.inference.public_base_url}/v1/requests/{record.job_id}"
        return inference_pb2.CreateInferenceResponse(
            request_id=record.job_id, status="queued", status_url=f"{base}/status", result_url=f"{base}/result",
            created_at=iso(record.created_at).replace(".000Z", "Z"))

    async def GetRequestStatus(self, request, context):
        r = await self._api.job(request.request_id)
        return inference_pb2.GetRequestStatusResponse(
            request_id=r.job_id, status=jobs.V1_STATUS[r.status], created_at=iso(r.created_at),
            started_at=_value(iso(r.started_at)), finished_at=_value(iso(r.completed_at) if r.is_final else None),
            error=_value(r.error))

    async def GetRequestResult(self, request, context):
        r = await self._api.job(request.request_id)
        outputs = inference_pb2.InferenceOutputs()
        if r.status == jobs.COMPLETED:
            for info in r.output_info:
                outputs.images.add(format=info["format"], width=info["width"], height=info["height"],
                                   file_path=info["file_path"], seed=float(info["seed"]))
        return inference_pb2.GetRequestResultResponse(
            request_id=r.job_id, status=jobs.V1_STATUS[r.status], outputs=outputs, error=_value(r.error),
            created_at=iso(r.created_at), finished_at=_value(iso(r.completed_at) if r.is_final else None),
            metadata=_struct({"timings": r.timings} if r.timings else {}))

    async def CancelRequest(self, request, context):
        r = await self._api.cancel_any(request.request_id)
        if r.status == jobs.CANCELLED:
            message = "canceled before it started" if r.started_at is None else "canceled while running"
        elif r.status == jobs.PROCESSING:
            message = "cancel requested; the request stops at its next step"
        else:
            message = f"already {jobs.V1_STATUS[r.status]}; nothing changed"
        return inference_pb2.CancelRequestResponse(request_id=r.job_id, status=jobs.V1_STATUS[r.status],
                                                   message=message)

    async def ListCatalogModels(self, request, context):
        models = []
        for m in catalog.CATALOG.values():
            model = inference_pb2.CatalogModel(
                id=m.id, base_model=m.base_model, resolution_divisor=m.resolution_divisor,
                default_steps=m.default_steps, default_guidance_scale=m.default_guidance_scale,
                requires_control_image=m.requires_control_image, is_video_model=m.is_video_model)
            if m.default_num_frames is not None:
                model.default_num_frames = m.default_num_frames
            if m.default_fps is not None:
                model.default_fps = m.default_fps
            models.append(model)
        return inference_pb2.ListCatalogModelsResponse(models=models)

    # ---- generation server: health and models ------------------------------------------

    async def GetHealth(self, request, context):
        state = await self._api.model_state()
        plan = state.get("plan")
        return inference_pb2.GetHealthResponse(
            status="ok", model_loaded=plan is not None, model_loading=bool(state.get("loading")),
            loading_model_name=_value(state.get("loading_model_name") if state.get("loading") else None),
            last_error=_value(state.get("last_error")),
            model_name=_value(plan and plan["model_name"]), model_type=_value(plan and plan["model_type"]),
            model_architecture=_value(plan and plan["architecture"]), loaded_components=_components(plan),
            upscaler_loaded=False, upscaler_name=_value(None))

    async def ListModels(self, request, context):
        filters = {name: getattr(request, name) for name in ("type", "extension", "search", "name")
                   if request.HasField(name)}
        search = filters.get("search", filters.get("name"))
        listing = await self._api.list_models(filters.get("type"), filters.get("extension"), search)
        plan = (await self._api.model_state()).get("plan")
        response = inference_pb2.ListModelsResponse(
            loaded_model=_value(plan and plan["model_name"]), loaded_model_type=_value(plan and plan["model_type"]))
        for type_, key in LIST_KEYS.items():
            target = getattr(response, key)
            for f, digest in listing.get(key, []):
                entry = target.add(name=f.name, type=f.type, file_extension=f.file_extension,
                                   size_bytes=float(f.size_bytes), hash=_value(digest))
                if type_ in ("checkpoint", "diffusion"):
                    entry.is_loaded = bool(plan and plan["model_name"] == f.name and plan["model_type"] == type_)
        if filters:
            applied = response.applied_filters
            for name in ("type", "extension"):
                if name in filters:
                    setattr(applied, name, filters[name])
            if search is not None:
                applied.search = search
        return response

    async def LoadModel(self, request, context):
        body = _request_dict(request)
        plan = await self._api.load_model(body)
        return inference_pb2.LoadModelResponse(
            success=True, message="Model loaded successfully", model_name=plan.model_name,
            model_type=plan.model_type, loaded_components=_components(plan.to_json()))

    async def UnloadModel(self, request, context):
        await self._api.unload_model()
        return inference_pb2.UnloadModelResponse(success=True, message="Model unloaded")

    async def GetModelHash(self, request, context):
        name = unquote(request.model_name)
        digest = await self._api.model_hash(request.model_type, name)
        return inference_pb2.GetModelHashResponse(model_name=name, model_type=request.model_type, hash=digest)

    async def GetModelPaths(self, request, context):
        root = self._settings.inference.models_dir
        folders = {t: str(root / folder) for t, folder in MODEL_TYPES.items()}
        return inference_pb2.GetModelPathsResponse(
            checkpoints=folders["checkpoint"], diffusion_models=folders["diffusion"], vae=folders["vae"],
            lora=folders["lora"], clip=folders["clip"], t5=folders["t5"], embeddings=folders["embedding"],
            controlnet=folders["controlnet"], llm=folders["llm"], esrgan=folders["esrgan"], taesd=folders["taesd"])

    # ---- generation server: jobs -------------------------------------------------------

    async def Txt2Img(self, request, context):
        record, position = await self._api.submit_server("txt2img", _request_dict(request))
        await _accepted(context)
        return inference_pb2.Txt2ImgResponse(job_id=record.job_id, status=jobs.PENDING, position=position)

    async def Img2Img(self, request, context):
        record, position = await self._api.submit_server("img2img", _request_dict(request))
        await _accepted(context)
        return inference_pb2.Img2ImgResponse(job_id=record.job_id, status=jobs.PENDING, position=position)

    async def ListQueue(self, request, context):
        records = await self._api.queue()
        counts = {status: sum(1 for r in records if r.status == status) for status in
                  (jobs.PENDING, jobs.PROCESSING, jobs.COMPLETED, jobs.FAILED)}
        return inference_pb2.ListQueueResponse(
            pending_count=counts[jobs.PENDING], processing_count=counts[jobs.PROCESSING],
            completed_count=counts[jobs.COMPLETED], failed_count=counts[jobs.FAILED], total_count=len(records),
            items=[inference_pb2.Job(**job_fields(r)) for r in records])

    async def GetJob(self, request, context):
        return inference_pb2.GetJobResponse(**job_fields(await self._api.job(request.job_id)))

    async def CancelJob(self, request, context):
        await self._api.cancel_pending(request.job_id)
        return inference_pb2.CancelJobResponse(success=True, message="Job cancelled")

    async def StreamJobEvents(self, request, context):
        async for event in self._api.job_events(request.job_id):
            if event.kind in bus.JOB_EVENT_NAMES:
                yield inference_pb2.StreamJobEventsResponse(
                    event=bus.JOB_EVENT_NAMES[event.kind], timestamp=event.time.ToJsonString(), data=event.data)

    # ---- generation server: outputs, options, architectures ----------------------------

    async def BrowseOutput(self, request, context):
        content_type, body = await asyncio.to_thread(
            # The gateway passes reserved characters of path captures (%2F) still encoded.
            output_browser.browse, self._settings.inference.output_dir, unquote(request.path),
            request.sort if request.HasField("sort") else None, request.order if request.HasField("order") else None)
        return httpbody_pb2.HttpBody(content_type=content_type, data=body)

    async def GetThumbnail(self, request, context):
        content_type, body = await asyncio.to_thread(output_browser.thumbnail, self._settings.inference.output_dir,
                                                     unquote(request.path))
        return httpbody_pb2.HttpBody(content_type=content_type, data=body)

    async def GetOptions(self, request, context):
        return inference_pb2.GetOptionsResponse(
            samplers=list(samplers.SAMPLERS), schedulers=list(samplers.SCHEDULERS),
            quantization_types=[inference_pb2.QuantizationType(id=i, name=n, bits=b) for i, n, b in QUANTIZATION_TYPES])

    async def ListArchitectures(self, request, context):
        plan = (await self._api.model_state()).get("plan")
        response = inference_pb2.ListArchitecturesResponse(architectures=_struct(ARCHITECTURE_PRESETS))
        if plan is not None:
            name = preset_name(plan["architecture"])
            response.current_architecture = name
            response.current_preset.update(ARCHITECTURE_PRESETS.get(name, {}))
        return response


BUILT_METHODS = frozenset({
    "CreateInference", "GetRequestStatus", "GetRequestResult", "CancelRequest", "ListCatalogModels",
    "GetHealth", "ListModels", "LoadModel", "UnloadModel", "GetModelHash", "GetModelPaths", "Txt2Img", "Img2Img",
    "ListQueue", "GetJob", "CancelJob", "StreamJobEvents", "BrowseOutput", "GetThumbnail", "GetOptions",
    "ListArchitectures",
})


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    settings = ctx.settings
    store = JobStore(ctx.nats, ack_wait=settings.inference.ack_wait_s, history_s=settings.inference.history_s)
    device, dtype = device_and_dtype(settings)
    host = PipelineHost(device, dtype, ctx.residency)
    thread = ModelThread("inference")  # loads and generation share the device, one at a time
    worker = Worker(settings, store, ctx.events, host, thread)
    api = InferenceAPI(settings, store, ctx.events, host, thread)

    async def start() -> None:
        await store.setup()

        async def on_unload(_msg) -> None:
            await api.drop_pipeline()

        await ctx.nats.subscribe(jobs.UNLOAD_SUBJECT, cb=on_unload)
        worker.start()

    async def free_memory():
        freed = await thread.run(host.unload)
        return [freed] if freed else []

    ctx.free_memory = free_memory
    ctx.on_start.append(start)
    ctx.on_shutdown.append(worker.stop)
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    servicer = InferenceServicer(api)
    server.add_generic_rpc_handlers((generic_handler(service, "inference", servicer, BUILT_METHODS),))
    return [service.full_name]

