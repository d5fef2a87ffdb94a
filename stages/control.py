"""Cancellation, compute side: every compute worker reads the control topic.

A :class:`CancelListener` consumes ``<prefix>control`` with a consumer of its own: no group (each
worker sees every cancel), every partition, from the end (a cancel published before the worker
started is for a request some other worker held). Each :class:`~schemas.streaming.CancelMessage`
goes to ``on_cancel(request_id, reason)``; compute aborts that request if it holds it, and does
nothing otherwise. A record that is not a cancel is counted and skipped. Until the control topic
exists the listener looks for it again every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter

from pipeline.config import Settings
from schemas.errors import SchemaError
from schemas.messages import decode
from schemas.streaming import CancelMessage

log = logging.getLogger(__name__)

RETRY_S = 5.0  # how often a missing control topic is looked for again

OnCancel = Callable[[str, str], bool]  # (request id, reason) -> whether it was held here


class CancelListener:
    """Reads cancels from the control topic; see the module's text."""

    def __init__(self, settings: Settings, on_cancel: OnCancel) -> None:
        self.settings = settings
        self.topic = settings.topics.control
        self.on_cancel = on_cancel
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.assigned = asyncio.Event()  # set once it reads the control topic's partitions
        self.cancels = Counter(
            "sluice_compute_cancels_total",
            "Cancels read from the control topic, by outcome: `applied` (this worker held the "
            "request and aborted it), `unknown` (not held here: a no-op), `invalid`.",
            ["outcome"],
            registry=None,
        )

    def collectors(self) -> list[Any]:
        return [self.cancels]

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **self.settings.kafka_common(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        await self._consumer.start()
        await self._assign()
        self._task = asyncio.create_task(self._control_loop(), name="control_loop")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _assign(self) -> bool:
        """Read every partition of the control topic from its end; False while it is missing."""
        consumer = self._consumer
        assert consumer is not None
        # A consumer without a subscription caches no metadata for the topic: ask the broker.
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(self.topic)
        if not partitions:
            return False
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve "the end" now: a cancel sent after start() is seen
            await consumer.position(tp)
        self.assigned.set()
        log.info("compute: reading cancels from %s (%d partitions)", self.topic, len(tps))
        return True

    async def _control_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        if not self.assigned.is_set():
            log.warning("compute: no control topic %s yet; cancels are not read", self.topic)
        while not self.assigned.is_set():
            await asyncio.sleep(RETRY_S)
            try:
                await self._assign()
            except KafkaError as exc:
                log.warning("compute: cannot read %s yet: %r", self.topic, exc)
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("compute: reading %s failed: %r", self.topic, exc)
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    self._apply(record.value, f"{record.topic}[{record.partition}]@{record.offset}")

    def _apply(self, value: bytes | None, where: str) -> None:
        try:
            cancel = decode(CancelMessage, value)
        except SchemaError as exc:
            self.cancels.labels("invalid").inc()
            log.warning("compute: %s is not a cancel (%s); skipped", where, exc.reason)
            return
        held = self.on_cancel(cancel.id, cancel.reason)
        self.cancels.labels("applied" if held else "unknown").inc()
        if held:
            log.info("compute: %s cancelled request %s (%s)", where, cancel.id, cancel.reason)
