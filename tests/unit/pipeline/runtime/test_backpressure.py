"""The stage loop's in-flight bound: pause at the bound, resume at half, never overshoot."""

from __future__ import annotations

import pytest

from pipeline.runtime.backpressure import Change, InFlightBound


def test_pauses_at_the_bound_once_and_resumes_at_half() -> None:
    bound = InFlightBound(10)
    assert [bound.update(n) for n in (0, 9)] == [None, None]
    assert bound.update(10) is Change.PAUSE and bound.paused
    assert [bound.update(n) for n in (12, 10, 6)] == [None, None, None]  # stays paused
    assert bound.update(5) is Change.RESUME and not bound.paused
    assert bound.update(9) is None  # resumed: not paused again below the bound
    assert bound.update(11) is Change.PAUSE


def test_a_poll_asks_for_the_room_left_but_always_something() -> None:
    bound = InFlightBound(10)
    assert bound.room(0) == 10
    assert bound.room(7) == 3
    assert bound.room(10) == 1 and bound.room(50) == 1


def test_a_bound_of_one_resumes_only_when_idle() -> None:
    bound = InFlightBound(1)
    assert bound.update(1) is Change.PAUSE
    assert bound.update(1) is None
    assert bound.update(0) is Change.RESUME


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        InFlightBound(0)
