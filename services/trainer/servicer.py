"""gRPC layer of the trainer: each RPC converts its request to one call of `SessionAPI` and
the session record back to protos. Training tasks and finetunes are not served yet and
answer UNIMPLEMENTED (see wiring.py)."""

from __future__ import annotations

from google.protobuf import json_format, timestamp_pb2

from loramesh.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import bus
from services.trainer.session_api import SessionAPI, SessionRecord


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
    for name in ("last_checkpoint_step", "loss", "learning_rate", "steps_per_second", "eta_seconds"):
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


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, api: SessionAPI):
        self._api = api

    async def CreateSession(self, request, context):
        config = json_format.MessageToDict(request.config) if request.HasField("config") else None
        max_steps = request.max_steps if request.HasField("max_steps") else None
        return session_proto(await self._api.create(request.session_id, max_steps, config))

    async def ListSessions(self, request, context):
        return trainer_pb2.ListSessionsResponse(sessions=[session_proto(r) for r in await self._api.list()])

    async def GetSession(self, request, context):
        return session_proto(await self._api.get(request.session_id))

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


SESSION_METHODS = frozenset({"CreateSession", "ListSessions", "GetSession", "GrantSteps", "AbortSession",
                             "DeleteSession", "StreamSessionLogs"})
