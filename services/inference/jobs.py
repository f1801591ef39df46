"""Where inference jobs live in NATS, so any replica accepts, runs, reports and cancels
any job:

    KV bucket     inference_jobs        one JobRecord per job id
    KV bucket     inference_state       the model loaded through /models/load, hash cache
    object store  inference_inputs      a job's input images until it ends
    stream        INFERENCE_JOBS        work queue: one message per job, in submit order; its
                                        sequence is the job's place in line (`seq`)
    subject       control.inference.<job id>   cancel a running job
    subject       control.inference.unload     every replica drops its pipeline
    subject       control.inference.unload-upscaler   every replica drops its upscaler

The work-queue message also carries the request's hf_token, so the token lives only
until the job is acknowledged and never appears in a record, a response or a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ObjectStoreConfig, StorageType, StreamInfo, StreamState

from loramesh.v1 import events_pb2
from services.common import bus, jobs, tracing
from services.common.errors import FailedPrecondition, TooLarge
from services.inference.job_spec import V1_API, JobSpec
from services.inference.model_files import sha256_file
from services.inference.queue_index import QueueIndex

BUCKET = "inference_jobs"
STATE_BUCKET = "inference_state"
INPUTS_BUCKET = "inference_inputs"
QUEUE_STREAM = "INFERENCE_JOBS"
QUEUE_SUBJECT = "jobs.inference"
QUEUE_CONSUMER = "inference-workers"
UNLOAD_SUBJECT = "control.inference.unload"
UNLOAD_UPSCALER_SUBJECT = "control.inference.unload-upscaler"
# Key of the upscaler /upscaler/load loaded (an upscaling.UpscalerPlan) in STATE_BUCKET.
UPSCALER_STATE = "upscaler"
# A job whose worker keeps dying on it is given up on.
MAX_DELIVER = 5
# How long a worker holding a job's message waits for its submitter to finish queuing it
# (announce it and record its `seq`), so job_added always comes before the job starts.
QUEUED_WAIT_S = 5.0

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = "pending", "processing", "completed", "failed", "cancelled"
STATUSES = (PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED)
FINAL = frozenset({COMPLETED, FAILED, CANCELLED})
# The async v1 API names the same states its own way.
V1_STATUS = {PENDING: "in_queue", PROCESSING: "in_progress", COMPLETED: "succeeded", FAILED: "failed",
             CANCELLED: "canceled"}


async def publish_status(events: bus.EventPublisher, record: JobRecord, previous: str) -> None:
    """job_status_changed for a job's new status; a cancelled job's job_cancelled comes just
    before it, since a final status is the last event a job's followers wait for."""
    if record.status == CANCELLED:
        await events.publish(record.job_id, events_pb2.EVENT_KIND_JOB_CANCELLED,
                             {"job_id": record.job_id, "previous_status": previous})
    data = {"job_id": record.job_id, "status": record.status, "previous_status": previous,
            "outputs": list(record.outputs)}
    if record.error:
        data["error"] = record.error
    await events.publish(record.job_id, events_pb2.EVENT_KIND_STATUS, data)


def new_job_id() -> str:
    return str(uuid.uuid4())


def control_subject(job_id: str) -> str:
    return f"control.inference.{job_id}"


@dataclass
class Progress:
    """Where a running job is: the documented JobProgress fields."""

    step: int = 0
    total_steps: int = 0
    current_image: int = 0
    total_images: int = 0
    all_steps: int = 0
    current_all_steps: int = 0
    percentage: float = 0.0

    @classmethod
    def at(cls, spec: JobSpec, index: int, step: int, total: int) -> Progress:
        """After `step` of `total` steps of image `index` (steps are the same for every image)."""
        images = len(spec.images) or 1  # a conversion is one piece of work
        done, all_steps = index * total + step, total * images
        return cls(step=step, total_steps=total, current_image=index, total_images=images, all_steps=all_steps,
                   current_all_steps=done, percentage=round(100.0 * done / all_steps, 2) if all_steps else 0.0)


@dataclass
class OutputImage:
    file_path: str  # absolute path on the outputs volume
    format: str
    width: int
    height: int
    seed: int
    # Videos only.
    num_frames: int | None = None
    fps: int | None = None


@dataclass
class JobRecord:
    job_id: str
    spec: JobSpec
    # Names of the job's input images in the object store (init, mask, ctrl_0, ...).
    inputs: list[str] = field(default_factory=list)
    status: str = PENDING
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    # None until the worker reports its first step.
    progress: Progress | None = None
    # Output files relative to the output root, e.g. "<job_id>/image_0.png".
    outputs: list[str] = field(default_factory=list)
    output_info: list[OutputImage] = field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    owner: str = ""
    attempts: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    # Stream sequence of the queue message: the job's place in the FIFO order.
    seq: int = 0

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    @property
    def v1_status(self) -> str:
        return V1_STATUS[self.status]

    @property
    def current_progress(self) -> Progress:
        """The last progress reported, or step 0 of the first image before the job starts."""
        if self.progress is not None:
            return self.progress
        return Progress.at(self.spec, 0, 0, self.spec.images[0].steps if self.spec.images else 0)

    def to_json(self) -> bytes:
        # The spec serialises itself (its plan has its own form); everything else is plain data.
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"}
        data["progress"] = asdict(self.progress) if self.progress else None
        data["output_info"] = [asdict(info) for info in self.output_info]
        data["spec"] = self.spec.to_dict()
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobRecord:
        data = json.loads(raw)
        data["spec"] = JobSpec.from_dict(data["spec"])
        data["progress"] = Progress(**data["progress"]) if data.get("progress") else None
        data["output_info"] = [OutputImage(**info) for info in data.get("output_info", [])]
        return cls(**data)


def queue_order(record: JobRecord) -> tuple[float, float]:
    """The order workers take jobs in: the queue message's sequence. A job whose message
    is still being published sorts last."""
    return (record.seq or float("inf"), record.created_at)


def line_position(seq: int, delivered: int, first: int, deleted: Iterable[int]) -> int:
    """1-based place in line of the queue message `seq`: one more than the messages still
    waiting before it, i.e. those in the stream after the consumer's last delivery
    (`delivered`) and the stream's first message. `deleted` are the stream's interior
    deletions (cancelled jobs). Messages handed out before, including those waiting to be
    redelivered after a worker died, had their turn already and count for no one; a
    message already handed out is first in line."""
    low = max(delivered + 1, first)
    if seq <= low:
        return 1
    return 1 + (seq - low) - sum(1 for d in deleted if low <= d < seq)


@dataclass
class QueuePage:
    """GET /queue: counts over every job in the history, and the asked-for items."""

    counts: dict[str, int]
    total: int
    items: list[JobRecord]


class JobStore(jobs.RecordStore[JobRecord]):
    record_type = JobRecord
    bucket = BUCKET

    def __init__(self, nc: NATS, ack_wait: float, history_s: float):
        super().__init__(nc, ack_wait)
        # Finished jobs leave the history this long after their last change.
        self.history_s = history_s
        self.index = QueueIndex(self.js, BUCKET, history_s, JobRecord.from_json, queue_order, STATUSES)

    async def setup(self) -> None:
        self.kv = await jobs.key_value(self.js, BUCKET, ttl=self.history_s)
        self.state = await jobs.key_value(self.js, STATE_BUCKET)
        try:
            self.inputs = await self.js.object_store(INPUTS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            self.inputs = await self.js.create_object_store(
                INPUTS_BUCKET, ObjectStoreConfig(bucket=INPUTS_BUCKET, storage=StorageType.FILE, ttl=self.history_s,
                                                replicas=bus.stream_replicas(self.js)))
        # One delivery past the limit, so a worker sees it and records why the job failed.
        await jobs.work_queue(self.js, QUEUE_STREAM, QUEUE_SUBJECT, QUEUE_CONSUMER,
                              ack_wait=self.ack_wait, max_deliver=MAX_DELIVER + 1)
        await self.index.start()

    def not_found(self, key: str) -> str:
        return f"Job not found: {key!r}"

    async def list(self) -> list[JobRecord]:
        return (await self.queue()).items

    async def queue(self, status: str | None = None, offset: int = 0, limit: int | None = None) -> QueuePage:
        """Jobs in queue order from this replica's index, once it holds every write made so far."""
        await self.index.sync()
        return QueuePage(self.index.counts(), len(self.index), self.index.items(status, offset, limit))

    async def position(self, seq: int) -> int:
        """The place in line of the queue message `seq`, from the queue's own state."""
        consumer, stream = await asyncio.gather(self.js.consumer_info(QUEUE_STREAM, QUEUE_CONSUMER),
                                                self._queue_state())
        return line_position(seq, consumer.delivered.stream_seq, stream.first_seq, stream.deleted or ())

    async def _queue_state(self) -> StreamState:
        """The work queue's state with its interior deletions (nats-py's stream_info leaves them out)."""
        reply = await self.nc.request(f"$JS.API.STREAM.INFO.{QUEUE_STREAM}", b'{"deleted_details": true}',
                                      timeout=5.0)
        data = json.loads(reply.data)
        if "error" in data:
            raise nats.js.errors.APIError.from_error(data["error"])
        return StreamInfo.from_response(data).state

    async def _unqueue(self, seq: int) -> None:
        """Takes a job that will not run out of the work queue, so it is not counted in line."""
        if seq:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):  # taken already
                await self.js.delete_msg(QUEUE_STREAM, seq)

    # ---- submit -------------------------------------------------------------------------

    async def submit(self, record: JobRecord, images: dict[str, bytes], hf_token: str | None,
                     announce: Callable[[JobRecord, int], Awaitable[None]]) -> tuple[JobRecord, int]:
        """Stores the inputs and the record, queues the job, announces it with its place in
        line (read from the queue, so jobs waiting together have distinct positions in the
        order they will start), then records its `seq`: a worker that takes the message first
        waits for that (`wait_queued`), so the announcement comes before any news of the job
        starting. When a step fails, nothing stays queued or stored."""
        record.inputs = sorted(images)
        encoded = record.to_json()
        if len(encoded) > self.nc.max_payload:
            # A record NATS cannot hold is refused before anything is stored.
            raise TooLarge("prompts" if record.spec.api == V1_API else "prompt",
                           f"the job is {len(encoded)} bytes as queued, above the {self.nc.max_payload}-byte "
                           f"limit of one job; send fewer or shorter prompts")
        for name, data in images.items():
            await self.inputs.put(f"{record.job_id}/{name}", data)
        await self.kv.create(record.job_id, encoded)
        message = {"job_id": record.job_id}
        if hf_token:
            message["hf_token"] = hf_token
        seq = 0
        try:
            with tracing.publishing(QUEUE_SUBJECT) as headers:  # the worker's span continues this trace
                seq = (await self.js.publish(QUEUE_SUBJECT, json.dumps(message).encode(), headers=headers)).seq
            position = await self.position(seq)
            await announce(record, position)
        except Exception:
            await self._unqueue(seq)
            await self.kv.delete(record.job_id)
            await self.drop_inputs(record)
            raise
        record = await self.update(record.job_id, lambda r: setattr(r, "seq", seq))
        if record.status == CANCELLED:  # cancelled before its seq was known
            await self._unqueue(seq)
        return record, position

    async def wait_queued(self, job_id: str, limit: float) -> JobRecord | None:
        """The record of a job whose message a worker holds, once its submitter has queued it
        (its `seq` is recorded) or it left the pending state; after `limit` seconds, as it is
        (a submitter that died midway). None when the job is gone."""
        deadline, pause = time.monotonic() + limit, 0.005
        while True:
            record = await self.find(job_id)
            if record is None or record.seq or record.status != PENDING or time.monotonic() >= deadline:
                return record
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def read_input(self, record: JobRecord, name: str) -> bytes:
        return (await self.inputs.get(f"{record.job_id}/{name}")).data

    async def drop_inputs(self, record: JobRecord) -> None:
        for name in record.inputs:
            try:
                await self.inputs.delete(f"{record.job_id}/{name}")
            except nats.js.errors.ObjectNotFoundError:
                pass

    # ---- cancel -------------------------------------------------------------------------

    async def cancel_pending(self, job_id: str) -> JobRecord:
        """A pending job is cancelled and never starts; any other state is refused."""

        def cancel(r: JobRecord) -> None:
            if r.status != PENDING:
                raise FailedPrecondition(f"Cannot cancel job {job_id}: it is {r.status}; only pending jobs can be "
                                         f"cancelled")
            r.status, r.completed_at = CANCELLED, time.time()

        record = await self.update(job_id, cancel)
        await self._unqueue(record.seq)
        return record

    async def request_cancel(self, job_id: str) -> JobRecord:
        """Cancels a pending job, or asks the worker running it to stop at its next step."""

        def cancel(r: JobRecord) -> None:
            if r.status == PENDING:
                r.status, r.completed_at = CANCELLED, time.time()
            elif r.status == PROCESSING:
                r.cancel_requested = True

        record = await self.update(job_id, cancel)
        if record.status == PROCESSING:
            await self.nc.publish(control_subject(job_id), b"cancel")
        elif record.status == CANCELLED and record.started_at is None:
            await self._unqueue(record.seq)
        return record

    async def pull_subscription(self):
        return await self.js.pull_subscribe(QUEUE_SUBJECT, durable=QUEUE_CONSUMER, stream=QUEUE_STREAM)

    # ---- shared state -------------------------------------------------------------------

    async def read_state(self, key: str) -> dict | None:
        try:
            entry = await self.state.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return json.loads(entry.value) if entry.value else None

    async def write_state(self, key: str, value: dict | None) -> None:
        await self.state.put(key, json.dumps(value).encode() if value is not None else b"")

    # ---- the hash cache (GET /models/hash, GET /models, hash jobs) ------------------------

    async def cached_hash(self, type_: str, name: str, size: int, mtime: float) -> str | None:
        """The cached SHA256 of a model file, if it has not changed since it was hashed."""
        entry = await self.read_state(_hash_key(type_, name))
        if entry and entry["size"] == size and entry["mtime"] == mtime:
            return entry["hash"]
        return None

    async def model_hash(self, type_: str, name: str, path: Path) -> str:
        """The SHA256 of a model file: cached, or computed (off the event loop) and cached."""
        stat = path.stat()
        digest = await self.cached_hash(type_, name, stat.st_size, stat.st_mtime)
        if digest is None:
            digest = await asyncio.to_thread(sha256_file, path)
            await self.write_state(_hash_key(type_, name), {"size": stat.st_size, "mtime": stat.st_mtime,
                                                            "hash": digest})
        return digest


def _hash_key(type_: str, name: str) -> str:
    return "hash." + hashlib.sha256(f"{type_}/{name}".encode()).hexdigest()[:40]
