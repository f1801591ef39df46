"""What the session routes do, on any replica: create, grant, abort and delete sessions
through the shared NATS records, and replay a session's log from the events stream."""

from __future__ import annotations

import asyncio
import json
import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors

from loramesh.v1 import events_pb2
from services.common import bus
from services.common.bus import EventPublisher
from services.common.errors import AlreadyExists, InvalidInput, NotFound, Violations
from services.common.settings import Settings
from services.trainer import checkpoints, sessions
from services.trainer.inputs import resolve_inputs
from services.trainer.job_config import parse_job_config
from services.trainer.loss_history import LossHistory, LossPoint
from services.trainer.sessions import SessionRecord, check_session_id
from services.trainer.store import SessionStore, control_subject


class SessionAPI:
    def __init__(self, settings: Settings, store: SessionStore, events: EventPublisher, history: LossHistory):
        self.settings = settings
        self.store = store
        self.events = events
        self.history = history

    async def create(self, session_id: str, max_steps: int | None, config: dict | None) -> SessionRecord:
        bad = Violations()
        check_session_id(session_id, bad)
        max_steps = bad.integer("max_steps", max_steps, low=1, high=sessions.MAX_STEPS_LIMIT)
        bad.require(config is not None, "config", "is required: the ai-toolkit job config {job, config: {name, process}}")
        bad.raise_if_any()
        job = parse_job_config(config)
        inputs = resolve_inputs(job, self.settings)
        name, folder = job.name, str(inputs.training_folder)
        if await self.store.find(session_id) is not None:
            raise AlreadyExists(f"session {session_id!r} already exists; delete it first or pick another session_id")
        for other in await self.store.list():
            if not other.is_final and other.name == name and other.training_folder == folder:
                raise AlreadyExists(f"session {other.session_id!r} is already training {name!r} in {folder}; "
                                    f"abort it first")
        record = SessionRecord(
            session_id=session_id, name=name, config=job.to_dict(),
            max_steps=max_steps if max_steps is not None else job.process.train.steps, training_folder=folder,
        )
        latest = checkpoints.latest_checkpoint(inputs.training_folder, name)
        if latest is not None:
            record.resume_from(checkpoints.checkpoint_step(latest.path), str(latest.path))
        await self.store.create(record)
        try:
            inputs.training_folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            await self.store.delete(session_id)
            raise InvalidInput("config.config.process[0].training_folder", f"cannot be created: {exc}") from exc
        # A session recreated under an old id starts a fresh log.
        await self.store.js.purge_stream(bus.EVENTS_STREAM, subject=bus.event_subject("trainer", session_id, ">"))
        await self.history.clear(session_id)
        await self.store.enqueue(session_id)
        await self._log(session_id, f"session created: {name}, max_steps {record.max_steps}, training folder {folder}")
        return record

    async def get(self, session_id: str) -> SessionRecord:
        return await self.store.get(check_session_id(session_id))

    async def list(self) -> list[SessionRecord]:
        return await self.store.list()

    async def loss(self, session_id: str, after_step: int | None) -> tuple[SessionRecord, list[LossPoint]]:
        """The session and its loss history past `after_step` (all of it when None)."""
        bad = Violations()
        check_session_id(session_id, bad)
        after_step = bad.integer("after_step", after_step, low=0)
        bad.raise_if_any()
        record = await self.store.get(session_id)
        return record, await self.history.points(session_id, after_step or 0)

    async def sample(self, session_id: str, index: int) -> tuple[bytes, str]:
        """The bytes and content type of the session's `index`th sample image."""
        record = await self.get(session_id)
        bad = Violations()
        bad.integer("index", index, low=0)
        bad.raise_if_any()
        if index >= len(record.samples):
            raise NotFound(f"session {session_id!r} has {len(record.samples)} samples; index must be below that")
        path = Path(record.samples[index].path)
        # Only files the session wrote into its own training folder are served.
        if not path.resolve().is_relative_to(Path(record.training_folder).resolve()):
            raise NotFound(f"sample {index} of session {session_id!r} is outside its training folder")
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise NotFound(f"sample {index} of session {session_id!r} is no longer on disk: {exc.strerror}") from exc
        return data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    async def grant(self, session_id: str, steps: int) -> SessionRecord:
        check_session_id(session_id)
        record = await self.store.update(session_id, lambda r: r.grant(steps))
        await self.store.nc.publish(control_subject(session_id), json.dumps({"action": "grant"}).encode())
        await self._log(session_id, f"granted {steps} steps: allowed_steps {record.allowed_steps} of "
                                    f"max_steps {record.max_steps}")
        return record

    async def abort(self, session_id: str) -> SessionRecord:
        """Asks the replica running the session to checkpoint and stop; a session no
        replica runs (queued, or its replica gone) is marked aborted here."""
        record = await self.get(session_id)
        if record.is_final:
            return record
        record = await self.store.update(session_id, lambda r: setattr(r, "abort_requested", True))
        if record.owner:
            try:
                await self.store.nc.request(control_subject(session_id), json.dumps({"action": "abort"}).encode(),
                                            timeout=self.settings.trainer.abort_timeout_s)
                return await self.get(session_id)
            except nats.errors.NoRespondersError:
                pass
            except nats.errors.TimeoutError:
                return await self.get(session_id)  # still saving; it ends aborted
        record = await self.store.update(session_id, _mark_aborted)
        await self._log(session_id, "session aborted")
        return record

    async def delete(self, session_id: str) -> SessionRecord:
        record = await self.abort(session_id)
        await self.store.delete(session_id)
        await self.history.clear(session_id)
        return record

    async def logs(self, session_id: str, follow: bool) -> AsyncIterator[events_pb2.Event]:
        """The session's events from its start; with follow, then new ones until the
        session ends or is deleted."""
        await self.get(session_id)
        async for event in bus.replay_events(self.store.nc, "trainer", session_id, follow=follow,
                                             final_statuses=frozenset(sessions.FINAL_STATES),
                                             find=lambda: self.store.find(session_id)):
            yield event

    async def _log(self, session_id: str, message: str) -> None:
        await self.events.publish(session_id, events_pb2.EVENT_KIND_LOG, {"level": "info", "message": message})


def _mark_aborted(record: SessionRecord) -> None:
    if not record.is_final:
        record.state, record.owner, record.eta_seconds = sessions.ABORTED, "", None

