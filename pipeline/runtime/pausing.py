"""Which of a consumer's partitions are paused, and why; the stage loop asks after every fetch
and every finished unit of work.

Two reasons, kept apart so one never undoes the other:

- the in-flight bound (``InFlightBound``): every assigned partition, both lanes, is paused at
  the bound and resumed at half;
- the batch lane (``BatchLaneGate``, only for a stage whose ``StageSpec`` names a
  ``batch_input_topic``): the batch lane's partitions alone are paused while interactive work
  waits or while the work in flight fills the batch lane's share, and resumed once nothing
  interactive waits and the work in flight is down to ``resume_at``.

A partition is fetched only when neither reason holds it. The batch lane's share is half the
in-flight bound (for compute: the engine's batch, since its bound is twice that), and while
the batch lane is fetched a poll asks for no more records than that share leaves, so batch
work never takes the room interactive work needs to reach the handler.

Interactive waiting: interactive records fetched and neither finished nor admitted. A handler
may say when it has admitted a record (``admitted(record) -> bool``: compute, once the engine
holds the request); for one that does not, a record waits until its unit of work finishes.

Nothing here talks to Kafka beyond ``pause`` / ``resume`` on the consumer it is given, so unit
tests drive it with a recording stand-in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import TopicPartition

from pipeline.runtime.backpressure import Change, InFlightBound
from pipeline.runtime.batch import Record
from pipeline.runtime.lanes import BatchLaneGate

log = logging.getLogger(__name__)


class Pausing:
    """The assigned partitions of one consumer and which of them are paused."""

    def __init__(
        self,
        bound: InFlightBound,
        *,
        stage: str,
        batch_topic: str | None = None,
        admitted: Callable[[Record], bool] | None = None,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self.consumer: Any = None
        self.bound = bound
        self.stage = stage
        self.batch_topic = batch_topic
        self.gate: BatchLaneGate | None = None
        self._admitted = admitted
        # (paused partitions, paused batch-lane partitions), for the stage's gauges
        self._on_change = on_change
        self.assigned: set[TopicPartition] = set()
        self._waiting: dict[tuple[str, int, int], Record] = {}

    def attach(self, consumer: Any) -> None:
        """The consumer to pause and resume; the batch lane's share is taken from the bound as
        it is now (after the handler's warm-up may have lowered it)."""
        self.consumer = consumer
        if self.batch_topic is not None:
            self.gate = lane_gate(self.bound)
            log.info(
                "stage %s: batch lane %s takes at most %d records in flight (resumed at %d)",
                self.stage,
                self.batch_topic,
                self.gate.capacity,
                self.gate.resume_at,
            )

    # ---- what the loop tells it ------------------------------------------------------------

    def assign(self, partitions: set[TopicPartition]) -> None:
        """New partitions start paused if a reason holds them."""
        self.assigned |= partitions
        held = {tp for tp in partitions if self._held(tp)}
        if held and self.consumer is not None:
            self.consumer.pause(*held)
        self._report()

    def revoke(self, partitions: set[TopicPartition]) -> None:
        self.assigned -= partitions
        for key in [k for k in self._waiting if TopicPartition(k[0], k[1]) in partitions]:
            del self._waiting[key]
        self._report()

    def fetched(self, records: Iterable[Record]) -> None:
        """Records a poll brought: the interactive ones wait until admitted or finished."""
        if self.gate is None:
            return
        for r in records:
            if r.topic != self.batch_topic:
                self._waiting[(r.topic, r.partition, r.offset)] = r

    def finished(self, records: Iterable[Record]) -> None:
        for r in records:
            self._waiting.pop((r.topic, r.partition, r.offset), None)

    def interactive_waiting(self) -> int:
        """Interactive records fetched and neither finished nor admitted by the handler."""
        if self._admitted is None:
            return len(self._waiting)
        admitted = self._admitted
        for key in [k for k, r in self._waiting.items() if admitted(r)]:
            del self._waiting[key]
        return len(self._waiting)

    # ---- the decision ----------------------------------------------------------------------

    def update(self, in_flight: int, in_flight_bytes: int) -> int:
        """Apply both rules to the partitions now; returns how many records may come next."""
        bound = self.bound.update(in_flight, in_flight_bytes)
        lane = None
        if self.gate is not None:
            lane = self.gate.update(self.interactive_waiting(), in_flight)
        if bound is Change.PAUSE:
            self.consumer.pause(*self.assigned)
            log.info(
                "stage %s: %d records / %d bytes in flight (bounds %d / %s), pausing %d partitions",
                self.stage,
                in_flight,
                in_flight_bytes,
                self.bound.max_records,
                self.bound.max_bytes,
                len(self.assigned),
            )
        elif bound is Change.RESUME:
            resumed = {tp for tp in self.assigned if not self._held(tp)}
            if resumed:
                self.consumer.resume(*resumed)
        if lane is Change.PAUSE and not self.bound.paused:
            self.consumer.pause(*self._batch())
        elif lane is Change.RESUME and not self.bound.paused:
            self.consumer.resume(*self._batch())
        if bound is not None or lane is not None:
            if lane is not None:
                log.debug("stage %s: batch lane %s", self.stage, lane.value)
            self._report()
        return self.room(in_flight)

    def room(self, in_flight: int) -> int:
        """How many records the next poll may bring: the bound's room, and while the batch lane
        is fetched, no more than its share leaves (a poll cannot ask per lane, so one poll
        could otherwise fill the whole bound with batch work and pause chat with it)."""
        room = self.bound.room(in_flight)
        if self.gate is not None and not self.batch_paused:
            room = min(room, max(1, self.gate.capacity - in_flight))
        return room

    @property
    def batch_paused(self) -> bool:
        return self.gate is not None and (self.gate.paused or self.bound.paused)

    def _batch(self) -> set[TopicPartition]:
        return {tp for tp in self.assigned if tp.topic == self.batch_topic}

    def _held(self, tp: TopicPartition) -> bool:
        """Whether a reason keeps ``tp`` paused now."""
        if self.bound.paused:
            return True
        return self.gate is not None and self.gate.paused and tp.topic == self.batch_topic

    def _report(self) -> None:
        if self._on_change is None:
            return
        paused = sum(1 for tp in self.assigned if self._held(tp))
        self._on_change(paused, sum(1 for tp in self._batch() if self._held(tp)))


def lane_gate(bound: InFlightBound) -> BatchLaneGate:
    """The batch lane's gate under ``bound``: batch work may fill half the in-flight records
    (at least one), and is let in again at a quarter."""
    capacity = max(1, bound.max_records // 2)
    return BatchLaneGate(capacity, capacity // 2)
