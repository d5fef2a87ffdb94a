"""Batch job state in Kafka: the compacted ``<prefix>batches`` topic and views of it.

Each batch has two keys on the topic, both in the partition ``partition_for(batch id)``:

- ``<batch id>``: its ``BatchObject`` (``ce_type`` ``sluice.batch``). The gateway writes it once,
  at creation (``validating``); from then on only the batcher that owns the partition writes it.
- ``<batch id>/cancel``: a ``BatchCancel`` the gateway writes when a client cancels.

One writer per key, so compaction (``cleanup.policy=compact``) keeps exactly what a reader
needs: the latest state and whether a cancel was asked for. ``BatchView`` is that reading,
without Kafka: the gateway keeps one over every partition (so any replica answers for any
batch), the batcher one over the partitions it owns. A batch with a cancel request that is not
finished yet reads as ``cancelling``.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import TopicAlreadyExistsError, for_code

from pipeline.admin import admin_client, new_topic, wait_for_leaders
from pipeline.config import Settings
from pipeline.errors import FatalError
from schemas.batch import CE_BATCH, CE_BATCH_CANCEL, BatchCancel, BatchObject
from schemas.errors import SchemaError
from schemas.headers import HeadersIn, header_value, make_headers
from schemas.wire import decode, encode

log = logging.getLogger(__name__)

CANCEL_SUFFIX = "/cancel"


def batches_topic(settings: Settings) -> str:
    return settings.topics.batches


def batch_lane_topics(settings: Settings) -> tuple[str, str]:
    """The batch lane: ``<prefix>prompts.batch`` and ``<prefix>tokenized.batch``."""
    return settings.topics.prompts_batch, settings.topics.tokenized_batch


def batch_prompts_topic(settings: Settings) -> str:
    """Where the batcher publishes requests (``SLUICE_BATCH_LANE``)."""
    if settings.batch_lane == "batch":
        return settings.topics.prompts_batch
    return settings.topics.prompts


async def topic_partitions(settings: Settings, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic``, as the brokers describe it; ``FatalError`` when missing."""
    admin = admin_client(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [
        p["partition"] for d in described if d["error_code"] == 0 for p in d["partitions"]
    ]
    if not partitions:
        raise FatalError(f"the topic {topic} is missing (create it with: sluice topics create)")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


def partition_for(batch_id: str, partitions: int) -> int:
    """The partition of both of a batch's keys: stable across processes and restarts."""
    return zlib.crc32(batch_id.encode()) % partitions


async def ensure_batches_topic(settings: Settings) -> None:
    """Create the compacted batches topic when it is missing (idempotent, any replica; ``sluice
    topics create`` makes it too, the same way: ``pipeline.admin.new_topic``)."""
    topic = batches_topic(settings)
    admin = admin_client(settings)
    await admin.start()
    try:
        if topic in set(await admin.list_topics()):
            return
        response = await admin.create_topics([new_topic(settings, topic)])
        for name, code, message in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise for_code(code)(f"creating topic {name}: {message}")
        log.info("created the compacted topic %s (%d partitions)", topic, settings.partitions)
    finally:
        await admin.close()
    await wait_for_leaders(settings, [topic])


# --- reading -----------------------------------------------------------------------------------


@dataclass
class BatchView:
    """The latest state of each batch and the cancels asked for, from the batches topic."""

    batches: dict[str, BatchObject] = field(default_factory=dict)
    cancels: dict[str, BatchCancel] = field(default_factory=dict)
    skipped: int = 0

    def apply(self, key: bytes | None, value: bytes | None, headers: HeadersIn) -> str | None:
        """Take one record in; returns the batch id it concerns (None when it was skipped)."""
        ce_type = header_value(headers, "ce_type")
        name = key.decode("utf-8", "replace") if key is not None else ""
        try:
            if ce_type == CE_BATCH_CANCEL:
                cancel = decode(BatchCancel, value)
                self.cancels[cancel.batch_id] = cancel
                return cancel.batch_id
            if ce_type == CE_BATCH:
                batch = decode(BatchObject, value)
                self.batches[batch.id] = batch
                return batch.id
        except SchemaError as exc:
            log.warning("batches topic: record %r skipped: %s", name, exc.message)
        self.skipped += 1
        return None

    def put(self, batch: BatchObject) -> None:
        self.batches[batch.id] = batch

    def cancel_asked(self, batch_id: str) -> BatchCancel | None:
        return self.cancels.get(batch_id)

    def get(self, batch_id: str) -> BatchObject | None:
        """The batch as clients see it: ``cancelling`` once a cancel is asked and not done."""
        batch = self.batches.get(batch_id)
        if batch is None:
            return None
        cancel = self.cancels.get(batch_id)
        if cancel is not None and batch.status in ("validating", "in_progress", "finalizing"):
            return batch.model_copy(
                update={"status": "cancelling", "cancelling_at": cancel.requested_at}
            )
        return batch

    def page(self, after: str | None, limit: int) -> tuple[list[BatchObject], bool]:
        """Batches newest first, those after the batch ``after``; and whether more follow."""
        ordered = sorted(self.batches.values(), key=lambda b: (b.created_at, b.id), reverse=True)
        if after is not None:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        chosen = [self.get(b.id) or b for b in ordered[:limit]]
        return chosen, len(ordered) > limit


# --- writing -----------------------------------------------------------------------------------


class StateWriter:
    """Writes batch states and cancels to their batch's partition, acknowledged by every
    in-sync replica before it returns."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, source: str) -> None:
        self.topic = batches_topic(settings)
        self.producer = producer
        self.source = source
        self._partitions: int | None = None

    async def _partition(self, batch_id: str) -> int:
        if self._partitions is None:
            found = await self.producer.partitions_for(self.topic)  # waits for metadata
            if not found:
                raise RuntimeError(f"topic {self.topic} has no partitions")
            self._partitions = len(found)
        return partition_for(batch_id, self._partitions)

    async def put(self, batch: BatchObject) -> None:
        partition = await self._partition(batch.id)
        headers = make_headers(CE_BATCH, self.source, batch.id)
        await self.producer.send_and_wait(
            self.topic, encode(batch), key=batch.id.encode(), partition=partition, headers=headers
        )

    async def cancel(self, batch_id: str) -> BatchCancel:
        cancel = BatchCancel(batch_id=batch_id, requested_at=int(time.time()))
        partition = await self._partition(batch_id)
        headers = make_headers(CE_BATCH_CANCEL, self.source, batch_id)
        key = f"{batch_id}{CANCEL_SUFFIX}".encode()
        await self.producer.send_and_wait(
            self.topic, encode(cancel), key=key, partition=partition, headers=headers
        )
        return cancel
