"""The stage loop's fetch step: ``getmany``, and a way past records aiokafka cannot unpack.

``Fetcher.fetch`` returns the records of one poll per partition. When ``getmany`` raises one of
``UNDECODABLE_ERRORS`` (a header key that is not UTF-8), it follows ``undecodable.py``: every
assigned partition goes back to the offset after the last record the loop took from it (or to
its committed offset, or the beginning, when the loop has taken none), since the failed call may
have moved positions past records it never returned; then ``recover`` reads the raw bytes at
each fetched partition's position, and the poll returns the decodable records of that window
plus the undecodable ones, to be dead-lettered. Their offsets all go to the offset tracker, so
the partition commits past them and goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from pipeline.runtime.batch import Record
from pipeline.runtime.undecodable import UNDECODABLE_ERRORS, Undecodable, recover, rewind

log = logging.getLogger(__name__)


@dataclass
class Fetched:
    """One poll: records to handle and undecodable records to dead-letter, per partition."""

    records: dict[TopicPartition, list[Record]] = field(default_factory=dict)
    undecodable: dict[TopicPartition, list[Undecodable]] = field(default_factory=dict)

    def partitions(self) -> list[TopicPartition]:
        return sorted({*self.records, *self.undecodable})

    def offsets(self, tp: TopicPartition) -> list[int]:
        """Every offset this poll took from ``tp``, ascending (for the offset tracker)."""
        taken = [r.offset for r in self.records.get(tp, ())]
        taken += [u.raw.offset for u in self.undecodable.get(tp, ())]
        return sorted(taken)


class Fetcher:
    """Polls one consumer; remembers where the loop has taken records up to."""

    def __init__(self, consumer: Any, cluster_id: str = "") -> None:
        self.consumer = consumer
        self.cluster_id = cluster_id  # stamped on every record: request ids derive from it
        self._next: dict[TopicPartition, int] = {}

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Revoked partitions: their next owner starts from the committed offsets."""
        for tp in partitions:
            self._next.pop(tp, None)

    async def fetch(self, *, timeout_ms: int, max_records: int) -> Fetched:
        try:
            data = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except UNDECODABLE_ERRORS as exc:
            return await self._recover(exc)
        fetched = Fetched()
        for tp, messages in data.items():
            if messages:
                fetched.records[tp] = [Record.of(m, m.timestamp, self.cluster_id) for m in messages]
                self._next[tp] = messages[-1].offset + 1
        return fetched

    async def _recover(self, exc: BaseException) -> Fetched:
        consumer = self.consumer
        assigned: set[TopicPartition] = set(consumer.assignment())
        rewind(consumer, await self._positions(assigned))
        fetching = sorted(assigned - set(consumer.paused()))
        skipped = await recover(consumer, fetching, exc)
        fetched = Fetched()
        for item in skipped:
            if item.records:
                fetched.records[item.tp] = [
                    dataclasses.replace(r, cluster_id=self.cluster_id) for r in item.records
                ]
            fetched.undecodable[item.tp] = item.undecodable
            self._next[item.tp] = item.resume_at
            log.warning(
                "%s[%d]: skipped %d undecodable records; reading on at %d",
                item.tp.topic,
                item.tp.partition,
                len(item.undecodable),
                item.resume_at,
            )
        return fetched

    async def _positions(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each partition reads on: after the last record taken, else its committed
        offset; a partition with neither goes to its beginning (``auto_offset_reset``)."""
        positions: dict[TopicPartition, int] = {}
        for tp in assigned:
            if tp in self._next:
                positions[tp] = self._next[tp]
                continue
            committed = await self.consumer.committed(tp)
            if committed is not None:
                positions[tp] = committed
            else:
                await self.consumer.seek_to_beginning(tp)
        return positions
