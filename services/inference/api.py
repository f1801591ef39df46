"""What the inference routes do, on any replica: submit and cancel jobs through the
shared NATS records, load and unload the generation-server model, hash model files.

The loaded model of the generation-server API is shared state: /models/load records
its plan in NATS, so every replica's /health agrees and every job carries the plan it was
queued with (a worker that has not loaded it yet loads it first).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

from loramesh.v1 import events_pb2
from services.common import bus, logs
from services.common.bus import EventPublisher
from services.common.errors import InvalidInput
from services.common.model_thread import ModelThread
from services.common.settings import Settings
from services.inference import jobs, submissions
from services.inference.jobs import JobRecord, JobStore
from services.inference.model_files import ModelFile, ModelsRoot, sha256_file
from services.inference.model_loading import LoadPlan, load_pipeline, plan_load
from services.inference.pipelines import PipelineHost

log = logs.get(__name__)

MODEL_STATE = "model"


class InferenceAPI:
    def __init__(self, settings: Settings, store: JobStore, events: EventPublisher, host: PipelineHost,
                 thread: ModelThread):
        self.settings = settings
        self.store = store
        self.events = events
        self.host = host
        self.thread = thread
        self.root = ModelsRoot(settings.inference.models_dir)

    # ---- jobs ---------------------------------------------------------------------------

    async def submit_v1(self, request: dict) -> JobRecord:
        submission = await asyncio.to_thread(submissions.parse_v1, request, self.settings)
        record, _ = await self._submit(submission)
        return record

    async def submit_server(self, job_type: str, request: dict) -> tuple[JobRecord, int]:
        state = await self.model_state()
        submission = await asyncio.to_thread(submissions.parse_server, job_type, request, state.get("plan"),
                                             self.root, self.settings)
        return await self._submit(submission)

    async def _submit(self, submission: submissions.Submission) -> tuple[JobRecord, int]:
        async def announce(record: JobRecord, position: int) -> None:
            await self.events.publish(record.job_id, events_pb2.EVENT_KIND_JOB_ADDED,
                                      {"job_id": record.job_id, "type": record.type, "position": position})
            log.info("job queued", job_id=record.job_id, type=record.type, api=record.api, position=position)

        return await self.store.submit(submission.record, submission.images, submission.hf_token, announce)

    async def cancel_pending(self, job_id: str) -> JobRecord:
        record = await self.store.cancel_pending(job_id)
        await self._cancelled_event(record)
        return record

    async def cancel_any(self, job_id: str) -> JobRecord:
        record = await self.store.request_cancel(job_id)
        if record.status == jobs.CANCELLED and record.started_at is None:
            await self._cancelled_event(record)
        return record

    async def _cancelled_event(self, record: JobRecord) -> None:
        await self.store.drop_inputs(record)
        await self.events.publish(record.job_id, events_pb2.EVENT_KIND_STATUS,
                                  {"job_id": record.job_id, "status": jobs.CANCELLED, "previous_status": jobs.PENDING,
                                   "outputs": []})

    async def job_events(self, job_id: str) -> AsyncIterator[events_pb2.Event]:
        await self.store.get(job_id)
        async for event in bus.replay_events(self.store.nc, "inference", job_id, follow=True,
                                             final_statuses=jobs.FINAL, find=lambda: self.store.find(job_id)):
            yield event

    # ---- the generation-server model ----------------------------------------------------

    async def model_state(self) -> dict:
        return await self.store.read_state(MODEL_STATE) or {}

    async def load_model(self, request: dict) -> LoadPlan:
        plan = await asyncio.to_thread(plan_load, self.root, request)
        await self.store.write_state(MODEL_STATE, {"loading": True, "loading_model_name": plan.model_name,
                                                   "plan": None, "last_error": None})
        started = time.perf_counter()
        try:
            await self.thread.run(self.host.get, plan.key(), plan.architecture,
                                  lambda: load_pipeline(plan, self.host.device, self.host.dtype))
        except Exception as exc:
            error = f"Failed to load model: {plan.model_name}: {exc}"
            log.warning("model load failed", model=plan.model_name, error=str(exc))
            await self.store.write_state(MODEL_STATE, {"loading": False, "plan": None, "last_error": error})
            raise InvalidInput("model_name", error) from exc
        await self.store.write_state(MODEL_STATE, {"loading": False, "plan": plan.to_json(), "last_error": None})
        log.info("model loaded", model=plan.model_name, architecture=plan.architecture,
                 seconds=round(time.perf_counter() - started, 2))
        return plan

    async def unload_model(self) -> None:
        await self.store.write_state(MODEL_STATE, {"loading": False, "plan": None, "last_error": None})
        # Every replica drops its pipeline once its current job is done.
        await self.store.nc.publish(jobs.UNLOAD_SUBJECT, b"")

    async def drop_pipeline(self) -> None:
        await self.thread.run(self.host.unload)

    # ---- model files --------------------------------------------------------------------

    async def list_models(self, type_: str | None, extension: str | None, search: str | None) -> dict[str, list]:
        listing = await asyncio.to_thread(self.root.list, type_, extension, search)
        return {key: [(f, await self.cached_hash(f)) for f in files] for key, files in listing.items()}

    async def cached_hash(self, f: ModelFile) -> str | None:
        entry = await self.store.read_state(_hash_key(f.type, f.name))
        if entry and entry["size"] == f.size_bytes and entry["mtime"] == f.mtime:
            return entry["hash"]
        return None

    async def model_hash(self, type_: str, name: str) -> str:
        path = await asyncio.to_thread(self.root.path, type_, name, "model_name")
        stat = path.stat()
        entry = await self.store.read_state(_hash_key(type_, name))
        if entry and entry["size"] == stat.st_size and entry["mtime"] == stat.st_mtime:
            return entry["hash"]
        digest = await asyncio.to_thread(sha256_file, path)
        await self.store.write_state(_hash_key(type_, name), {"size": stat.st_size, "mtime": stat.st_mtime,
                                                              "hash": digest})
        return digest

    async def job(self, job_id: str) -> JobRecord:
        return await self.store.get(job_id)

    async def queue(self) -> list[JobRecord]:
        return await self.store.list()


def _hash_key(type_: str, name: str) -> str:
    return "hash." + hashlib.sha256(f"{type_}/{name}".encode()).hexdigest()[:40]
