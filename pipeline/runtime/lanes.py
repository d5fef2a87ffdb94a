"""Two lanes, without Kafka: interactive work first, batch work only into spare capacity.

A stage that reads both lanes (``<prefix>prompts`` and ``<prefix>prompts.batch`` for
preprocess, ``<prefix>tokenized`` and ``<prefix>tokenized.batch`` for compute) keeps one
``BatchLaneGate``. After every fetch and every finished record the loop tells it how much
interactive work is waiting (fetched, not yet admitted by the engine) and how much work is in
flight; the gate answers when the batch partitions must be paused or may be resumed:

- interactive work waiting -> pause the batch lane at once (chat never queues behind a batch);
- in flight at ``capacity`` -> pause it (batch work may only fill spare capacity);
- nothing interactive waiting and in flight at most ``resume_at`` -> resume it.

The gap between pausing at ``capacity`` and resuming at ``resume_at`` keeps the batch
partitions from flapping on every record. Interactive partitions are never paused here (the
stage's ``InFlightBound`` still bounds both lanes together).
"""

from __future__ import annotations

from pipeline.runtime.backpressure import Change

BATCH_SUFFIX = ".batch"


def is_batch_lane(topic: str) -> bool:
    """Whether ``topic`` is on the batch lane (``<prefix>prompts.batch``, ``….tokenized.batch``)."""
    return topic.endswith(BATCH_SUFFIX)


class BatchLaneGate:
    """When the batch lane's partitions may be fetched; one instance per consumer."""

    def __init__(self, capacity: int, resume_at: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.resume_at = capacity // 2 if resume_at is None else resume_at
        if not 0 <= self.resume_at < capacity:
            raise ValueError("resume_at must be at least 0 and below capacity")
        self.paused = False

    def update(self, interactive_waiting: int, in_flight: int) -> Change | None:
        """The change to apply to the batch partitions now, if any."""
        if not self.paused and (interactive_waiting > 0 or in_flight >= self.capacity):
            self.paused = True
            return Change.PAUSE
        if self.paused and interactive_waiting == 0 and in_flight <= self.resume_at:
            self.paused = False
            return Change.RESUME
        return None
