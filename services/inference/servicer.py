"""gRPC layer of the inference service: each RPC converts its request to one call of
`InferenceAPI` (for /ollama and /assistant, of assistant.py's `PromptEnhancer` and
`Assistant`) and the answer back to protos, for both APIs (async v1 and generation
server)."""

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
    def __init__(self, api: InferenceAPI, enhancer, assistant):
        self._api = api
        # The /ollama and /assistant routes' objects (assistant.py: PromptEnhancer, Assistant).
        self._enhancer = enhancer
        self._assistant = assistant

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
                if info.num_frames is not None:
                    outputs.videos.add(format=info.format, width=info.width, height=info.height,
                                       num_frames=info.num_frames, fps=info.fps, file_path=info.file_path,
                                       seed=float(info.seed))
                    continue
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
        upscaler = await self._api.upscaler()
        plan = state.plan
        return inference_pb2.GetHealthResponse(
            status="ok", model_loaded=plan is not None, model_loading=state.loading,
            loading_model_name=_value(state.loading_model_name if state.loading else None),
            last_error=_value(state.last_error),
            model_name=_value(plan and plan.model_name), model_type=_value(plan and plan.model_type),
            model_architecture=_value(plan and plan.architecture), loaded_components=_components(plan),
            upscaler_loaded=upscaler is not None, upscaler_name=_value(upscaler and upscaler.model_name))

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

    async def Upscale(self, request, context):
        record, position = await self._api.submit_upscale(_request_dict(request))
        await _accepted(context)
        return inference_pb2.UpscaleResponse(job_id=record.job_id, status=record.status, position=position)

    async def LoadUpscaler(self, request, context):
        plan = await self._api.load_upscaler(_request_dict(request))
        return inference_pb2.LoadUpscalerResponse(success=True, message="Upscaler loaded successfully",
                                                   model_name=plan.model_name, upscale_factor=plan.scale)

    async def UnloadUpscaler(self, request, context):
        await self._api.unload_upscaler()
        return inference_pb2.UnloadUpscalerResponse(success=True, message="Upscaler unloaded")

    async def GetPreviewSettings(self, request, context):
        return inference_pb2.GetPreviewSettingsResponse(**(await self._api.preview_settings()).to_json())

    async def UpdatePreviewSettings(self, request, context):
        settings = await self._api.update_preview_settings(_request_dict(request))
        return inference_pb2.UpdatePreviewSettingsResponse(
            success=True, settings=inference_pb2.PreviewSettings(**settings.to_json()))

    async def ConvertModel(self, request, context):
        record, position = await self._api.submit_convert(_request_dict(request))
        await _accepted(context)
        return inference_pb2.ConvertModelResponse(job_id=record.job_id, status=record.status, position=position,
                                                  output_path=record.spec.params["output_path"])

    async def DownloadModel(self, request, context):
        download, hashing, position = await self._api.submit_download(_request_dict(request))
        plan = download.spec.download
        await _accepted(context)
        return inference_pb2.DownloadModelResponse(success=True, download_job_id=download.job_id,
                                                   hash_job_id=hashing.job_id, source=plan.source,
                                                   model_type=plan.model_type, position=position)

    async def GetCivitaiModel(self, request, context):
        info = await self._api.civitai_model(unquote(request.id))
        return inference_pb2.GetCivitaiModelResponse(success=True, **{**vars(info), "file_size": float(info.file_size)})

    async def GetHuggingfaceModel(self, request, context):
        info = await self._api.huggingface_file(request.repo_id, request.filename,
                                                request.revision if request.HasField("revision") else None)
        return inference_pb2.GetHuggingfaceModelResponse(
            success=True, repo_id=info.repo_id, filename=info.filename, revision=info.revision,
            file_size=float(info.file_size), download_url=info.download_url)

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
                    event=bus.client_event_name("inference", event.kind), timestamp=bus.client_timestamp(event.time),
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

    # ---- generation server: Ollama prompt enhancement and the UI assistant --------------

    async def EnhancePrompt(self, request, context):
        entry = await self._enhancer.enhance(
            request.prompt, request.system_prompt if request.HasField("system_prompt") else None)
        fields = entry.fields()
        return inference_pb2.EnhancePromptResponse(
            success=True, id=entry.id, original_prompt=entry.original_prompt, enhanced_prompt=entry.enhanced_prompt,
            model_used=entry.model_used, created_at=fields["created_at"])

    async def ListEnhanceHistory(self, request, context):
        page = await self._enhancer.history(*(getattr(request, name) if request.HasField(name) else None
                                              for name in ("limit", "offset")))
        return inference_pb2.ListEnhanceHistoryResponse(
            total_count=page.total_count, items=[inference_pb2.EnhanceHistoryEntry(**e.fields()) for e in page.items])

    async def GetEnhanceHistoryEntry(self, request, context):
        return inference_pb2.GetEnhanceHistoryEntryResponse(**(await self._enhancer.entry(request.id)).fields())

    async def DeleteEnhanceHistoryEntry(self, request, context):
        await self._enhancer.delete(request.id)
        return inference_pb2.DeleteEnhanceHistoryEntryResponse(success=True)

    async def ClearEnhanceHistory(self, request, context):
        await self._enhancer.clear()
        return inference_pb2.ClearEnhanceHistoryResponse(success=True)

    async def GetOllamaStatus(self, request, context):
        status = await self._enhancer.status()
        s = status.settings
        return inference_pb2.GetOllamaStatusResponse(
            enabled=status.enabled, connected=status.connected, base_url=s.base_url, model=s.model,
            max_history=s.max_history, history_count=status.history_count)

    async def ListOllamaModels(self, request, context):
        return inference_pb2.ListOllamaModelsResponse(models=await self._enhancer.models())

    async def GetOllamaSettings(self, request, context):
        return inference_pb2.GetOllamaSettingsResponse(**(await self._enhancer.settings()).public())

    async def UpdateOllamaSettings(self, request, context):
        settings = await self._enhancer.update_settings(_request_dict(request))
        return inference_pb2.UpdateOllamaSettingsResponse(
            success=True, settings=inference_pb2.LlmSettings(**settings.public()))

    async def AssistantChat(self, request, context):
        reply = await self._assistant.chat(
            request.message, json_format.MessageToDict(request.context) if request.HasField("context") else None)
        return inference_pb2.AssistantChatResponse(
            success=True, message=reply.message,
            actions=[inference_pb2.AssistantAction(type=a.type, parameters=_struct(a.parameters))
                     for a in reply.actions])

    async def GetAssistantHistory(self, request, context):
        messages = await self._assistant.history()
        return inference_pb2.GetAssistantHistoryResponse(
            messages=[inference_pb2.AssistantMessage(role=m.role, content=m.content, timestamp=int(m.timestamp))
                      for m in messages], count=len(messages))

    async def ClearAssistantHistory(self, request, context):
        await self._assistant.clear()
        return inference_pb2.ClearAssistantHistoryResponse(success=True)

    async def GetAssistantStatus(self, request, context):
        status = await self._assistant.status()
        s = status.settings
        return inference_pb2.GetAssistantStatusResponse(
            enabled=status.enabled, connected=status.connected, base_url=s.base_url, model=s.model,
            timeout_seconds=s.timeout_seconds, history_count=status.history_count)

    async def GetAssistantSettings(self, request, context):
        return inference_pb2.GetAssistantSettingsResponse(**(await self._assistant.settings()).public())

    async def UpdateAssistantSettings(self, request, context):
        settings = await self._assistant.update_settings(_request_dict(request))
        return inference_pb2.UpdateAssistantSettingsResponse(
            success=True, settings=inference_pb2.LlmSettings(**settings.public()))

