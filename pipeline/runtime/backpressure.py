"""The stage loop's bound on unfinished work, without Kafka: when to pause, when to resume, and
how many records the next poll may ask for.

Two bounds, records and bytes (of the records' values): every assigned partition is paused once
either is reached by the work in flight (consumed, not yet finished) and resumed once both are
at most half of theirs. Each poll asks for no more records than the room left, so the record
bound is never overshot; the byte bound can be overshot by one poll (at most the consumer's
``fetch_max_bytes``), since a poll cannot ask for bytes. The consumer keeps polling while
paused, so the group does not rebalance it away.
"""

from __future__ import annotations

import enum


class Change(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"


class InFlightBound:
    """Pause at ``max_records`` or ``max_bytes`` in flight, resume at half of both; one
    instance per consumer. ``max_bytes`` None: records only."""

    def __init__(self, max_records: int, max_bytes: int | None = None) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.paused = False

    def over(self, in_flight: int, in_flight_bytes: int = 0) -> bool:
        """Is either bound reached?"""
        full = self.max_bytes is not None and in_flight_bytes >= self.max_bytes
        return in_flight >= self.max_records or full

    def update(self, in_flight: int, in_flight_bytes: int = 0) -> Change | None:
        """The change to apply to the assigned partitions now, if any."""
        if not self.paused and self.over(in_flight, in_flight_bytes):
            self.paused = True
            return Change.PAUSE
        bytes_low = self.max_bytes is None or in_flight_bytes <= self.max_bytes // 2
        if self.paused and in_flight <= self.max_records // 2 and bytes_low:
            self.paused = False
            return Change.RESUME
        return None

    def room(self, in_flight: int) -> int:
        """How many records the next poll may bring (at least 1: a poll asks for something)."""
        return max(1, self.max_records - in_flight)
