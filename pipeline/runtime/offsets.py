"""Per-partition offset tracking for out-of-order completion.

Offsets are registered as they are consumed (in order, per partition) and marked done as their
work finishes (in any order). The committable position of a partition is one past the highest
offset below which everything is done: Kafka's "next offset to read" semantics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class PartitionOffsets:
    pending: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    position: int | None = None  # next offset to commit (one past the contiguous done prefix)
    committed: int | None = None
    epoch: int = 0

    def add(self, offset: int) -> None:
        if self.pending and offset <= self.pending[-1]:
            raise ValueError(f"offset {offset} registered out of order after {self.pending[-1]}")
        if not self.pending and self.position is None:
            self.position = offset
        self.pending.append(offset)

    def finish(self, offset: int) -> None:
        self.done.add(offset)
        while self.pending and self.pending[0] in self.done:
            head = self.pending.popleft()
            self.done.discard(head)
            self.position = head + 1

    @property
    def in_flight(self) -> int:
        return len(self.pending)


class OffsetTracker:
    """Tracks every assigned partition; knows what may be committed."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, PartitionOffsets] = {}
        self._epochs: dict[TopicPartition, int] = {}

    def assign(self, tp: TopicPartition) -> int:
        """Start tracking a (re)assigned partition; returns its epoch."""
        epoch = self._epochs.get(tp, 0) + 1
        self._epochs[tp] = epoch
        self._parts[tp] = PartitionOffsets(epoch=epoch)
        return epoch

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a partition; results still in flight for it will be ignored (stale epoch)."""
        self._parts.pop(tp, None)

    def epoch(self, tp: TopicPartition) -> int:
        part = self._parts.get(tp)
        return part.epoch if part is not None else -1

    def add(self, tp: TopicPartition, offset: int) -> int:
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = PartitionOffsets(epoch=self.assign(tp))
        part.add(offset)
        return part.epoch

    def add_many(self, tp: TopicPartition, offsets: list[int]) -> int:
        epoch = self.epoch(tp)
        for offset in offsets:
            epoch = self.add(tp, offset)
        return epoch

    def finish(self, tp: TopicPartition, offset: int, epoch: int) -> bool:
        """Mark one offset done; False when the partition was revoked since (stale work)."""
        part = self._parts.get(tp)
        if part is None or part.epoch != epoch:
            return False
        part.finish(offset)
        return True

    def committable(self) -> dict[TopicPartition, int]:
        """Positions that moved past the last commit."""
        return {
            tp: p.position
            for tp, p in self._parts.items()
            if p.position is not None and p.position != p.committed
        }

    def positions(self) -> dict[TopicPartition, int | None]:
        return {tp: p.position for tp, p in self._parts.items()}

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = off

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self._parts.values())

    def in_flight_for(self, tp: TopicPartition) -> int:
        part = self._parts.get(tp)
        return part.in_flight if part is not None else 0
