"""One unit of work of the stage loop, start to finish: decide, deliver, mark the offsets done.

A unit is the records of one partition handed to the handler together (a whole poll's worth for
``unit="partition"`` stages, one record for ``unit="record"``), or the undecodable records a
poll skipped. With ``exactly_once``, each unit is one Kafka transaction (outputs plus its input
offsets), one at a time under a FIFO lock, so transactions commit in the order units were made.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import TopicPartition

from pipeline.observability.metrics import StageMetrics
from pipeline.runtime.batch import Batch, Record
from pipeline.runtime.delivery import Delivery
from pipeline.runtime.offsets import OffsetTracker
from pipeline.runtime.processing import RecordProcessor
from pipeline.runtime.undecodable import Undecodable, dead_letter_undecodable


class Units:
    """Runs units of one stage; ``finished`` is called after each, with its records."""

    def __init__(
        self,
        *,
        processor: RecordProcessor,
        delivery: Delivery,
        producer: Any,
        tracker: OffsetTracker,
        metrics: StageMetrics,
        exactly_once: bool,
        finished: Callable[[Sequence[Record]], None],
    ) -> None:
        self.processor = processor
        self.delivery = delivery
        self.producer = producer
        self.tracker = tracker
        self.metrics = metrics
        self.stage = processor.stage
        self.group_id = processor.group_id
        self.exactly_once = exactly_once
        self._finished = finished
        self._txn_lock = asyncio.Lock()
        self._latency = metrics.latency.labels(self.stage)  # hot path: bound once

    async def process(self, batch: Batch, tp: TopicPartition, epoch: int) -> None:
        """Decide every record, deliver the outputs, then mark the offsets done."""
        if self.exactly_once:
            async with self._txn_lock:
                decisions = await self.processor.process(batch)
                async with self.producer.transaction():
                    await self.delivery.deliver(decisions)
                    last = batch.records[-1].offset
                    await self.producer.send_offsets_to_transaction({tp: last + 1}, self.group_id)
        else:
            decisions = await self.processor.process(batch)
            await self.delivery.deliver(decisions)
        now = time.time()
        for record in batch:
            self.tracker.finish(tp, record.offset, epoch)
            self._latency.observe(max(0.0, now - record.timestamp_ms / 1000))
        self._finished(batch.records)

    async def dead_letter_undecodable(
        self, items: list[Undecodable], tp: TopicPartition, epoch: int, *, upto: int
    ) -> None:
        """Records nobody can read: a dead letter each (reason ``undecodable``), then done.
        ``upto``: the offset after the last one of their poll (what a transaction commits;
        made after the poll's other units, it commits after them)."""
        dead = [dead_letter_undecodable(item, group=self.group_id) for item in items]
        if self.exactly_once:
            async with self._txn_lock, self.producer.transaction():
                await self.delivery.send(dead)
                await self.producer.send_offsets_to_transaction({tp: upto}, self.group_id)
        else:
            await self.delivery.send(dead)
        self.metrics.dead_letters.labels(self.stage, "undecodable").inc(len(items))
        for item in items:
            self.tracker.finish(tp, item.raw.offset, epoch)
        self._finished(())
