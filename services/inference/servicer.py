"""gRPC layer of the inference service: each RPC converts its request to one call of
`InferenceAPI` and the answer back to protos, for both APIs (async v1 and generation
server). Upscaling, video, downloads, previews and the LLM helpers are not
served yet and answer UNIMPLEMENTED (see wiring.py)."""

from __future__ import annotations

from urllib.parse import unquote

from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

from loramesh.v1 import inference_pb2, inference_pb2_grpc
from services.common import bus
from services.common.architectures import COMPONENT_FIELDS
from services.common.jobs import iso_time
from services.inference.api import CANCELLED, COMPLETED, FAILED, PENDING, PROCESSING, InferenceAPI, JobRecord, LoadPlan


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


def _components(plan: LoadPlan | None) -> inference_pb2.LoadedComponents:
    """Every component slot of the loaded model (null when not given); empty with no model."""
    if plan is None:
        return inference_pb2.LoadedComponents()
    return inference_pb2.LoadedComponents(**{name: _value(plan.components.get(name)) for name in COMPONENT_FIELDS})


def job_fields(r: JobRecord) -> dict:
    """The documented Job object's fields (GET /queue, GET /queue/{id})."""
    fields = dict(job_id=r.job_id, type=r.type, status=r.status, created_at=iso_time(r.created_at),
                  outputs=list(r.outputs), progress=inference_pb2.JobProgress(**vars(r.current_progress)),
                  params=_struct(r.spec.params))
    if r.started_at is not None:
        fields["started_at"] = iso_time(r.started_at)
    if r.completed_at is not None and r.status in (COMPLETED, FAILED):
        fields["completed_at"] = iso_time(r.completed_at)
    if r.error:
        fields["error"] = r.error
    return fields


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, api: InferenceAPI):
        self._api = api

    # ---- async v1 API ------------------------------------------------------------------

    async def CreateInference(self, request, context):
        record = await self._api.submit_v1(_request_dict(request))
        status_url, result_url = self._api.request_urls(record.job_id)
        return inference_pb2.CreateInferenceResponse(
            request_id=record.job_id, status="queued", status_url=status_url, result_url=result_url,
            created_at=iso_time(record.created_at).replace(".000Z", "Z"))

    async def GetRequestStatus(self, request, context):
        r = await self._api.job(request.request_id)
        return inference_pb2.GetRequestStatusResponse(
            request_id=r.job_id, status=r.v1_status, created_at=iso_time(r.created_at),
            started_at=_value(iso_time(r.started_at)), finished_at=_value(iso_time(r.completed_at) if r.is_final else None),
            error=_value(r.error))

    async def GetRequestResult(self, request, context):
        r = await self._api.job(request.request_id)
        outputs = inference_pb2.InferenceOutputs()
        if r.status == COMPLETED:
            for info in r.output_info:
                outputs.images.add(format=info.format, width=info.width, height=info.height,
                                   file_path=info.file_path, seed=float(info.seed))
        return inference_pb2.GetRequestResultResponse(
            request_id=r.job_id, status=r.v1_status, outputs=outputs, error=_value(r.error),
            created_at=iso_time(r.created_at), finished_at=_value(iso_time(r.completed_at) if r.is_final else None),
            metadata=_struct({"timings": r.timings} if r.timings else {}))

    async def CancelRequest(self, request, context):
        r = await self._api.cancel_any(request.request_id)
        if r.status == CANCELLED:
            message = "canceled before it started" if r.started_at is None else "canceled while running"
        elif r.status == PROCESSING:
            message = "cancel requested; the request stops at its next step"
        else:
            message = f"already {r.v1_status}; nothing changed"
        return inference_pb2.CancelRequestResponse(request_id=r.job_id, status=r.v1_status,
                                                   message=message)

    async def ListCatalogModels(self, request, context):
        models = []
        for m in self._api.catalog():
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
        plan = state.plan
        return inference_pb2.GetHealthResponse(
            status="ok", model_loaded=plan is not None, model_loading=state.loading,
            loading_model_name=_value(state.loading_model_name if state.loading else None),
            last_error=_value(state.last_error),
            model_name=_value(plan and plan.model_name), model_type=_value(plan and plan.model_type),
            model_architecture=_value(plan and plan.architecture), loaded_components=_components(plan),
            upscaler_loaded=False, upscaler_name=_value(None))

    async def ListModels(self, request, context):
        given = {name: getattr(request, name) for name in ("type", "extension", "search", "name")
                 if request.HasField(name)}
        listing = await self._api.list_models(given.get("type"), given.get("extension"),
                                              given.get("search", given.get("name")))
        plan = listing.loaded
        response = inference_pb2.ListModelsResponse(
            loaded_model=_value(plan and plan.model_name), loaded_model_type=_value(plan and plan.model_type))
        for type_, key in self._api.list_keys().items():
            target = getattr(response, key)
            for f, digest in listing.files.get(key, []):
                entry = target.add(name=f.name, type=f.type, file_extension=f.file_extension,
                                   size_bytes=float(f.size_bytes), hash=_value(digest))
                if type_ in ("checkpoint", "diffusion"):
                    entry.is_loaded = bool(plan and plan.model_name == f.name and plan.model_type == type_)
        if given:
            for name, value in listing.filters.items():
                setattr(response.applied_filters, name, value)
        return response

    async def LoadModel(self, request, context):
        body = _request_dict(request)
        plan = await self._api.load_model(body)
        return inference_pb2.LoadModelResponse(
            success=True, message="Model loaded successfully", model_name=plan.model_name,
            model_type=plan.model_type, loaded_components=_components(plan))

    async def UnloadModel(self, request, context):
        await self._api.unload_model()
        return inference_pb2.UnloadModelResponse(success=True, message="Model unloaded")

    async def GetModelHash(self, request, context):
        name = unquote(request.model_name)
        digest = await self._api.model_hash(request.model_type, name)
        return inference_pb2.GetModelHashResponse(model_name=name, model_type=request.model_type, hash=digest)

    async def GetModelPaths(self, request, context):
        folders = {t: str(path) for t, path in self._api.model_paths().items()}
        return inference_pb2.GetModelPathsResponse(
            checkpoints=folders["checkpoint"], diffusion_models=folders["diffusion"], vae=folders["vae"],
            lora=folders["lora"], clip=folders["clip"], t5=folders["t5"], embeddings=folders["embedding"],
            controlnet=folders["controlnet"], llm=folders["llm"], esrgan=folders["esrgan"], taesd=folders["taesd"])

    # ---- generation server: jobs -------------------------------------------------------

    async def Txt2Img(self, request, context):
        record, position = await self._api.submit_server("txt2img", _request_dict(request))
        await _accepted(context)
        return inference_pb2.Txt2ImgResponse(job_id=record.job_id, status=record.status, position=position)

    async def Img2Img(self, request, context):
        record, position = await self._api.submit_server("img2img", _request_dict(request))
        await _accepted(context)
        return inference_pb2.Img2ImgResponse(job_id=record.job_id, status=record.status, position=position)

    async def Txt2Vid(self, request, context):
        record, position = await self._api.submit_txt2vid(_request_dict(request))
        await _accepted(context)
        return inference_pb2.Txt2VidResponse(job_id=record.job_id, status=record.status, position=position)

    async def ConvertModel(self, request, context):
        record, position = await self._api.submit_convert(_request_dict(request))
        await _accepted(context)
        return inference_pb2.ConvertModelResponse(job_id=record.job_id, status=record.status, position=position,
                                                  output_path=record.spec.params["output_path"])

    async def ListQueue(self, request, context):
        page = await self._api.queue(*(getattr(request, name) if request.HasField(name) else None
                                       for name in ("status", "limit", "offset")))
        counts = page.counts
        return inference_pb2.ListQueueResponse(
            pending_count=counts[PENDING], processing_count=counts[PROCESSING],
            completed_count=counts[COMPLETED], failed_count=counts[FAILED], total_count=page.total,
            items=[inference_pb2.Job(**job_fields(r)) for r in page.items])

    async def GetJob(self, request, context):
        return inference_pb2.GetJobResponse(**job_fields(await self._api.job(request.job_id)))

    async def CancelJob(self, request, context):
        await self._api.cancel_pending(request.job_id)
        return inference_pb2.CancelJobResponse(success=True, message="Job cancelled")

    async def StreamJobEvents(self, request, context):
        async for event in self._api.job_events(request.job_id):
            if event.kind in bus.JOB_EVENT_KINDS:
                yield inference_pb2.StreamJobEventsResponse(
                    event=bus.client_event_name("inference", event.kind), timestamp=event.time.ToJsonString(),
                    data=event.data)

    # ---- generation server: outputs, options, architectures ----------------------------

    async def BrowseOutput(self, request, context):
        # The gateway passes reserved characters of path captures (%2F) still encoded.
        content_type, chunks = await self._api.browse(unquote(request.path),
                                                      request.sort if request.HasField("sort") else None,
                                                      request.order if request.HasField("order") else None)
        async for chunk in chunks:
            # The gateway takes the content type of the first message.
            yield httpbody_pb2.HttpBody(content_type=content_type, data=chunk)
            content_type = ""

    async def GetThumbnail(self, request, context):
        content_type, body = await self._api.thumbnail(unquote(request.path))
        return httpbody_pb2.HttpBody(content_type=content_type, data=body)

    async def GetOptions(self, request, context):
        options = self._api.options()
        return inference_pb2.GetOptionsResponse(
            samplers=list(options.samplers), schedulers=list(options.schedulers),
            quantization_types=[inference_pb2.QuantizationType(id=i, name=n, bits=b)
                                for i, n, b in options.quantization_types])

    async def ListArchitectures(self, request, context):
        presets, current = await self._api.architecture_presets()
        response = inference_pb2.ListArchitecturesResponse(architectures=_struct(presets))
        if current is not None:
            response.current_architecture = current.preset
            response.current_preset.update(current.preset_entry)
        return response


BUILT_METHODS = frozenset({
    "CreateInference", "GetRequestStatus", "GetRequestResult", "CancelRequest", "ListCatalogModels",
    "GetHealth", "ListModels", "LoadModel", "UnloadModel", "GetModelHash", "GetModelPaths", "Txt2Img", "Img2Img",
    "ListQueue", "GetJob", "CancelJob", "StreamJobEvents", "BrowseOutput", "GetThumbnail", "GetOptions",
    "ListArchitectures", "ConvertModel", "Txt2Vid",
})
