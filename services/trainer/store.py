"""Where sessions live in NATS, so any trainer replica can answer for any session:

    KV bucket  trainer_sessions          one SessionRecord per session id
    stream     TRAINER_SESSIONS          work queue: one message per session to run
    subject    control.trainer.<id>      grant/abort requests to the replica running <id>
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import nats.js.errors

from services.common import jobs, tracing
from services.common.errors import AlreadyExists
from services.trainer.sessions import SessionRecord

BUCKET = "trainer_sessions"
QUEUE_STREAM = "TRAINER_SESSIONS"
QUEUE_SUBJECT = "jobs.trainer.sessions"
QUEUE_CONSUMER = "trainer-sessions"
# A session whose replica keeps crashing while loading or training is given up on.
MAX_DELIVER = 10


def control_subject(session_id: str) -> str:
    return f"control.trainer.{session_id}"


class SessionStore(jobs.RecordStore[SessionRecord]):
    record_type = SessionRecord
    bucket = BUCKET

    async def setup(self) -> None:
        self.kv = await jobs.key_value(self.js, BUCKET)
        # One delivery past the limit, so a replica sees it and records why the session failed.
        await jobs.work_queue(self.js, QUEUE_STREAM, QUEUE_SUBJECT, QUEUE_CONSUMER,
                              ack_wait=self.ack_wait, max_deliver=MAX_DELIVER + 1)

    async def create(self, record: SessionRecord) -> None:
        try:
            await self.kv.create(record.session_id, record.to_json())
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise AlreadyExists(f"session {record.session_id!r} already exists") from exc

    def not_found(self, key: str) -> str:
        return f"no session {key!r}"

    def control_subject(self, session_id: str) -> str:
        return control_subject(session_id)

    async def update(self, session_id: str, change: Callable[[SessionRecord], None]) -> SessionRecord:
        def stamped(record: SessionRecord) -> None:
            change(record)
            record.updated_at = time.time()

        return await super().update(session_id, stamped)

    async def delete(self, session_id: str) -> None:
        await self.kv.delete(session_id)

    async def list(self) -> list[SessionRecord]:
        return sorted(await self.all(), key=lambda r: r.created_at, reverse=True)

    async def enqueue(self, session_id: str) -> None:
        with tracing.publishing(QUEUE_SUBJECT) as headers:  # the runner's span continues this trace
            await self.js.publish(QUEUE_SUBJECT, json.dumps({"session_id": session_id}).encode(), headers=headers)

    async def pull_subscription(self):
        return await self.js.pull_subscribe(QUEUE_SUBJECT, durable=QUEUE_CONSUMER, stream=QUEUE_STREAM)
