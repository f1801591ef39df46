"""Runs sessions on this replica. Sessions to run arrive on the NATS work queue; a replica
takes one when it has room, keeps the message alive with in_progress() heartbeats while
the session lives, and acks it when the session ends. If the replica dies, the message
comes back and another replica (or this one, restarted) resumes the session from its
newest checkpoint. Grants and aborts reach the owning replica on its control subject.

This is where a step budget is enforced: a session trains while completed_steps <
allowed_steps, saves a checkpoint when the budget is used, and only then reports
"waiting" with the model still in memory for the next grant."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from loramesh.v1 import events_pb2
from services.common import jobs, logs, metrics
from services.common.bus import EventPublisher
from services.common.errors import ServiceError
from services.common.model_thread import ModelThread
from services.common.residency import Freed
from services.common.settings import Settings
from services.trainer import sessions
from services.trainer.engine import TrainingRun
from services.trainer.inputs import resolve_inputs
from services.trainer.job_config import parse_job_config
from services.trainer.loss_history import LossHistory
from services.trainer.sessions import SessionRecord
from services.trainer.store import MAX_DELIVER, SessionStore

log = logs.get(__name__)

RECHECK_S = 5.0  # a waiting session re-reads its record this often, in case a notice was missed


@dataclass
class Progress:
    """Speed over recent steps, for steps/s and the ETA."""

    seconds_per_step: float | None = None

    def add(self, seconds: float) -> None:
        self.seconds_per_step = seconds if self.seconds_per_step is None else 0.8 * self.seconds_per_step + 0.2 * seconds


class SessionRunner:
    def __init__(self, settings: Settings, store: SessionStore, events: EventPublisher, *, capacity: int,
                 history: LossHistory | None = None):
        self.settings = settings
        self.store = store
        self.events = events
        self.history = history
        self.capacity = capacity
        self.active: dict[str, ActiveSession] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pull_loop())

    async def _pull_loop(self) -> None:
        await jobs.pull_loop(self.store.pull_subscription, self._take, self._stopping,
                             has_room=lambda: len(self.active) < self.capacity)

    async def _take(self, msg) -> None:
        session_id = json.loads(msg.data)["session_id"]
        session = ActiveSession(self, session_id, msg)
        self.active[session_id] = session
        session.task = asyncio.get_running_loop().create_task(session.run())
        session.task.add_done_callback(lambda _, sid=session_id: self.active.pop(sid, None))

    async def stop(self) -> None:
        """On shutdown: each running session finishes its step, checkpoints and goes back
        to the queue for another replica."""
        self._stopping.set()
        if self._task:
            self._task.cancel()
        running = list(self.active.values())
        for session in running:
            session.hand_back()
        tasks = [s.task for s in running if s.task]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)

    async def free_memory(self) -> list[Freed]:
        """Unloads the models of waiting sessions (their checkpoints are on disk; the next
        grant reloads from them). Training sessions keep theirs."""
        freed = []
        for session in list(self.active.values()):
            result = await session.unload_if_waiting()
            if result:
                freed.append(result)
        return freed


class ActiveSession:
    def __init__(self, runner: SessionRunner, session_id: str, msg, store=None):
        self.runner = runner
        # The session records it drives: the sessions bucket, or the sessions inside training tasks.
        self.store = store or runner.store
        self.session_id = session_id
        self.msg = msg
        self.engine: TrainingRun | None = None
        self.wake = asyncio.Event()
        self.abort_requests: list = []
        self.handing_back = False
        self.state = ""
        self.progress = Progress()
        self.taken_at = time.time()  # when this replica took the session (its job duration here)
        self._lock = asyncio.Lock()  # one engine call at a time (steps, saves, unloads)
        self._events: asyncio.Queue = asyncio.Queue()
        self._event_loop = asyncio.get_running_loop()
        self.task: asyncio.Task | None = None
        self._thread = ModelThread(f"session-{session_id}")  # every engine call runs here

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        publisher = loop.create_task(self._publish_events())
        heartbeat = loop.create_task(self._heartbeat())
        control = None
        finished = True
        try:
            control = await self.store.nc.subscribe(self.store.control_subject(self.session_id), cb=self._on_control)
            record = await self._prepare()
            if record is None:
                finished = not self.handing_back
                return
            finished = await self._drive(record)
        except Exception as exc:
            log.exception("session failed", session_id=self.session_id)
            await self._finish(sessions.FAILED, str(exc) if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}")
        finally:
            await self._release()
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                for request in self.abort_requests:
                    await request.respond(b"{}")
            await self._after_end()
            heartbeat.cancel()
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await (self.msg.ack() if finished else self.msg.nak())
                if control is not None:
                    await control.unsubscribe()
            self._thread.close()
            await self._events.put(None)
            await publisher

    async def _after_end(self) -> None:
        """Work after the session has ended and its aborts are answered, while the message
        is still held (nothing for a plain session)."""

    async def _prepare(self) -> SessionRecord | None:
        """The record to drive, now owned by this replica; None when there is nothing to run."""
        record = await self.store.find(self.session_id)
        if record is None or record.is_final:
            return None
        if self.msg.metadata.num_delivered > MAX_DELIVER:
            await self._finish(sessions.FAILED, f"gave up after {MAX_DELIVER} attempts to run the session")
            return None
        return await self._update(lambda r: setattr(r, "owner", self.runner.settings.replica))

    async def _drive(self, record: SessionRecord) -> bool:
        """Trains budget after budget until the session ends; False when handed back."""
        job = parse_job_config(record.config)
        while True:
            self.wake.clear()  # before reading, so a notice sent after the read wakes the wait below
            record = await self.store.find(self.session_id)
            if record is None:
                return True  # deleted
            if self.handing_back:
                await self._save_if_needed()
                await self._update(lambda r: (setattr(r, "owner", ""), setattr(r, "state", sessions.LOADING),
                                              setattr(r, "memory_bytes", None)))
                return False
            if record.abort_requested:
                await self._save_if_needed()
                await self._finish(sessions.ABORTED, "")
                return True
            if self.engine is None and (record.allowed_steps > record.completed_steps or self.state == ""):
                await self._load(job, record)
                continue
            if self.engine is not None and self.engine.step >= record.max_steps:
                await self._save_if_needed()
                await self._finish(sessions.COMPLETED, "")
                return True
            if self.engine is not None and self.engine.step < record.allowed_steps:
                await self._train_until(record.allowed_steps)
                continue
            await self._save_if_needed()
            if self.state != sessions.WAITING:
                await self._set_state(sessions.WAITING, f"waiting for steps at step "
                                      f"{self.engine.step if self.engine else record.completed_steps}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), RECHECK_S)

    async def _load(self, job, record: SessionRecord) -> None:
        await self._set_state(sessions.LOADING, f"loading the model for session {self.session_id}")
        inputs = resolve_inputs(job, self.runner.settings)
        engine = TrainingRun(job, inputs, max_steps=record.max_steps, log=self._log_from_thread)
        async with self._lock:
            await self._thread.run(engine.load)
            nbytes = await self._thread.run(engine.memory_bytes)
        self.engine = engine
        checkpoint = engine.last_checkpoint

        def loaded(r: SessionRecord) -> None:
            r.completed_steps = engine.step
            r.device = str(engine.device)
            r.memory_bytes = float(nbytes)
            r.notes = list(engine.notes)
            if checkpoint:
                r.last_checkpoint_step, r.last_checkpoint_path = checkpoint.step, str(checkpoint.path)

        await self._update(loaded)

    async def _train_until(self, allowed: int) -> None:
        engine = self.engine
        process = engine.process
        sample = process.sample if not process.train.disable_sampling else None
        if engine.step == 0 and sample and not process.train.skip_first_sample:
            await self._sample()  # the baseline the later samples compare against
        await self._set_state(sessions.TRAINING, f"training steps {engine.step + 1}-{allowed}")
        while engine.step < allowed:
            if self.handing_back:
                return
            if self.wake.is_set():
                # A grant or an abort arrived: the record says which.
                self.wake.clear()
                record = await self.store.find(self.session_id)
                if record is None or record.abort_requested:
                    return
                allowed = max(allowed, record.allowed_steps)
            async with self._lock:
                result = await self._thread.run(engine.train_step)
            self.progress.add(result.seconds)
            metrics.STEPS.labels("trainer", "session").inc()
            step = result.step
            if step % process.logging.log_every == 0:
                await self._record_loss(result)
            if step % process.performance_log_every == 0 or step == allowed:
                await self._report(result, allowed)
            if step % process.save.save_every == 0:
                await self._save()
            if sample and step % sample.sample_every == 0:
                await self._sample()
        await self._save_if_needed()

    # ---- checkpoints and samples -------------------------------------------------------

    async def _save(self) -> None:
        async with self._lock:
            checkpoint = await self._thread.run(self.engine.save_checkpoint)
            nbytes = await self._thread.run(self.engine.memory_bytes)  # optimizer state included by now

        def saved(r: SessionRecord) -> None:
            r.last_checkpoint_step, r.last_checkpoint_path = checkpoint.step, str(checkpoint.path)
            r.completed_steps = checkpoint.step
            r.memory_bytes = float(nbytes)

        await self._update(saved)

    async def _save_if_needed(self) -> None:
        engine = self.engine
        if engine is not None and engine.step > 0 and (engine.last_checkpoint is None
                                                        or engine.last_checkpoint.step < engine.step):
            await self._save()

    async def _sample(self) -> None:
        async with self._lock:
            images = await self._thread.run(self.engine.sample)
        if not images:
            return
        await self._update(lambda r: r.samples.extend(
            sessions.Sample(i.step, i.prompt, str(i.path)) for i in images))
        for image in images:
            self._emit(events_pb2.EVENT_KIND_PREVIEW, "info", f"sample written: {image.path}", image.step,
                       path=str(image.path), prompt=image.prompt)

    # ---- control -----------------------------------------------------------------------

    async def _on_control(self, msg) -> None:
        # The record says what changed; an abort is answered once the session has ended.
        if json.loads(msg.data or b"{}").get("action") == "abort" and msg.reply:
            self.abort_requests.append(msg)
        self.wake.set()

    def hand_back(self) -> None:
        self.handing_back = True
        self.wake.set()

    async def unload_if_waiting(self) -> Freed | None:
        async with self._lock:
            if self.state != sessions.WAITING or self.engine is None:
                return None
            engine, self.engine = self.engine, None
            nbytes, device = engine.memory_bytes(), str(engine.device)
            await self._thread.run(engine.close)
        self.state = ""
        with contextlib.suppress(Exception):
            await self._update(lambda r: setattr(r, "memory_bytes", None))
        await self._set_state(sessions.WAITING, "model unloaded to free memory; the next grant reloads it from "
                                                "the last checkpoint")
        return Freed(f"session {self.session_id}", device, nbytes, "unloaded")

    async def _release(self) -> None:
        metrics.forget_session(self.session_id)
        engine, self.engine = self.engine, None
        if engine is not None:
            async with self._lock:
                await self._thread.run(engine.close)

    # ---- record and events -------------------------------------------------------------

    async def _update(self, change) -> SessionRecord:
        return await self.store.update(self.session_id, change)

    async def _set_state(self, state: str, message: str) -> None:
        previous, self.state = self.state, state

        def change(r: SessionRecord) -> None:
            r.state = state
            if state != sessions.TRAINING:
                r.eta_seconds = None
            if self.engine is not None:
                r.completed_steps = self.engine.step

        with contextlib.suppress(Exception):
            await self._update(change)
        self._emit(events_pb2.EVENT_KIND_STATUS, "info", message, self.engine.step if self.engine else None,
                   status=state, previous_status=previous)

    async def _finish(self, state: str, error: str) -> None:
        def change(r: SessionRecord) -> None:
            r.state, r.error, r.owner, r.eta_seconds, r.memory_bytes = state, error, "", None, None
            if self.engine is not None:
                r.completed_steps = self.engine.step

        with contextlib.suppress(Exception):
            await self._update(change)
        previous, self.state = self.state, state
        metrics.observe_job("trainer", "session", state, self.taken_at)
        message = f"session {state}" + (f": {error}" if error else "")
        self._emit(events_pb2.EVENT_KIND_STATUS, "error" if error else "info", message,
                   self.engine.step if self.engine else None, status=state, previous_status=previous, error=error)

    async def _report(self, result, allowed: int) -> None:
        rate = 1 / self.progress.seconds_per_step if self.progress.seconds_per_step else None
        if rate:
            metrics.STEPS_PER_SECOND.labels(self.session_id).set(rate)
        eta = (allowed - result.step) * self.progress.seconds_per_step if self.progress.seconds_per_step else None

        def change(r: SessionRecord) -> None:
            r.completed_steps, r.loss, r.learning_rate = result.step, result.loss, result.learning_rate
            r.steps_per_second, r.eta_seconds = rate, eta

        await self._update(change)
        self._emit(events_pb2.EVENT_KIND_PROGRESS, "info",
                   f"step {result.step}/{allowed}: loss {result.loss:.4f}, lr {result.learning_rate:.3g}"
                   + (f", {rate:.2f} steps/s" if rate else ""),
                   result.step, total=allowed, loss=result.loss, learning_rate=result.learning_rate,
                   steps_per_second=rate, eta_seconds=eta)

    async def _record_loss(self, result) -> None:
        if self.runner.history is None:
            return
        try:
            await self.runner.history.append(self.session_id, result.step, result.loss, result.learning_rate)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("loss point not recorded", session_id=self.session_id, error=str(exc))

    def _log_from_thread(self, level: str, message: str) -> None:
        """The engine's log lines, from its worker thread, onto the events stream in order."""
        step = self.engine.step if self.engine else None
        self._event_loop.call_soon_threadsafe(self._emit, events_pb2.EVENT_KIND_LOG, level, message, step)

    def _emit(self, kind: int, level: str, message: str, step: int | None, **data) -> None:
        payload = {"level": level, "message": message, **{k: v for k, v in data.items() if v is not None}}
        if step is not None:
            payload["step"] = step
        log.info(message, session_id=self.session_id, level_name=level)
        self._events.put_nowait((kind, payload))

    async def _publish_events(self) -> None:
        while (item := await self._events.get()) is not None:
            kind, payload = item
            try:
                await self.runner.events.publish(self.session_id, kind, payload)
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("event not published", error=str(exc))

    async def _heartbeat(self) -> None:
        interval = max(0.5, self.store.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.msg.in_progress()
