"""The rules of a session's step budget, on the record alone (no NATS, no mesh): what a grant
adds, what it refuses and why, and where a session recreated over old checkpoints resumes."""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition, InvalidInput
from services.trainer import sessions
from services.trainer.sessions import SessionRecord, check_session_id


def record(max_steps: int = 100, **changes) -> SessionRecord:
    base = SessionRecord(session_id="s1", name="lora", config={}, max_steps=max_steps, training_folder="/work/out")
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def refused_field(error: InvalidInput) -> list[str]:
    return [field for field, _ in error.violations]


def test_a_new_session_has_no_budget_until_steps_are_granted():
    r = record()
    assert (r.allowed_steps, r.completed_steps, r.remaining_steps) == (0, 0, 0)
    assert r.state == sessions.LOADING and not r.is_final


def test_grants_add_up_and_remaining_steps_follow_progress():
    r = record()
    r.grant(10)
    r.grant(15)
    assert r.allowed_steps == 25 and r.remaining_steps == 25
    r.completed_steps = 20
    assert r.remaining_steps == 5
    r.grant(5)
    assert r.allowed_steps == 30 and r.remaining_steps == 10


def test_the_budget_can_reach_max_steps_exactly_but_never_pass_it():
    r = record(max_steps=50)
    r.grant(40)
    with pytest.raises(InvalidInput) as refused:
        r.grant(11)
    assert refused_field(refused.value) == ["steps"]
    assert "past max_steps 50" in str(refused.value) and "at most 10 more" in str(refused.value)
    assert r.allowed_steps == 40, "a refused grant changes nothing"
    r.grant(10)
    assert r.allowed_steps == 50 and r.remaining_steps == 50
    with pytest.raises(InvalidInput, match="at most 0 more"):
        r.grant(1)


@pytest.mark.parametrize("steps", [0, -1, -500])
def test_zero_or_negative_grants_are_refused_naming_steps(steps):
    r = record(allowed_steps=5)
    with pytest.raises(InvalidInput) as refused:
        r.grant(steps)
    assert refused_field(refused.value) == ["steps"]
    assert f"must be at least 1 (got {steps})" in str(refused.value)
    assert r.allowed_steps == 5


@pytest.mark.parametrize("state", sorted(sessions.FINAL_STATES))
def test_a_finished_session_takes_no_more_steps(state):
    r = record(state=state, allowed_steps=20, completed_steps=20)
    assert r.is_final
    with pytest.raises(FailedPrecondition) as refused:
        r.grant(5)
    message = str(refused.value)
    assert f"is {state}" in message and "create it again" in message
    assert r.allowed_steps == 20


def test_a_bad_step_count_is_reported_before_the_session_state():
    # The field is wrong whatever the session's state, so the client hears about it first.
    r = record(state=sessions.COMPLETED)
    with pytest.raises(InvalidInput):
        r.grant(0)


@pytest.mark.parametrize("state", [sessions.LOADING, sessions.TRAINING, sessions.WAITING])
def test_a_live_session_takes_steps_in_any_state(state):
    r = record(state=state, allowed_steps=10, completed_steps=10 if state == sessions.WAITING else 3)
    r.grant(7)
    assert r.allowed_steps == 17


def test_steps_trained_before_count_as_granted_and_the_next_grant_continues():
    r = record(max_steps=100)
    r.resume_from(40, "/work/out/lora/lora_000000040.safetensors")
    assert (r.allowed_steps, r.completed_steps, r.remaining_steps) == (40, 40, 0)
    assert r.last_checkpoint_step == 40 and r.last_checkpoint_path.endswith("lora_000000040.safetensors")
    r.grant(10)
    assert r.allowed_steps == 50 and r.remaining_steps == 10
    with pytest.raises(InvalidInput, match="at most 50 more"):
        r.grant(51)


def test_a_checkpoint_past_max_steps_leaves_nothing_to_grant():
    r = record(max_steps=30)
    r.resume_from(45, "/work/out/lora/lora_000000045.safetensors")
    assert r.allowed_steps == r.completed_steps == 30 and r.remaining_steps == 0
    assert r.last_checkpoint_step == 45, "the checkpoint is reported as it is on disk"
    with pytest.raises(InvalidInput, match="at most 0 more"):
        r.grant(1)


def test_the_budget_survives_the_trip_through_the_shared_store():
    r = record(max_steps=80)
    r.grant(30)
    r.completed_steps = 12
    r.samples.append(sessions.Sample(10, "a cat", "/work/out/samples/10.png"))
    again = SessionRecord.from_json(r.to_json())
    assert again == r
    assert again.remaining_steps == 18
    with pytest.raises(InvalidInput, match="at most 50 more"):
        again.grant(51)


def test_a_record_written_by_a_newer_replica_still_loads():
    raw = record(max_steps=10).to_json().replace(b'"state"', b'"future_field": 1, "state"')
    assert SessionRecord.from_json(raw).max_steps == 10


@pytest.mark.parametrize("session_id", ["a", "run-1", "Run_2", "x" * 64])
def test_good_session_ids_are_accepted(session_id):
    assert check_session_id(session_id) == session_id


@pytest.mark.parametrize("session_id", ["", "-lead", "_lead", "../etc", "a/b", "sp ace", "x" * 65])
def test_bad_session_ids_are_refused_naming_session_id(session_id):
    with pytest.raises(InvalidInput) as refused:
        check_session_id(session_id)
    assert refused_field(refused.value) == ["session_id"]
