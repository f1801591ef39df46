"""Where training tasks and finetunes live in NATS, so any trainer replica can answer for
any task and run any waiting one, highest priority first:

    KV bucket  trainer_tasks                one TaskRecord per task id
    stream     TRAINER_TASKS                work queue, one subject per priority level:
               jobs.trainer.tasks.p<N>      N = 0..9, a durable consumer each
    subject    control.trainer.task.<id>    cancel requests to the replica running <id>

A replica with room asks the consumers from priority 9 down and takes the first waiting
message, so a higher level always goes first and, within one level, the stream's order is
arrival order. A task whose priority changes gets a new message at its new level; the old
one is dropped when it comes up (the record no longer names its level).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors

from services.common import jobs, tracing
from services.trainer.sessions import SessionRecord
from services.trainer.store import MAX_DELIVER
from services.trainer.tasks import MAX_PRIORITY, MIN_PRIORITY, TaskRecord

BUCKET = "trainer_tasks"
QUEUE_STREAM = "TRAINER_TASKS"
PRIORITIES = range(MAX_PRIORITY, MIN_PRIORITY - 1, -1)  # the order a replica looks in


def queue_subject(priority: int) -> str:
    return f"jobs.trainer.tasks.p{priority}"


def consumer_name(priority: int) -> str:
    return f"trainer-tasks-p{priority}"


def control_subject(task_id: str) -> str:
    return f"control.trainer.task.{task_id}"


class TaskStore(jobs.RecordStore[TaskRecord]):
    record_type = TaskRecord
    bucket = BUCKET

    async def setup(self) -> None:
        self.kv = await jobs.key_value(self.js, BUCKET)
        for priority in PRIORITIES:
            await jobs.work_queue(self.js, QUEUE_STREAM, "jobs.trainer.tasks.*", consumer_name(priority),
                                  ack_wait=self.ack_wait, max_deliver=MAX_DELIVER + 1,
                                  filter_subject=queue_subject(priority))
        self._subscriptions: dict[int, object] = {}

    def not_found(self, key: str) -> str:
        return f"no training task {key!r}"

    async def create(self, record: TaskRecord) -> None:
        await self.kv.create(record.id, record.to_json())

    async def update(self, task_id: str, change: Callable[[TaskRecord], None]) -> TaskRecord:
        def stamped(record: TaskRecord) -> None:
            change(record)
            record.updated_at = time.time()

        return await super().update(task_id, stamped)

    async def delete(self, task_id: str) -> None:
        await self.kv.delete(task_id)

    async def list(self, owner: str) -> list[TaskRecord]:
        return sorted((r for r in await self.all() if r.owner == owner), key=lambda r: r.created_at, reverse=True)

    async def enqueue(self, record: TaskRecord) -> int:
        """Queues the task at its priority; the stream sequence is the id of the queued work."""
        subject = queue_subject(record.priority)
        with tracing.publishing(subject) as headers:  # the runner's span continues this trace
            ack = await self.js.publish(subject, json.dumps({"task_id": record.id, "priority": record.priority}).encode(),
                                        headers=headers)
        return ack.seq

    async def next_waiting(self, timeout: float):
        """The oldest waiting message of the highest priority level that has one, or None.
        A level counts as waiting when it holds undelivered messages or delivered ones not
        acknowledged yet (those of a dead replica come back once their ack_wait lapses)."""
        for priority in PRIORITIES:
            info = await self.js.consumer_info(QUEUE_STREAM, consumer_name(priority))
            if info.num_pending == 0 and info.num_ack_pending == 0:
                continue
            subscription = self._subscriptions.get(priority)
            if subscription is None:
                subscription = await self.js.pull_subscribe(queue_subject(priority), durable=consumer_name(priority),
                                                            stream=QUEUE_STREAM)
                self._subscriptions[priority] = subscription
            try:
                # Short when the level only holds messages other replicas are running.
                messages = await subscription.fetch(1, timeout=timeout if info.num_pending else 0.2)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            if messages:
                return messages[0]
        return None

    def forget_subscriptions(self) -> None:
        self._subscriptions = {}

    async def ring(self):
        """A subscription that hears every task queued, so an idle replica looks at once."""
        return await self.nc.subscribe("jobs.trainer.tasks.*")


class TaskSessions:
    """The session store the session runner drives, over the session inside a task record:
    the runner reads and changes the session; the task follows its progress in the same
    compare-and-set, with the log lines gathered since the last change."""

    def __init__(self, tasks: TaskStore):
        self.tasks = tasks
        self.nc = tasks.nc
        self.ack_wait = tasks.ack_wait
        self.pending_lines: list[tuple[float, str]] = []

    def control_subject(self, task_id: str) -> str:
        return control_subject(task_id)

    async def find(self, task_id: str) -> SessionRecord | None:
        task = await self.tasks.find(task_id)
        return task.session if task is not None else None

    async def update(self, task_id: str, change: Callable[[SessionRecord], None]) -> SessionRecord:
        lines, self.pending_lines = self.pending_lines, []

        def apply(task: TaskRecord) -> None:
            change(task.session)
            task.session.updated_at = time.time()
            for at, line in lines:
                task.log(line, at)
            task.follow_session()

        try:
            return (await self.tasks.update(task_id, apply)).session
        except BaseException:
            self.pending_lines[:0] = lines
            raise


def is_nats_error(exc: BaseException) -> bool:
    return isinstance(exc, (nats.errors.Error, nats.js.errors.Error))
