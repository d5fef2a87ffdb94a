"""The stage loop's bound on unfinished work, without Kafka: when to pause, when to resume, and
how many records the next poll may ask for.

Every assigned partition is paused once ``max_records`` records are in flight (consumed, not
yet finished) and resumed once at most half of that is; each poll asks for no more than the
room left, so the bound is never overshot. The consumer keeps polling while paused, so the
group does not rebalance it away.
"""

from __future__ import annotations

import enum


class Change(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"


class InFlightBound:
    """Pause at ``max_records`` in flight, resume at half; one instance per consumer."""

    def __init__(self, max_records: int) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.max_records = max_records
        self.paused = False

    def update(self, in_flight: int) -> Change | None:
        """The change to apply to the assigned partitions now, if any."""
        if not self.paused and in_flight >= self.max_records:
            self.paused = True
            return Change.PAUSE
        if self.paused and in_flight <= self.max_records // 2:
            self.paused = False
            return Change.RESUME
        return None

    def room(self, in_flight: int) -> int:
        """How many records the next poll may bring (at least 1: a poll asks for something)."""
        return max(1, self.max_records - in_flight)
