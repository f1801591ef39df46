"""Training tasks (the /api/v1/training API) and finetunes (the /v1/finetune API): one record
kind for both, shared by every replica through NATS key-value. A task preprocesses its
images, then trains as a session embedded in the record (the same runner, checkpoints and
resume as /sessions), and ends with a LoRA (and, for FULL, the full weights).

This module holds the record, the documented defaults, the checks of a create request and
the mapping of a task onto the ai-toolkit job config the engine runs."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common.architectures import by_id, trainable
from services.common.errors import FailedPrecondition, Violations
from services.common.jobs import iso_time
from services.trainer.sessions import SessionRecord

# Statuses, in the document's upper-case style.
PENDING, PREPROCESSING, TRAINING = "PENDING", "PREPROCESSING", "TRAINING"
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})
# The session state the embedded session ends in -> the task's final status.
SESSION_OUTCOMES = {"completed": COMPLETED, "aborted": CANCELLED, "failed": FAILED}

TRAINING_TYPES = ("LORA", "FULL")
ENTITY_TYPES = ("PRODUCT", "SUBJECT", "STYLE")
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 1
# Preprocessing is reported as the first tenth of a task's progress.
PREPROCESSING_SHARE = 10.0
MAX_LOG_LINES = 500
MAX_TEXT = 1000

# seed 002: the finetune API's fields.
FINETUNE_MODES = ("general", "character", "style", "product")
FINETUNE_TYPES = ("lora", "full")
FINETUNE_PRIORITIES = ("speed", "quality")
FINETUNE_RANKS = (16, 32)
# What "speed" and "quality" change: the training resolution (README, "Finetunes").
FINETUNE_RESOLUTION = {"speed": 512, "quality": 1024}
# seed 002 status names.
FINETUNE_STATUS = {PENDING: "Pending", PREPROCESSING: "Preprocessing", TRAINING: "Running",
                   COMPLETED: "Ready", FAILED: "Error", CANCELLED: "Cancelled"}

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


@dataclass
class Finetune:
    """What a /v1/finetune request gave, kept for /v1/finetune_details."""

    comment: str
    mode: str
    iterations: int
    learning_rate: float
    captioning: bool
    priority: str
    finetune_type: str
    lora_rank: int


@dataclass
class TaskRecord:
    id: str
    owner: str
    trigger_word: str
    training_folder: str
    kind: str = "training"  # or "finetune"
    training_type: str = "LORA"
    entity_type: str = "PRODUCT"
    entity_id: str | None = None
    rank: int = 16
    steps: int = 1000
    learning_rate: float = 1e-4
    sample_prompts: list[str] = field(default_factory=list)
    source_images: list[str] = field(default_factory=list)
    base_model_path: str = ""
    bypass_guidance_embedding: bool = False
    webhook_url: str = ""
    origin_instance: str = "unknown"
    origin_zone: str | None = None
    origin_version: str | None = None
    origin_tenant_id: str | None = None
    preprocessing_transforms: list[dict] | None = None
    preprocessing_captioning_strategy: str = "trigger_only"
    preprocessing_captioning_prompt: str | None = None
    priority: int = DEFAULT_PRIORITY
    priority_changed_at: float | None = None
    # Fixed training settings the document reports.
    save_every: int = 2000
    max_step_saves_to_keep: int = 4
    batch_size: int = 1
    gradient_accumulation: int = 1
    optimizer: str = "adamw8bit"
    sample_every: int = 250
    sample_steps: int = 25
    resolution: int = 1024
    finetune: Finetune | None = None
    # Progress.
    status: str = PENDING
    current_step: int = 0
    eta_seconds: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    preprocessing_stage: str | None = None
    processed_files_count: int | None = None
    total_files_count: int | None = None
    preprocessing_started_at: float | None = None
    preprocessing_completed_at: float | None = None
    processed_dataset_path: str | None = None
    local_model_path: str | None = None
    error_message: str | None = None
    logs: list[str] = field(default_factory=list)
    output_lora_path: str | None = None
    output_full_weights_path: str | None = None
    webhooks: list[dict] = field(default_factory=list)
    # The training run, once preprocessing is done: a session with its whole budget granted.
    session: SessionRecord | None = None
    cancel_requested: bool = False
    # Replica running the task; empty while it waits in the queue.
    runner: str = ""
    # Work-queue stream sequence of the newest message that carries the task (its queued
    # work id), and of the one whose replica claimed it.
    queue_sequence: int | None = None
    claimed_sequence: int | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def total_steps(self) -> int:
        return self.steps

    @property
    def progress(self) -> float:
        if self.status == COMPLETED:
            return 100.0
        done = 0.0
        if self.processed_files_count is not None and self.total_files_count:
            done = PREPROCESSING_SHARE * min(1.0, self.processed_files_count / self.total_files_count)
        if self.preprocessing_completed_at is not None:
            done = PREPROCESSING_SHARE
        return round(done + (100.0 - PREPROCESSING_SHARE) * min(1.0, self.current_step / max(1, self.steps)), 2)

    @property
    def dataset_dir(self) -> Path:
        return Path(self.training_folder).parent / "dataset"

    @property
    def upload_dir(self) -> Path:
        """A finetune's unpacked archive."""
        return Path(self.training_folder).parent / "upload"

    def log(self, message: str, at: float | None = None) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at or time.time()))
        self.logs.append(f"{stamp} {message}")
        del self.logs[:-MAX_LOG_LINES]

    def set_priority(self, priority: int) -> bool:
        """Sets the priority; True when it changed."""
        bad = Violations()
        bad.integer("priority", priority, low=MIN_PRIORITY, high=MAX_PRIORITY)
        bad.raise_if_any()
        if self.is_final:
            raise FailedPrecondition(f"training task {self.id} is {self.status}; its priority can no longer change")
        if priority == self.priority:
            return False
        self.priority, self.priority_changed_at = priority, time.time()
        self.log(f"priority changed to {priority}")
        return True

    def follow_session(self) -> None:
        """Copies the embedded session's progress into the task's own fields."""
        session = self.session
        if session is None:
            return
        self.current_step = session.completed_steps
        self.eta_seconds = session.eta_seconds
        if session.state in SESSION_OUTCOMES:
            self.status = SESSION_OUTCOMES[session.state]
            self.error_message = session.error or self.error_message
            self.completed_at = self.completed_at or time.time()
            self.runner, self.eta_seconds = "", None
        elif not self.is_final:
            self.status = TRAINING

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> TaskRecord:
        data = json.loads(raw)
        known = cls.__dataclass_fields__
        record = cls(**{k: v for k, v in data.items() if k in known})
        if isinstance(record.finetune, dict):
            record.finetune = Finetune(**record.finetune)
        if isinstance(record.session, dict):
            record.session = SessionRecord.from_json(json.dumps(record.session).encode())
        return record


def new_task_id() -> str:
    return str(uuid.uuid4())


def task_key(task_id: str) -> str | None:
    """The record key of a task id as a client wrote it (any UUID spelling), or None for
    something that cannot be one."""
    if not _UUID.match(task_id or ""):
        return None
    return str(uuid.UUID(task_id))


def check_text(bad: Violations, name: str, value: str | None, *, required: bool = False,
               limit: int = MAX_TEXT) -> str | None:
    """A string field the document allows to be null (None stays None unless required)."""
    if value is None and not required:
        return None
    return bad.text(name, value, required=required, max_length=limit)


def check_trigger_word(bad: Violations, name: str, value: str | None) -> str:
    word = check_text(bad, name, value, required=True, limit=100) or ""
    bad.require(not any(c in word for c in "\r\n"), name, "must be one line")
    return word.strip()


def check_entity_id(bad: Violations, value: str | None) -> str | None:
    if value is None:
        return None
    bad.require(bool(_UUID.match(value)), "entity_id", f"must be a UUID or null (got {value[:80]!r})")
    return value


def model_family_id(base_model_path: str, local: Path | None) -> str | None:
    """The trainable family a base model belongs to: from a pipeline folder's model_index.json,
    else from a Hugging Face id that is a family's own repository or names it."""
    families = trainable()
    if local is not None and (local / "model_index.json").is_file():
        try:
            class_name = json.loads((local / "model_index.json").read_text()).get("_class_name", "")
        except (OSError, ValueError):
            return None
        return next((f.id for f in families if f.pipeline_class == class_name), None)
    name = base_model_path.lower()
    for family in families:
        if family.config_repo.lower() == name:
            return family.id
    if "flux" in name:
        return "flux"
    if "xl" in name:
        return "sdxl"
    return "sd15" if "stable-diffusion" in name else None


def job_config(task: TaskRecord, arch: str, model_source: str, device: str) -> dict[str, Any]:
    """The ai-toolkit job config the engine runs for a task: its dataset, model, rank, steps
    and learning rate, and the fixed settings the task reports."""
    full = task.training_type == "FULL"
    sample = None
    if task.sample_prompts:
        sample = {"sample_every": task.sample_every, "sample_steps": task.sample_steps, "seed": 42,
                  "width": task.resolution, "height": task.resolution, "prompts": list(task.sample_prompts),
                  "sampler": "flowmatch" if by_id(arch).flow else "ddpm"}
    process: dict[str, Any] = {
        "type": "diffusion_trainer",
        "training_folder": task.training_folder,
        "device": device,
        "trigger_word": task.trigger_word,
        "network": {"type": "full" if full else "lora", "linear": task.rank, "linear_alpha": task.rank},
        "save": {"dtype": "bf16", "save_every": task.save_every, "max_step_saves_to_keep": task.max_step_saves_to_keep,
                 "save_format": "diffusers"},
        "datasets": [{"folder_path": task.processed_dataset_path, "caption_ext": "txt",
                      "resolution": [task.resolution], "bucket_no_upscale": True}],
        "train": {"batch_size": task.batch_size, "steps": task.steps,
                  "gradient_accumulation": task.gradient_accumulation, "optimizer": task.optimizer,
                  "lr": task.learning_rate, "bypass_guidance_embedding": task.bypass_guidance_embedding,
                  "disable_sampling": sample is None},
        "model": {"name_or_path": model_source, "arch": arch},
    }
    if sample is not None:
        process["sample"] = sample
    return {"job": "extension", "config": {"name": f"task-{task.id}", "process": [process]}}


def task_document(task: TaskRecord) -> dict[str, Any]:
    """The task as the document's TrainingTask object, every field present (null where the
    document allows it): the REST answer, the list's items and the webhook body."""
    return {
        "id": task.id,
        "created_at": iso_time(task.created_at),
        "updated_at": iso_time(task.updated_at),
        "origin_instance": task.origin_instance,
        "origin_zone": task.origin_zone,
        "origin_version": task.origin_version,
        "origin_tenant_id": task.origin_tenant_id,
        "training_type": task.training_type,
        "entity_type": task.entity_type,
        "entity_id": task.entity_id,
        "status": task.status,
        "progress": task.progress,
        "current_step": task.current_step,
        "total_steps": task.total_steps,
        "eta_seconds": round(task.eta_seconds) if task.eta_seconds is not None else None,
        "trigger_word": task.trigger_word,
        "training_folder": task.training_folder,
        "rank": task.rank,
        "save_every": task.save_every,
        "max_step_saves_to_keep": task.max_step_saves_to_keep,
        "batch_size": task.batch_size,
        "steps": task.steps,
        "learning_rate": task.learning_rate,
        "gradient_accumulation": task.gradient_accumulation,
        "optimizer": task.optimizer,
        "bypass_guidance_embedding": task.bypass_guidance_embedding,
        "base_model_path": task.base_model_path,
        "local_model_path": task.local_model_path,
        "sample_every": task.sample_every,
        "sample_steps": task.sample_steps,
        "sample_prompts": list(task.sample_prompts),
        "started_at": iso_time(task.started_at),
        "completed_at": iso_time(task.completed_at),
        "logs": "\n".join(task.logs),
        "error_message": task.error_message,
        "webhook_url": task.webhook_url,
        "celery_training_task_id": _work_id(task, "train") if task.session is not None else None,
        "celery_preprocessing_task_id": _work_id(task, "preprocess") if task.preprocessing_started_at else None,
        "celery_chain_task_id": _work_id(task, "task") if task.queue_sequence is not None else None,
        "preprocessing_stage": task.preprocessing_stage,
        "processed_files_count": task.processed_files_count,
        "total_files_count": task.total_files_count,
        "preprocessing_started_at": iso_time(task.preprocessing_started_at),
        "preprocessing_completed_at": iso_time(task.preprocessing_completed_at),
        "source_images": list(task.source_images),
        "processed_dataset_path": task.processed_dataset_path,
        "preprocessing_transforms": task.preprocessing_transforms,
        "preprocessing_captioning_strategy": task.preprocessing_captioning_strategy,
        "preprocessing_captioning_prompt": task.preprocessing_captioning_prompt,
        "priority": task.priority,
        "priority_changed_at": iso_time(task.priority_changed_at),
        "output_lora_path": task.output_lora_path,
        "output_full_weights_path": task.output_full_weights_path,
        "webhook_deliveries": [_delivery_document(d) for d in task.webhooks],
    }


def _work_id(task: TaskRecord, part: str) -> str:
    """The id of a piece of the task's queued work: "<task id>:<part>:<queue sequence>"."""
    return f"{task.id}:{part}:{task.queue_sequence}"


def _delivery_document(delivery: dict) -> dict:
    document = {k: delivery.get(k) for k in ("event", "delivered", "attempts", "error")}
    document["status_code"] = delivery.get("status_code") or 0
    document["error"] = document["error"] or ""
    if delivery.get("delivered_at"):
        document["delivered_at"] = iso_time(delivery["delivered_at"])
    return document
