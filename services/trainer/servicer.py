"""gRPC layer of the trainer: each RPC converts its request to one call of `SessionAPI` or
`TaskAPI` and the record back to protos. A task prints as `tasks.task_document` says, here
and in its webhook body."""

from __future__ import annotations

import json

from google.api import httpbody_pb2
from google.protobuf import json_format, timestamp_pb2

from loramesh.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import bus
from services.common.callers import caller
from services.trainer import tasks
from services.trainer.job_config import parse_job_config
from services.trainer.session_api import SessionAPI, SessionRecord
from services.trainer.task_api import FinetuneRequest, TaskAPI, TrainingTaskRequest


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def session_proto(r: SessionRecord) -> trainer_pb2.Session:
    session = trainer_pb2.Session(
        session_id=r.session_id, name=r.name, state=r.state, allowed_steps=r.allowed_steps,
        completed_steps=r.completed_steps, remaining_steps=r.remaining_steps, max_steps=r.max_steps,
        last_checkpoint_path=r.last_checkpoint_path, error=r.error, training_folder=r.training_folder,
        device=r.device, notes=r.notes, created_at=_timestamp(r.created_at), updated_at=_timestamp(r.updated_at),
        samples=[trainer_pb2.TrainingSample(step=s.step, prompt=s.prompt, path=s.path) for s in r.samples],
    )
    for name in ("last_checkpoint_step", "loss", "learning_rate", "steps_per_second", "eta_seconds", "memory_bytes"):
        value = getattr(r, name)
        if value is not None:
            setattr(session, name, value)
    return session


def log_line(event: events_pb2.Event) -> trainer_pb2.StreamSessionLogsResponse:
    data = event.data
    line = trainer_pb2.StreamSessionLogsResponse(
        time=event.time, kind=bus.EVENT_KINDS[event.kind].token if event.kind in bus.EVENT_KINDS else "log",
        level=data["level"] if "level" in data else "info", message=data["message"] if "message" in data else "",
    )
    if "step" in data:
        line.step = int(data["step"])
    if "error" in data:
        line.error = data["error"]
    return line


def task_proto(record: tasks.TaskRecord) -> trainer_pb2.TrainingTask:
    return json_format.ParseDict(tasks.task_document(record), trainer_pb2.TrainingTask())


def finetune_proto(record: tasks.TaskRecord) -> trainer_pb2.GetFinetuneDetailsResponse:
    finetune = record.finetune
    details = trainer_pb2.FinetuneDetails(
        finetune_id=record.id, status=tasks.FINETUNE_STATUS[record.status], progress=record.progress,
        finetune_comment=finetune.comment, trigger_word=record.trigger_word, mode=finetune.mode,
        iterations=finetune.iterations, learning_rate=finetune.learning_rate, captioning=finetune.captioning,
        priority=finetune.priority, finetune_type=finetune.finetune_type, lora_rank=finetune.lora_rank,
        lora_path=record.output_lora_path or "", error=record.error_message or "",
        created_at=_timestamp(record.created_at), updated_at=_timestamp(record.updated_at),
        full_weights_path=record.output_full_weights_path or "", current_step=record.current_step,
        preprocessing_stage=record.preprocessing_stage or "", logs="\n".join(record.logs),
    )
    return trainer_pb2.GetFinetuneDetailsResponse(finetune_details=details)


def _given(message, *names: str) -> dict:
    """The optional fields a request set, by name (unset ones are the document's null)."""
    return {name: getattr(message, name) for name in names if message.HasField(name)}


_TASK_OPTIONALS = ("training_type", "entity_type", "entity_id", "rank", "steps", "learning_rate", "base_model_path",
                   "bypass_guidance_embedding", "webhook_url", "origin_instance", "origin_zone", "origin_version",
                   "origin_tenant_id", "preprocessing_captioning_strategy", "preprocessing_captioning_prompt",
                   "priority", "save_every")
_FINETUNE_OPTIONALS = ("trigger_word", "iterations", "learning_rate", "captioning", "priority", "finetune_type",
                       "lora_rank")


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, api: SessionAPI, task_api: TaskAPI):
        self._api = api
        self._tasks = task_api

    async def CreateSession(self, request, context):
        config = json_format.MessageToDict(request.config) if request.HasField("config") else None
        max_steps = request.max_steps if request.HasField("max_steps") else None
        return session_proto(await self._api.create(request.session_id, max_steps, config))

    async def ListSessions(self, request, context):
        return trainer_pb2.ListSessionsResponse(sessions=[session_proto(r) for r in await self._api.list()])

    async def GetSession(self, request, context):
        return session_proto(await self._api.get(request.session_id))

    async def GetSessionLoss(self, request, context):
        after_step = request.after_step if request.HasField("after_step") else None
        record, points = await self._api.loss(request.session_id, after_step)
        return trainer_pb2.SessionLoss(
            session_id=record.session_id, log_every=parse_job_config(record.config).process.logging.log_every,
            points=[trainer_pb2.LossPoint(step=p.step, loss=p.loss, learning_rate=p.learning_rate,
                                          time=_timestamp(p.time)) for p in points])

    async def GetSessionSample(self, request, context):
        data, content_type = await self._api.sample(request.session_id, request.index)
        return httpbody_pb2.HttpBody(content_type=content_type, data=data)

    async def GrantSteps(self, request, context):
        return session_proto(await self._api.grant(request.session_id, request.steps))

    async def AbortSession(self, request, context):
        return session_proto(await self._api.abort(request.session_id))

    async def DeleteSession(self, request, context):
        record = await self._api.delete(request.session_id)
        return trainer_pb2.DeleteSessionResponse(session_id=record.session_id, deleted=True,
                                                 last_checkpoint_path=record.last_checkpoint_path)

    async def StreamSessionLogs(self, request, context):
        follow = request.follow if request.HasField("follow") else True
        async for event in self._api.logs(request.session_id, follow):
            yield log_line(event)


    async def CreateTrainingTask(self, request, context):
        transforms = [json_format.MessageToDict(t) for t in request.preprocessing_transforms] or None
        create = TrainingTaskRequest(
            trigger_word=request.trigger_word, sample_prompts=list(request.sample_prompts),
            source_images=list(request.source_images), preprocessing_transforms=transforms,
            **_given(request, *_TASK_OPTIONALS))
        return task_proto(await self._tasks.create(caller(context.invocation_metadata()), create))

    async def ListTrainingTasks(self, request, context):
        found = await self._tasks.list(caller(context.invocation_metadata()), **_given(request, "skip", "limit"))
        body = json.dumps([tasks.task_document(r) for r in found]).encode()
        return httpbody_pb2.HttpBody(content_type="application/json", data=body)

    async def GetTrainingTask(self, request, context):
        return task_proto(await self._tasks.get(caller(context.invocation_metadata()), request.task_id))

    async def CancelTrainingTask(self, request, context):
        return task_proto(await self._tasks.cancel(caller(context.invocation_metadata()), request.task_id))

    async def SetTrainingTaskPriority(self, request, context):
        priority = request.priority if request.HasField("priority") else None
        return task_proto(await self._tasks.set_priority(caller(context.invocation_metadata()), request.task_id,
                                                         priority))

    async def CreateFinetune(self, request, context):
        create = FinetuneRequest(file_data=request.file_data, finetune_comment=request.finetune_comment or None,
                                 mode=request.mode or None, **_given(request, *_FINETUNE_OPTIONALS))
        record = await self._tasks.create_finetune(caller(context.invocation_metadata()), create)
        return trainer_pb2.CreateFinetuneResponse(finetune_id=record.id)

    async def GetFinetuneDetails(self, request, context):
        return finetune_proto(await self._tasks.finetune(caller(context.invocation_metadata()), request.finetune_id))

