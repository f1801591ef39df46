"""Runs training tasks and finetunes on this replica, highest priority first. A task's
message stays unacknowledged (with heartbeats) for the task's whole life: preprocessing,
then training as a session with its whole budget granted (the session runner's own code:
checkpoints, samples, resume), then the final LoRA, then the webhook. A replica that dies
leaves the message to another, which skips finished preprocessing and resumes training
from the newest checkpoint. Tasks and sessions share the replica's capacity."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import nats.errors
import nats.js.errors

from services.common import logs, tracing
from services.common.devices import pick_device
from services.common.errors import InvalidInput, ServiceError, Violations
from services.common.hub import is_repo_id
from services.common.media import resolve_path
from services.trainer import preprocess, sessions, tasks, webhooks
from services.trainer.job_config import parse_job_config
from services.trainer.runner import ActiveSession, SessionRunner
from services.trainer.sessions import SessionRecord
from services.trainer.store import MAX_DELIVER
from services.trainer.task_store import TaskSessions, TaskStore
from services.trainer.tasks import TaskRecord
from services.trainer.transforms import parse_transforms

log = logs.get(__name__)

IDLE_LOOK_S = 2.0  # an idle replica looks at the queue this often even when no new task rang


class TaskRunner:
    def __init__(self, sessions_runner: SessionRunner, store: TaskStore):
        self.sessions = sessions_runner
        self.settings = sessions_runner.settings
        self.store = store
        self._stopping = asyncio.Event()
        self._rung = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pull_loop())

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            self._task.cancel()

    def _has_room(self) -> bool:
        return len(self.sessions.active) < self.sessions.capacity

    async def _pull_loop(self) -> None:
        bell = None
        while not self._stopping.is_set():
            try:
                if bell is None:
                    bell = await self.store.ring()
                    bell._cb = None
                if not self._has_room():
                    await asyncio.sleep(0.2)
                    continue
                msg = await self.store.next_waiting(timeout=1.0)
                if msg is None:
                    with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                        await bell.next_msg(timeout=IDLE_LOOK_S)
                    continue
                with tracing.processing(msg):  # a child of the span that queued the task
                    await self._take(msg)
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("task queue unavailable", error=str(exc))
                bell = None
                self.store.forget_subscriptions()
                await asyncio.sleep(1.0)

    async def _take(self, msg) -> None:
        body = json.loads(msg.data)
        task_id = body["task_id"]
        key = f"task:{task_id}"
        if key in self.sessions.active:
            return  # a redelivery of a task this replica still runs; its heartbeats carry on
        run = TaskSession(self, task_id, msg, int(body.get("priority", -1)))
        self.sessions.active[key] = run
        run.task = asyncio.get_running_loop().create_task(run.run())
        run.task.add_done_callback(lambda _, k=key: self.sessions.active.pop(k, None))


class TaskSession(ActiveSession):
    """One task on this replica: the session runner's ActiveSession, with preprocessing
    before the session and the final LoRA and webhook after it."""

    def __init__(self, runner: TaskRunner, task_id: str, msg, queued_priority: int):
        super().__init__(runner.sessions, task_id, msg, store=TaskSessions(runner.store))
        self.tasks = runner.store
        self.settings = runner.settings
        self.queued_priority = queued_priority
        self.cancel_seen = False
        self.ended = False  # the task reached a final status here: its webhook is due

    # ---- before training ---------------------------------------------------------------

    async def _prepare(self) -> SessionRecord | None:
        task = await self.tasks.find(self.session_id)
        if task is None or task.is_final or task.priority != self.queued_priority:
            return None  # gone, over, or queued again at another priority
        if task.cancel_requested:
            await self._end_task(tasks.CANCELLED, None)
            return None
        if self.msg.metadata.num_delivered > MAX_DELIVER:
            await self._end_task(tasks.FAILED, f"gave up after {MAX_DELIVER} attempts to run the task")
            return None
        try:
            task = await self.tasks.update(self.session_id, self._claimed)
        except _NotOurs:
            return None
        if task.preprocessing_completed_at is None:
            task = await self._preprocess(task)
            if task is None:
                return None
        if task.session is None:
            task = await self.tasks.update(self.session_id, self._with_session)
        return await self._update(lambda r: setattr(r, "owner", self.settings.replica))

    def _claimed(self, task: TaskRecord) -> None:
        """Claims the task for this message, inside the compare-and-set: a message queued
        before a priority change (or a newer copy of the task's message) leaves it to the
        newer one, and one message runs a task at a time (a redelivery of it may resume)."""
        sequence = self.msg.metadata.sequence.stream
        if (task.is_final or task.priority != self.queued_priority
                or (task.queue_sequence is not None and sequence < task.queue_sequence)
                or (task.runner and task.claimed_sequence not in (None, sequence))):
            raise _NotOurs
        task.runner, task.claimed_sequence = self.settings.replica, sequence
        task.started_at = task.started_at or time.time()
        task.log(f"started on {self.settings.replica}"
                 + (f" (attempt {self.msg.metadata.num_delivered})" if self.msg.metadata.num_delivered > 1 else ""))

    async def _preprocess(self, task: TaskRecord) -> TaskRecord | None:
        plan = preprocess.CaptionPlan(strategy=task.preprocessing_captioning_strategy,
                                      prompt=task.preprocessing_captioning_prompt, trigger_word=task.trigger_word)
        bad = Violations()
        transforms = parse_transforms(task.preprocessing_transforms, bad)
        bad.raise_if_any()

        def started(r: TaskRecord) -> None:
            r.status, r.preprocessing_started_at = tasks.PREPROCESSING, time.time()
            r.log(f"preprocessing: captions by strategy {plan.strategy}"
                  + (f" with prompt {plan.prompt!r}" if plan.prompt else ""))

        await self.tasks.update(self.session_id, started)

        async def report(stage: str, processed: int, total: int, message: str) -> None:
            def change(r: TaskRecord) -> None:
                if r.preprocessing_stage != stage:
                    r.log(f"preprocessing stage: {stage}")
                r.preprocessing_stage, r.processed_files_count, r.total_files_count = stage, processed, total
                if message:
                    r.log(message)

            await self.tasks.update(self.session_id, change)

        sources = [str(task.upload_dir)] if task.kind == "finetune" else task.source_images
        captioner = preprocess.CaptionerClient(self.settings.captioner_address)
        try:
            result = await preprocess.preprocess_sources(
                sources, task.dataset_dir, transforms, plan, captioner, self.settings, report,
                lambda: self.cancel_seen or self.handing_back)
        except preprocess.Cancelled:
            if not self.handing_back:
                await self._end_task(tasks.CANCELLED, None)
            return None
        finally:
            await captioner.close()

        def done(r: TaskRecord) -> None:
            r.preprocessing_stage, r.preprocessing_completed_at = "completed", time.time()
            r.processed_dataset_path = str(result.dataset_path)
            r.processed_files_count = r.total_files_count = result.images
            r.log(f"preprocessing completed: {result.images} images, {result.captioned} captioned by "
                  f"{result.strategy}, {result.captions_kept} captions kept from the source")

        return await self.tasks.update(self.session_id, done)

    def _with_session(self, task: TaskRecord) -> None:
        local = None if is_repo_id(task.base_model_path) else resolve_path(
            task.base_model_path, self.settings.model_roots, "base_model_path")
        arch = tasks.model_family_id(task.base_model_path, local)
        if arch is None:
            raise InvalidInput("base_model_path", f"cannot tell which model family {task.base_model_path!r} is")
        source = str(local) if local is not None else task.base_model_path
        task.local_model_path = str(local) if local is not None else None
        job = parse_job_config(tasks.job_config(task, arch, source, str(pick_device(self.settings.device))))
        task.session = SessionRecord(session_id=task.id, name=job.name, config=job.to_dict(), max_steps=task.steps,
                                     training_folder=task.training_folder, allowed_steps=task.steps)
        task.status = tasks.TRAINING
        task.log(f"training {task.training_type} on {arch} ({source}): {task.steps} steps, rank {task.rank}, "
                 f"learning rate {task.learning_rate:g}")

    def _emit(self, kind: int, level: str, message: str, step: int | None, **data) -> None:
        """The session's events go into the task's log (written with its next change)."""
        super()._emit(kind, level, message, step, **data)
        self.store.pending_lines.append((time.time(), message if level == "info" else f"{level}: {message}"))

    async def _publish_events(self) -> None:
        # Not on the events stream: its WebSocket bridge shows every event to every client,
        # and a task is its owner's alone. The task's log holds them.
        while await self._events.get() is not None:
            pass

    # ---- control -----------------------------------------------------------------------

    async def _on_control(self, msg) -> None:
        if json.loads(msg.data or b"{}").get("action") == "abort":
            self.cancel_seen = True
        await super()._on_control(msg)

    # ---- the end -----------------------------------------------------------------------

    async def _finish(self, state: str, error: str) -> None:
        """The session's end is the task's: keep the final LoRA of a completed run, record the
        outcome, then announce it."""
        if state == sessions.COMPLETED and self.engine is not None:
            try:
                async with self._lock:
                    outputs = await self._thread.run(self.engine.save_final)
            except Exception as exc:  # a failure to write the result fails the task
                log.exception("final save failed", task_id=self.session_id)
                state, error = sessions.FAILED, f"writing the result failed: {type(exc).__name__}: {exc}"
            else:
                def saved(r: TaskRecord) -> None:
                    r.output_lora_path = str(outputs.lora)
                    r.output_full_weights_path = str(outputs.full_weights) if outputs.full_weights else None
                    r.log(f"result: LoRA {outputs.lora}"
                          + (f", full weights {outputs.full_weights}" if outputs.full_weights else ""))

                await self.tasks.update(self.session_id, saved)
        task = await self.tasks.find(self.session_id)
        if task is not None and task.session is None:
            await self._end_task(tasks.SESSION_OUTCOMES[state], error or None)
            return
        await super()._finish(state, error)
        self.ended = True

    async def _end_task(self, status: str, error: str | None) -> None:
        """Ends a task that never reached training (cancelled or failed while waiting or
        preprocessing)."""
        def change(r: TaskRecord) -> None:
            if r.is_final:
                return
            r.status, r.error_message, r.runner = status, error, ""
            r.completed_at = time.time()
            r.log(f"task {status.lower()}" + (f": {error}" if error else ""))

        with contextlib.suppress(ServiceError):
            await self.tasks.update(self.session_id, change)
        self.ended = True

    async def _after_end(self) -> None:
        # After a cancel is answered (its caller does not wait for the receiver), with the
        # message still held.
        if self.ended:
            await announce(self.tasks, self.session_id, self.settings)


async def announce(store: TaskStore, task_id: str, settings) -> None:
    """Posts a final task to its webhook once per final status: the delivery is claimed in
    the record first, so one replica sends it, and its outcome is recorded after."""
    task = await store.find(task_id)
    if task is None or not task.is_final or not task.webhook_url:
        return
    event = task.status
    if any(d.get("event") == event for d in task.webhooks):
        return

    def claim(r: TaskRecord) -> None:
        if any(d.get("event") == event for d in r.webhooks):
            raise _AlreadyClaimed
        r.webhooks.append({"event": event, "delivered": False, "attempts": 0, "status_code": None,
                           "error": "sending", "delivered_at": None})

    try:
        task = await store.update(task_id, claim)
    except _AlreadyClaimed:
        return
    body = json.dumps(tasks.task_document(task)).encode()
    limits, trainer = settings.media, settings.trainer
    outcome = await webhooks.deliver(
        task.webhook_url, body, event=event, delivery_id=f"{task_id}:{event}", secret=trainer.webhook_secret,
        limits=limits, attempts=trainer.webhook_attempts, backoff_s=trainer.webhook_backoff_s,
        timeout_s=trainer.webhook_timeout_s)

    def recorded(r: TaskRecord) -> None:
        r.webhooks = [outcome.to_dict() if d.get("event") == event else d for d in r.webhooks]
        r.log(f"webhook {event}: " + ("delivered" if outcome.delivered else f"not delivered ({outcome.error})")
              + f" after {outcome.attempts} attempt(s)")

    await store.update(task_id, recorded)


class _AlreadyClaimed(Exception):
    pass


class _NotOurs(Exception):
    pass
