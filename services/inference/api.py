"""What the inference routes do, on any replica, for both APIs: submit and cancel jobs
through the shared NATS records, load and unload the generation-server model, list and
hash model files, browse outputs, and say what the server offers. Knows nothing of gRPC:
the servicer maps each RPC to one call here.

The loaded model of the generation-server API is shared state: /models/load records its
plan in NATS, so every replica's /health agrees and every job carries the plan it was
queued with (a worker that has not loaded it yet loads it first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loramesh.v1 import events_pb2
from services.common import architectures, bus, logs
from services.common.bus import EventPublisher
from services.common.errors import InvalidInput, Violations
from services.common.model_thread import ModelThread
from services.common.settings import Settings
from services.inference import catalog, downloads, jobs, output_browser, previews, samplers, submissions, upscaling
from services.inference.catalog import CatalogModel
from services.inference.job_spec import DOWNLOAD, HASH, SERVER_API, UPSCALE, JobSpec, ModelRef
from services.inference.jobs import CANCELLED, COMPLETED, FAILED, PENDING, PROCESSING, JobRecord, JobStore, QueuePage
from services.inference.model_files import LIST_KEYS, MODEL_TYPES, ModelFile, ModelsRoot
from services.inference.model_loading import QUANTIZATION_TYPES, LoadPlan, load_pipeline, plan_load
from services.inference.pipelines import PipelineHost
from services.inference.upscaling import UpscalerHost, UpscalerPlan

log = logs.get(__name__)

# What the servicer reads off records, besides the API object.
__all__ = ["InferenceAPI", "JobRecord", "LoadPlan", "PENDING", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]

MODEL_STATE = "model"
# GET /queue pages hold at most this many items.
MAX_QUEUE_PAGE = 1000


@dataclass
class ModelState:
    """The generation-server model, as every replica sees it."""

    plan: LoadPlan | None = None
    loading: bool = False
    loading_model_name: str | None = None
    last_error: str | None = None

    def to_json(self) -> dict:
        return {"plan": self.plan.to_json() if self.plan else None, "loading": self.loading,
                "loading_model_name": self.loading_model_name, "last_error": self.last_error}

    @classmethod
    def from_json(cls, data: dict | None) -> ModelState:
        data = data or {}
        return cls(plan=LoadPlan.from_json(data["plan"]) if data.get("plan") else None,
                   loading=bool(data.get("loading")), loading_model_name=data.get("loading_model_name"),
                   last_error=data.get("last_error"))


@dataclass
class ModelListing:
    """GET /models: files by list name ("checkpoints", "loras", ...) with their cached hashes."""

    files: dict[str, list[tuple[ModelFile, str | None]]]
    loaded: LoadPlan | None
    filters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    samplers: tuple[str, ...]
    schedulers: tuple[str, ...]
    quantization_types: tuple[tuple[str, str, int], ...]


class InferenceAPI:
    def __init__(self, settings: Settings, store: JobStore, events: EventPublisher, host: PipelineHost,
                 thread: ModelThread, upscalers: UpscalerHost | None = None):
        self.settings = settings
        self.store = store
        self.events = events
        self.host = host
        self.thread = thread
        self.upscalers = upscalers
        self.root = ModelsRoot(settings.inference.models_dir)

    # ---- jobs ---------------------------------------------------------------------------

    async def submit_v1(self, request: dict) -> JobRecord:
        """POST /v1/inference (the request as proto JSON with snake_case names)."""
        submission = await asyncio.to_thread(submissions.parse_v1, request, self.settings)
        record, _ = await self._submit(submission)
        return record

    async def submit_server(self, job_type: str, request: dict) -> tuple[JobRecord, int]:
        """POST /txt2img and /img2img: the job and its queue position."""
        state = await self.model_state()
        submission = await asyncio.to_thread(submissions.parse_server, job_type, request, state.plan, self.root,
                                             self.settings, await self.upscaler())
        return await self._submit(submission)

    async def submit_upscale(self, request: dict) -> tuple[JobRecord, int]:
        """POST /upscale: the upscale job (on the loaded upscaler) and its queue position."""
        spec, params, image = await asyncio.to_thread(upscaling.parse_upscale, request, await self.upscaler(),
                                                      self.settings)
        return await self._submit(submissions.Submission(
            JobSpec(type=UPSCALE, api=SERVER_API, model=ModelRef(), architecture="", images=[], params=params,
                    upscale=spec), {"input": image}))

    async def submit_txt2vid(self, request: dict) -> tuple[JobRecord, int]:
        """POST /txt2vid: the video job and its queue position."""
        state = await self.model_state()
        submission = await asyncio.to_thread(submissions.parse_txt2vid, request, state.plan, self.root, self.settings)
        return await self._submit(submission)

    async def submit_convert(self, request: dict) -> tuple[JobRecord, int]:
        """POST /convert: the conversion job and its queue position."""
        submission = await asyncio.to_thread(submissions.parse_convert, request, self.root)
        return await self._submit(submission)

    async def submit_download(self, request: dict) -> tuple[JobRecord, JobRecord, int]:
        """POST /models/download: the download job, the hash job queued behind it, and the
        download's queue position."""
        plan = await asyncio.to_thread(downloads.plan_download, request, self.root.root, self.settings)
        download, position = await self._submit(submissions.Submission(JobSpec(
            type=DOWNLOAD, api=SERVER_API, model=ModelRef(), architecture="", images=[], params=plan.params,
            download=plan)))
        hashing, _ = await self._submit(submissions.Submission(JobSpec(
            type=HASH, api=SERVER_API, model=ModelRef(), architecture="", images=[],
            params={"download_job_id": download.job_id, "model_type": plan.model_type}, download=plan)))
        return download, hashing, position

    async def civitai_model(self, model_id: str) -> downloads.CivitaiFile:
        """GET /models/civitai/{id}: the model version's file, as CivitAI describes it."""
        return await asyncio.to_thread(downloads.civitai_file, model_id, self.settings)

    async def huggingface_file(self, repo_id: str, filename: str, revision: str | None) -> downloads.HubFile:
        """GET /models/huggingface: one file of a Hub repository."""
        return await asyncio.to_thread(downloads.hub_file, repo_id, filename, revision or downloads.DEFAULT_REVISION,
                                       self.settings)

    async def _submit(self, submission: submissions.Submission) -> tuple[JobRecord, int]:
        async def announce(record: JobRecord, position: int) -> None:
            await self.events.publish(record.job_id, events_pb2.EVENT_KIND_JOB_ADDED,
                                      {"job_id": record.job_id, "type": record.type, "position": position})
            log.info("job queued", job_id=record.job_id, type=record.type, api=record.spec.api, position=position)

        record = JobRecord(job_id=jobs.new_job_id(), spec=submission.spec)
        return await self.store.submit(record, submission.images, submission.hf_token, announce)

    def request_urls(self, job_id: str) -> tuple[str, str]:
        """The /v1 status_url and result_url of a request."""
        base = f"{self.settings.inference.public_base_url}/v1/requests/{job_id}"
        return f"{base}/status", f"{base}/result"

    async def cancel_pending(self, job_id: str) -> JobRecord:
        record = await self.store.cancel_pending(job_id)
        await self._cancelled_event(record)
        return record

    async def cancel_any(self, job_id: str) -> JobRecord:
        record = await self.store.request_cancel(job_id)
        if record.status == CANCELLED and record.started_at is None:
            await self._cancelled_event(record)
        return record

    async def _cancelled_event(self, record: JobRecord) -> None:
        await self.store.drop_inputs(record)
        await jobs.publish_status(self.events, record, PENDING)

    async def job_events(self, job_id: str) -> AsyncIterator[events_pb2.Event]:
        """The job's events from its first, following it until it ends."""
        await self.store.get(job_id)
        async for event in bus.replay_events(self.store.nc, "inference", job_id, follow=True,
                                             final_statuses=jobs.FINAL, find=lambda: self.store.find(job_id)):
            yield event

    async def job(self, job_id: str) -> JobRecord:
        return await self.store.get(job_id)

    async def queue(self, status: str | None = None, limit: int | None = None, offset: int | None = None) -> QueuePage:
        """GET /queue: counts over every job, items in queue order, filtered by status and paged."""
        check = Violations()
        status = check.choice("status", status, jobs.STATUSES)
        limit = check.integer("limit", limit, low=1, high=MAX_QUEUE_PAGE)
        offset = check.integer("offset", offset, default=0, low=0)
        check.raise_if_any()
        return await self.store.queue(status, offset, limit)

    # ---- the generation-server model ----------------------------------------------------

    async def model_state(self) -> ModelState:
        return ModelState.from_json(await self.store.read_state(MODEL_STATE))

    async def load_model(self, request: dict) -> LoadPlan:
        plan = await asyncio.to_thread(plan_load, self.root, request)
        await self._write_model_state(ModelState(loading=True, loading_model_name=plan.model_name))
        started = time.perf_counter()
        try:
            await self.thread.run(self.host.get, plan.key(), plan.architecture,
                                  lambda: load_pipeline(plan, self.host.device, self.host.dtype, self.settings.models,
                                                        self.host.loading_stage(plan.model_name)),
                                  plan.model_name)
        except Exception as exc:
            error = f"Failed to load model: {plan.model_name}: {exc}"
            log.warning("model load failed", model=plan.model_name, error=str(exc))
            await self._write_model_state(ModelState(last_error=error))
            raise InvalidInput("model_name", error) from exc
        await self._write_model_state(ModelState(plan=plan))
        log.info("model loaded", model=plan.model_name, architecture=plan.architecture,
                 seconds=round(time.perf_counter() - started, 2))
        return plan

    async def _write_model_state(self, state: ModelState) -> None:
        await self.store.write_state(MODEL_STATE, state.to_json())

    async def unload_model(self) -> None:
        await self._write_model_state(ModelState())
        # Every replica drops its pipeline once its current job is done.
        await self.store.nc.publish(jobs.UNLOAD_SUBJECT, b"")

    async def drop_pipeline(self) -> None:
        await self.thread.run(self.host.unload)

    async def free_memory(self) -> list:
        freed = [await self.thread.run(self.host.unload)]
        if self.upscalers is not None:
            freed.append(await self.thread.run(self.upscalers.unload))
        return [f for f in freed if f]

    # ---- live previews --------------------------------------------------------------------

    async def preview_settings(self) -> previews.PreviewSettings:
        """GET /preview/settings: what every replica's next job previews with."""
        return previews.PreviewSettings.from_json(await self.store.read_state(previews.SETTINGS_KEY))

    async def update_preview_settings(self, changes: dict) -> previews.PreviewSettings:
        """PUT /preview/settings: the fields given change (checked), the others stay."""
        settings = (await self.preview_settings()).updated(changes)
        await self.store.write_state(previews.SETTINGS_KEY, settings.to_json())
        log.info("preview settings changed", **settings.to_json())
        return settings

    # ---- the generation-server upscaler ---------------------------------------------------

    async def upscaler(self) -> UpscalerPlan | None:
        """The upscaler /upscaler/load loaded, as every replica sees it."""
        data = await self.store.read_state(jobs.UPSCALER_STATE)
        return UpscalerPlan.from_json(data) if data else None

    async def load_upscaler(self, request: dict) -> UpscalerPlan:
        """POST /upscaler/load: checks the request, loads the model on this replica (so a bad
        file is refused now) and records it for every replica; jobs load it where they run."""
        bad = Violations()
        name = bad.text("model_name", request.get("model_name"), required=True)
        n_threads = bad.integer("n_threads", request.get("n_threads"), -1, -1, 1024)
        if n_threads == 0:
            bad.add("n_threads", "must be -1 (automatic) or a number of threads from 1 (got 0)")
        tile = upscaling.check_tile_size(bad, "tile_size", request.get("tile_size"), upscaling.DEFAULT_TILE)
        bad.raise_if_any()
        path = await asyncio.to_thread(self.root.path, upscaling.UPSCALER_TYPE, name, "model_name")
        # The factor is the model's own, known once it is loaded.
        plan = UpscalerPlan(model_name=name, path=str(path), scale=0, tile_size=tile, n_threads=n_threads)
        loaded = await self.thread.run(self.upscalers.get, plan)
        plan = dataclasses.replace(plan, scale=loaded.scale)
        await self.store.write_state(jobs.UPSCALER_STATE, plan.to_json())
        log.info("upscaler loaded", model=name, scale=plan.scale)
        return plan

    async def unload_upscaler(self) -> None:
        """POST /upscaler/unload: no upscaler for anyone; every replica drops its copy."""
        await self.store.write_state(jobs.UPSCALER_STATE, None)
        await self.store.nc.publish(jobs.UNLOAD_UPSCALER_SUBJECT, b"")

    async def drop_upscaler(self) -> None:
        if self.upscalers is not None:
            await self.thread.run(self.upscalers.unload)

    # ---- model files --------------------------------------------------------------------

    async def list_models(self, type_: str | None, extension: str | None, search: str | None) -> ModelListing:
        listing = await asyncio.to_thread(self.root.list, type_, extension, search)
        files = {key: [(f, await self._cached_hash(f)) for f in found] for key, found in listing.items()}
        filters = {name: value for name, value in (("type", type_), ("extension", extension), ("search", search))
                   if value is not None}
        return ModelListing(files=files, loaded=(await self.model_state()).plan, filters=filters)

    async def _cached_hash(self, f: ModelFile) -> str | None:
        return await self.store.cached_hash(f.type, f.name, f.size_bytes, f.mtime)

    async def model_hash(self, type_: str, name: str) -> str:
        path = await asyncio.to_thread(self.root.path, type_, name, "model_name")
        return await self.store.model_hash(type_, name, path)

    def model_paths(self) -> dict[str, Path]:
        """The folder of each model type under the models root."""
        root = self.settings.inference.models_dir
        return {type_: root / folder for type_, folder in MODEL_TYPES.items()}

    @staticmethod
    def list_keys() -> dict[str, str]:
        """Model type -> the GET /models list it appears in, in answer order."""
        return dict(LIST_KEYS)

    # ---- outputs ------------------------------------------------------------------------

    async def browse(self, path: str, sort: str | None, order: str | None) -> tuple[str, AsyncIterator[bytes]]:
        """GET /output: (content type, body chunks) of a folder page or a file; the file is
        read chunk by chunk as the chunks are taken."""
        content_type, chunks = await asyncio.to_thread(output_browser.browse, self.settings.inference.output_dir,
                                                       path, sort, order)
        return content_type, _read_in_thread(chunks)

    async def thumbnail(self, path: str) -> tuple[str, bytes]:
        return await asyncio.to_thread(output_browser.thumbnail, self.settings.inference.output_dir, path,
                                       self.settings.media)

    # ---- what the server offers ---------------------------------------------------------

    @staticmethod
    def catalog() -> list[CatalogModel]:
        return list(catalog.CATALOG.values())

    @staticmethod
    def options() -> Options:
        return Options(samplers.SAMPLERS, samplers.SCHEDULERS, QUANTIZATION_TYPES)

    async def architecture_presets(self) -> tuple[dict[str, dict], architectures.ModelFamily | None]:
        """GET /architectures: every family's preset, and the loaded model's family."""
        plan = (await self.model_state()).plan
        return architectures.presets(), architectures.family(plan.architecture) if plan else None


async def _read_in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Each chunk read off the event loop (disk reads block)."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk
