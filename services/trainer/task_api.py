"""What the training-task and finetune routes do, on any replica: check a request in full,
create the task record and queue it at its priority, and read, cancel and reprioritise a
caller's own tasks. A caller sees only the tasks it created: another caller's id is as
unknown as an id that never existed."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nats.errors

from services.common import media
from services.common.errors import FailedPrecondition, InvalidInput, NotFound, Violations
from services.common.hub import is_repo_id
from services.common.settings import Settings
from services.trainer import intake, preprocess, tasks
from services.trainer.task_runner import announce
from services.trainer.task_store import TaskStore, control_subject
from services.trainer.tasks import TaskRecord
from services.trainer.transforms import parse_transforms
from services.trainer.webhooks import check_webhook_url

DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 10, 1000
MAX_STEPS = 100_000
MAX_SAMPLE_PROMPTS = 16
# seed 002 bounds.
MIN_ITERATIONS, MAX_ITERATIONS, DEFAULT_ITERATIONS = 100, 1000, 300
MIN_FINETUNE_LR, MAX_FINETUNE_LR = 1e-6, 5e-3
# A finetune checkpoints this often, so a stopped trainer loses little of it.
FINETUNE_SAVE_EVERY = 100


@dataclass
class TrainingTaskRequest:
    """A /api/v1/training/ create request; None is "not given" (the document's null)."""

    trigger_word: str | None = None
    training_type: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    rank: int | None = None
    steps: int | None = None
    learning_rate: float | None = None
    sample_prompts: list[str] | None = None
    source_images: list[str] | None = None
    base_model_path: str | None = None
    bypass_guidance_embedding: bool | None = None
    webhook_url: str | None = None
    origin_instance: str | None = None
    origin_zone: str | None = None
    origin_version: str | None = None
    origin_tenant_id: str | None = None
    preprocessing_transforms: list[dict] | None = None
    preprocessing_captioning_strategy: str | None = None
    preprocessing_captioning_prompt: str | None = None
    priority: int | None = None
    save_every: int | None = None


@dataclass
class FinetuneRequest:
    """A /v1/finetune request; None is "not given"."""

    file_data: str = ""
    finetune_comment: str | None = None
    trigger_word: str | None = None
    mode: str | None = None
    iterations: int | None = None
    learning_rate: float | None = None
    captioning: bool | None = None
    priority: str | None = None
    finetune_type: str | None = None
    lora_rank: int | None = None


def _default(value, fallback):
    return fallback if value is None else value


class TaskAPI:
    def __init__(self, settings: Settings, store: TaskStore):
        self.settings = settings
        self.store = store
        self._sending: set[asyncio.Task] = set()

    # ---- /api/v1/training/ ---------------------------------------------------------------

    async def create(self, owner: str, request: TrainingTaskRequest) -> TaskRecord:
        bad = Violations()
        trigger = tasks.check_trigger_word(bad, "trigger_word", request.trigger_word)
        training_type = bad.choice("training_type", _default(request.training_type, "LORA"), tasks.TRAINING_TYPES)
        entity_type = bad.choice("entity_type", _default(request.entity_type, "PRODUCT"), tasks.ENTITY_TYPES)
        entity_id = tasks.check_entity_id(bad, request.entity_id)
        rank = bad.integer("rank", _default(request.rank, 16), low=1, high=1024)
        steps = bad.integer("steps", _default(request.steps, 1000), low=1, high=MAX_STEPS)
        save_every = bad.integer("save_every", _default(request.save_every, 2000), low=1, high=MAX_STEPS)
        learning_rate = bad.number("learning_rate", _default(request.learning_rate, 1e-4), low=0, high=1)
        bad.require(learning_rate is None or learning_rate > 0, "learning_rate", "must be greater than 0")
        prompts = _default(request.sample_prompts, [])
        bad.require(len(prompts) <= MAX_SAMPLE_PROMPTS, "sample_prompts",
                    f"must hold at most {MAX_SAMPLE_PROMPTS} prompts (got {len(prompts)})")
        for i, prompt in enumerate(prompts):
            tasks.check_text(bad, f"sample_prompts[{i}]", prompt, required=True)
        sources = _default(request.source_images, [])
        preprocess.check_sources(sources, self.settings, bad)
        base_model = self._check_base_model(bad, _default(request.base_model_path, self.settings.trainer.base_model))
        webhook_url = _default(request.webhook_url, "")
        if webhook_url:
            _check_webhook(bad, webhook_url, self.settings)
        origins = {name: tasks.check_text(bad, name, getattr(request, name), limit=200)
                   for name in ("origin_instance", "origin_zone", "origin_version", "origin_tenant_id")}
        transforms = request.preprocessing_transforms
        parse_transforms(transforms, bad)
        strategy, prompt = preprocess.check_captioning(request.preprocessing_captioning_strategy,
                                                       request.preprocessing_captioning_prompt, bad)
        priority = bad.integer("priority", _default(request.priority, tasks.DEFAULT_PRIORITY),
                               low=tasks.MIN_PRIORITY, high=tasks.MAX_PRIORITY)
        bad.raise_if_any()
        task_id = tasks.new_task_id()
        record = TaskRecord(
            id=task_id, owner=owner, trigger_word=trigger, training_folder=str(self._task_dir(task_id) / "training"),
            training_type=training_type, entity_type=entity_type, entity_id=entity_id, rank=rank, steps=steps,
            learning_rate=learning_rate, sample_prompts=list(prompts), source_images=list(sources),
            base_model_path=base_model, bypass_guidance_embedding=bool(request.bypass_guidance_embedding),
            webhook_url=webhook_url, origin_instance=origins["origin_instance"] or "unknown",
            origin_zone=origins["origin_zone"], origin_version=origins["origin_version"],
            origin_tenant_id=origins["origin_tenant_id"], preprocessing_transforms=transforms,
            preprocessing_captioning_strategy=strategy, preprocessing_captioning_prompt=prompt, priority=priority,
            save_every=save_every,
        )
        record.log(f"task created: {training_type} on {base_model}, {len(sources)} source images, "
                   f"priority {priority}")
        return await self._queue(record)

    async def list(self, owner: str, skip: int | None = None, limit: int | None = None) -> list[TaskRecord]:
        bad = Violations()
        skip = bad.integer("skip", _default(skip, 0), low=0)
        limit = bad.integer("limit", _default(limit, DEFAULT_LIST_LIMIT), low=1, high=MAX_LIST_LIMIT)
        bad.raise_if_any()
        return (await self.store.list(owner))[skip:skip + limit]

    async def get(self, owner: str, task_id: str) -> TaskRecord:
        key = tasks.task_key(task_id)
        task = await self.store.find(key) if key else None
        if task is None or task.owner != owner:
            raise NotFound(f"no training task {task_id[:100]!r}")
        return task

    async def cancel(self, owner: str, task_id: str) -> TaskRecord:
        """Asks the replica running the task to stop (training saves its checkpoint first); a
        task no replica runs is cancelled here."""
        task = await self.get(owner, task_id)
        if task.is_final:
            raise FailedPrecondition(f"training task {task.id} is already {task.status}")

        def requested(r: TaskRecord) -> None:
            r.cancel_requested = True
            if r.session is not None:
                r.session.abort_requested = True
            r.log("cancel requested")

        task = await self.store.update(task.id, requested)
        if task.runner:
            try:
                await self.store.nc.request(control_subject(task.id), json.dumps({"action": "abort"}).encode(),
                                            timeout=self.settings.trainer.abort_timeout_s)
                return await self.store.get(task.id)
            except nats.errors.NoRespondersError:
                pass  # its replica is gone: cancelled here
            except nats.errors.TimeoutError:
                return await self.store.get(task.id)  # still saving; it ends CANCELLED

        def cancelled(r: TaskRecord) -> None:
            if not r.is_final:
                r.status, r.runner, r.eta_seconds = tasks.CANCELLED, "", None
                r.completed_at = r.completed_at or r.updated_at
                r.log("task cancelled")

        task = await self.store.update(task.id, cancelled)
        # Sent in the background: the caller does not wait for the receiver and its retries.
        sending = asyncio.get_running_loop().create_task(announce(self.store, task.id, self.settings))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)
        return task

    async def set_priority(self, owner: str, task_id: str, priority: int | None) -> TaskRecord:
        bad = Violations()
        bad.require(priority is not None, "priority", f"is required: {tasks.MIN_PRIORITY} (lowest) to "
                                                      f"{tasks.MAX_PRIORITY} (highest)")
        bad.raise_if_any()
        task = await self.get(owner, task_id)
        changed = []

        def change(r: TaskRecord) -> None:
            changed[:] = [r.set_priority(priority)]

        task = await self.store.update(task.id, change)
        if changed[0] and task.status == tasks.PENDING and not task.runner:
            # The old message is dropped when it comes up: the record names the new level.
            sequence = await self.store.enqueue(task)
            task = await self.store.update(task.id, lambda r: setattr(r, "queue_sequence", sequence))
        return task

    # ---- /v1/finetune ---------------------------------------------------------------------

    async def create_finetune(self, owner: str, request: FinetuneRequest) -> TaskRecord:
        bad = Violations()
        comment = tasks.check_text(bad, "finetune_comment", request.finetune_comment, required=True)
        trigger = tasks.check_trigger_word(bad, "trigger_word", _default(request.trigger_word, "TOK"))
        mode = bad.choice("mode", request.mode, tasks.FINETUNE_MODES) if request.mode is not None else None
        bad.require(request.mode is not None, "mode", f"is required: one of {', '.join(tasks.FINETUNE_MODES)}")
        iterations = bad.integer("iterations", _default(request.iterations, DEFAULT_ITERATIONS), low=MIN_ITERATIONS,
                                 high=MAX_ITERATIONS)
        finetune_type = bad.choice("finetune_type", _default(request.finetune_type, "full"), tasks.FINETUNE_TYPES)
        default_lr = 1e-5 if finetune_type == "full" else 1e-4
        learning_rate = bad.number("learning_rate", _default(request.learning_rate, default_lr), low=MIN_FINETUNE_LR,
                                   high=MAX_FINETUNE_LR)
        priority = bad.choice("priority", _default(request.priority, "quality"), tasks.FINETUNE_PRIORITIES)
        lora_rank = bad.choice("lora_rank", _default(request.lora_rank, 32), tasks.FINETUNE_RANKS)
        captioning = _default(request.captioning, True)
        bad.require(bool(request.file_data), "file_data", "is required: a base64-encoded ZIP of training images")
        bad.raise_if_any()
        archive = media.decode_base64(request.file_data, "file_data")
        task_id = tasks.new_task_id()
        task_dir = self._task_dir(task_id)
        # The archive is checked and unpacked now, so a bad one is refused before anything exists.
        try:
            task_dir.mkdir(parents=True)
            items = await asyncio.to_thread(intake.unpack_dataset, archive, task_dir / "upload", self.settings.media)
        except BaseException:
            shutil.rmtree(task_dir, ignore_errors=True)
            raise
        prompt = preprocess.MODE_PROMPTS[mode].replace(preprocess.TRIGGER, trigger) if captioning else None
        record = TaskRecord(
            id=task_id, owner=owner, kind="finetune", trigger_word=trigger,
            training_folder=str(task_dir / "training"), training_type=finetune_type.upper(),
            entity_type={"character": "SUBJECT", "style": "STYLE"}.get(mode, "PRODUCT"), rank=lora_rank,
            steps=iterations, learning_rate=learning_rate, base_model_path=self.settings.trainer.base_model,
            source_images=[f"file_data: {len(items)} images"],
            preprocessing_captioning_strategy="joycaption" if captioning else "trigger_only",
            preprocessing_captioning_prompt=prompt, resolution=tasks.FINETUNE_RESOLUTION[priority],
            save_every=FINETUNE_SAVE_EVERY,
            finetune=tasks.Finetune(comment=comment, mode=mode, iterations=iterations, learning_rate=learning_rate,
                                    captioning=captioning, priority=priority, finetune_type=finetune_type,
                                    lora_rank=lora_rank),
        )
        record.log(f"finetune created: {finetune_type}, mode {mode}, {iterations} iterations, {len(items)} images "
                   f"({sum(1 for i in items if i.caption is not None)} with captions)")
        try:
            return await self._queue(record)
        except BaseException:
            shutil.rmtree(task_dir, ignore_errors=True)
            raise

    async def finetune(self, owner: str, finetune_id: str) -> TaskRecord:
        bad = Violations()
        bad.require(bool(finetune_id), "finetune_id", "is required")
        bad.raise_if_any()
        try:
            task = await self.get(owner, finetune_id)
        except NotFound:
            task = None
        if task is None or task.kind != "finetune":
            raise NotFound(f"no finetune {finetune_id[:100]!r}")
        return task

    # ---- shared ---------------------------------------------------------------------------

    def _task_dir(self, task_id: str) -> Path:
        return self.settings.tasks_dir / task_id

    def _check_base_model(self, bad: Violations, raw: str) -> str:
        if not tasks.check_text(bad, "base_model_path", raw, required=True, limit=1000):
            return raw
        if is_repo_id(raw):
            local = None
        else:
            local = media.resolve_into(bad, raw, self.settings.model_roots, "base_model_path",
                                       "no such model file or folder")
            if local is None:
                return raw
        if tasks.model_family_id(raw, local) is None:
            bad.add("base_model_path", f"must be a diffusers pipeline folder or Hugging Face id of a trainable family "
                                       f"(Stable Diffusion 1.5, SDXL, FLUX.1); cannot tell which {raw!r} is")
        return raw

    async def _queue(self, record: TaskRecord) -> TaskRecord:
        await self.store.create(record)
        sequence = await self.store.enqueue(record)
        return await self.store.update(record.id, lambda r: setattr(r, "queue_sequence", sequence))


def _check_webhook(bad: Violations, url: str, settings: Settings) -> None:
    try:
        check_webhook_url(url, "webhook_url", settings.media)
    except InvalidInput as exc:
        for field, description in exc.violations:
            bad.add(field, description)
