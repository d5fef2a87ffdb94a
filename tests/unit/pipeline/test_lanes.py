"""The batch lane's gate: interactive work first, batch work only into spare capacity."""

from __future__ import annotations

import pytest

from pipeline.runtime.backpressure import Change
from pipeline.runtime.lanes import BatchLaneGate, is_batch_lane


def test_waiting_interactive_work_pauses_the_batch_lane_at_once() -> None:
    gate = BatchLaneGate(capacity=8)
    assert gate.update(interactive_waiting=0, in_flight=3) is None
    assert gate.update(interactive_waiting=1, in_flight=3) is Change.PAUSE
    assert gate.update(interactive_waiting=1, in_flight=0) is None  # still waiting: stays paused
    assert gate.update(interactive_waiting=0, in_flight=0) is Change.RESUME


def test_a_full_engine_pauses_and_spare_capacity_resumes_without_flapping() -> None:
    gate = BatchLaneGate(capacity=8)
    assert gate.update(0, 8) is Change.PAUSE
    assert [gate.update(0, n) for n in (7, 6, 5)] == [None, None, None]
    assert gate.update(0, 4) is Change.RESUME
    assert [gate.update(0, n) for n in (5, 6, 7)] == [None, None, None]
    assert gate.update(0, 9) is Change.PAUSE


@pytest.mark.parametrize(("capacity", "resume_at"), [(0, None), (4, 4), (4, -1)])
def test_a_gate_that_could_never_resume_is_refused(capacity: int, resume_at: int | None) -> None:
    with pytest.raises(ValueError, match=r"capacity|resume_at"):
        BatchLaneGate(capacity, resume_at)


def test_batch_lane_topics_are_told_by_their_suffix() -> None:
    assert is_batch_lane("sluice.prompts.batch") and is_batch_lane("t1.tokenized.batch")
    assert not is_batch_lane("sluice.prompts") and not is_batch_lane("sluice.batches")
