"""The batcher's reading of the answers topic: every answer to a batch line, routed to its job.

A consumer with no group, assigned every partition of the answers topic. It starts at the end;
``sync(since_ms)`` rewinds it to the first answer written at or after ``since_ms`` (a batch's
creation, found with ``offsets_for_times``) and returns once everything written before the call
has been read. That is how a batcher that took over a batch, after a crash or a rebalance, learns
which lines are already answered before it publishes the rest. A rewind re-reads answers other
jobs have seen; ``Job.offer`` ignores a line's second answer, so that costs reading, not
correctness. The answers topic's retention must cover the completion window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.config import Settings
from schemas.batch import parse_line_request_id
from schemas.headers import SLUICE_REQUEST_ID, header_value
from stages.batch_state import topic_partitions

log = logging.getLogger(__name__)

Route = Callable[[str, int, str, bytes | None], None]
"""``route(batch_id, line, request_id, value)``: called for every answer to a batch line."""


class AnswersFollower:
    def __init__(self, settings: Settings, route: Route) -> None:
        self.settings = settings
        self.topic = settings.topics.answers
        self.route = route
        self.consumer: AIOKafkaConsumer | None = None
        self.tps: list[TopicPartition] = []
        self.polled_at = time.monotonic()
        self._progress = asyncio.Condition()

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            **self.settings.kafka_common(),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self.consumer = consumer
        await consumer.start()
        self.tps = await topic_partitions(self.settings, self.topic)
        consumer.assign(self.tps)
        await consumer.seek_to_end(*self.tps)
        for tp in self.tps:
            await consumer.position(tp)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    async def sync(self, since_ms: int) -> None:
        """Rewind to ``since_ms`` where the reading is past it; wait until caught up."""
        consumer = self.consumer
        assert consumer is not None
        found = await consumer.offsets_for_times({tp: since_ms for tp in self.tps})
        ends = await consumer.end_offsets(self.tps)
        for tp in self.tps:
            at = found.get(tp)
            target = at.offset if at is not None else ends[tp]
            if target < await consumer.position(tp):
                consumer.seek(tp, target)
        async with self._progress:
            while not await self._reached(ends):
                await self._progress.wait()

    async def _reached(self, ends: dict[TopicPartition, int]) -> bool:
        consumer = self.consumer
        assert consumer is not None
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return False
        return True

    async def _answers_loop(self) -> None:
        """Read answers for ever, routing batch ones; wake every ``sync`` after each fetch."""
        consumer = self.consumer
        assert consumer is not None
        while True:
            try:
                data = await consumer.getmany(timeout_ms=200, max_records=2000)
            except KafkaError as exc:
                log.warning("batcher: reading %s failed: %s", self.topic, exc)
                await asyncio.sleep(1.0)
                continue
            self.polled_at = time.monotonic()
            for records in data.values():
                for r in records:
                    request_id = header_value(r.headers, SLUICE_REQUEST_ID)
                    parsed = parse_line_request_id(request_id) if request_id else None
                    if parsed is not None and request_id is not None:
                        self.route(parsed[0], parsed[1], request_id, r.value)
            async with self._progress:
                self._progress.notify_all()
