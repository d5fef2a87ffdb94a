"""What the runner reads from its handler, without a broker: the in-flight bound it offers
(``max_in_flight``) and the progress it reports (``last_progress``) for liveness."""

from __future__ import annotations

import time

from aiokafka import TopicPartition

from pipeline.config import Settings
from pipeline.runtime.runner import StageRunner
from tests.unit.pipeline.runtime.test_processing import SPEC, Scripted


class Generating(Scripted):
    """A handler in the middle of a long generation: progress now, nothing finished."""

    max_in_flight: int | None = 256

    def last_progress(self) -> float:
        return time.monotonic()


def _stalled(runner: StageRunner) -> None:
    runner.tracker.add(TopicPartition("in", 0), 0)  # one record in flight
    runner._last_finish = time.monotonic() - 120  # nothing finished for two minutes


def test_a_long_generation_with_progress_is_alive_and_without_it_is_not() -> None:
    settings = Settings(stall_after_s=60)
    quiet = StageRunner(settings, Scripted(SPEC), group_id="g")
    _stalled(quiet)
    ok, why = quiet.healthy()
    assert not ok and "no work finished" in why
    busy = StageRunner(settings, Generating(SPEC), group_id="g")
    _stalled(busy)
    assert busy.healthy() == (True, "ok")


def test_the_handlers_capacity_bounds_what_is_in_flight() -> None:
    runner = StageRunner(Settings(max_in_flight=2048), Generating(SPEC), group_id="g")
    runner._bound_by_handler()
    assert runner.backpressure.max_records == 256
    larger = Generating(SPEC)
    larger.max_in_flight = 10_000  # never above the setting
    runner = StageRunner(Settings(max_in_flight=2048), larger, group_id="g")
    runner._bound_by_handler()
    assert runner.backpressure.max_records == 2048
    plain = StageRunner(Settings(max_in_flight=2048), Scripted(SPEC), group_id="g")
    plain._bound_by_handler()
    assert plain.backpressure.max_records == 2048
