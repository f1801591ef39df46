"""Training sessions: the record every replica shares through NATS key-value, and the
rules of a step budget (how many steps may be granted, when a session is done)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.errors import FailedPrecondition, Violations

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_STEPS_LIMIT = 1_000_000

# loading: the model loads (or reloads from the checkpoint); training: steps are running;
# waiting: the budget is used and its checkpoint is on disk; the rest are final.
LOADING, TRAINING, WAITING = "loading", "training", "waiting"
COMPLETED, ABORTED, FAILED = "completed", "aborted", "failed"
FINAL_STATES = frozenset({COMPLETED, ABORTED, FAILED})


def check_session_id(session_id: str, bad: Violations | None = None) -> str:
    """The id as given; a bad one goes to `bad`, or raises InvalidInput when none is given."""
    checks = Violations() if bad is None else bad
    checks.require(bool(SESSION_ID.match(session_id or "")), "session_id",
                   f"must be 1-64 letters, digits, '-' or '_', starting with a letter or digit (got {session_id!r})")
    if bad is None:
        checks.raise_if_any()
    return session_id


@dataclass
class Sample:
    step: int
    prompt: str
    path: str


@dataclass
class SessionRecord:
    session_id: str
    name: str
    # The validated ai-toolkit job config (JobConfig.to_dict()).
    config: dict[str, Any]
    max_steps: int
    training_folder: str
    state: str = LOADING
    allowed_steps: int = 0
    completed_steps: int = 0
    last_checkpoint_step: int | None = None
    last_checkpoint_path: str = ""
    loss: float | None = None
    learning_rate: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    samples: list[Sample] = field(default_factory=list)
    error: str = ""
    device: str = ""
    memory_bytes: float | None = None  # while a replica holds the model
    notes: list[str] = field(default_factory=list)
    # Replica running the session; empty while it waits in the queue for one.
    owner: str = ""
    abort_requested: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def remaining_steps(self) -> int:
        return max(0, self.allowed_steps - self.completed_steps)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def grant(self, steps: int) -> None:
        """Adds `steps` to the budget; the budget never passes max_steps."""
        bad = Violations()
        bad.integer("steps", steps, low=1)
        bad.raise_if_any()
        if self.is_final:
            raise FailedPrecondition(
                f"session {self.session_id} is {self.state}; create it again to train more "
                f"(it resumes from its last checkpoint)"
            )
        room = self.max_steps - self.allowed_steps
        bad.require(steps <= room, "steps",
                    f"would raise allowed_steps to {self.allowed_steps + steps}, past max_steps {self.max_steps}; "
                    f"at most {room} more can be granted")
        bad.raise_if_any()
        self.allowed_steps += steps

    def resume_from(self, step: int, checkpoint_path: str) -> None:
        """A new session over a training folder that already holds a checkpoint at `step`:
        the steps trained before count as granted and completed, so the next grant continues
        from there (a checkpoint past max_steps leaves nothing more to grant)."""
        self.allowed_steps = self.completed_steps = min(step, self.max_steps)
        self.last_checkpoint_step, self.last_checkpoint_path = step, checkpoint_path

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SessionRecord:
        data = json.loads(raw)
        data["samples"] = [Sample(**s) for s in data.get("samples", [])]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})
