"""Helpers for integration tests: produce prompts, collect answers, read group lag."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.admin import describe_topics
from pipeline.config import Settings
from schemas.headers import header_value

Item = tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]


async def produce(settings: Settings, topic: str, items: Sequence[Item]) -> list[tuple[int, int]]:
    """Produce (key, value, headers) items; returns (partition, offset) of each."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=k, headers=list(h)) for k, v, h in items]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


async def produce_stamped(
    settings: Settings, topic: str, items: Sequence[Item]
) -> list[tuple[int, int, int]]:
    """Produce (key, value, headers) items; returns (partition, offset, timestamp ms) of each:
    what a request id derived from the record needs (with the cluster id)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5
    )
    await producer.start()
    stamps = [int(time.time() * 1000)] * len(items)  # set here: the record keeps exactly this
    try:
        futures = [
            await producer.send(topic, v, key=k, headers=list(h), timestamp_ms=stamp)
            for (k, v, h), stamp in zip(items, stamps, strict=True)
        ]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset, stamp) for m, stamp in zip(metas, stamps, strict=True)]


@dataclass
class Collected:
    records: list[Any] = field(default_factory=list)

    def by_request(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for rec in self.records:
            rid = header_value(list(rec.headers), "sluice-request-id") or "?"
            out.setdefault(rid, []).append(rec)
        return out


async def collect(
    settings: Settings,
    topic: str,
    *,
    until: int,
    within: float,
    unique: bool = True,
    extra_wait: float = 0.0,
    isolation: str = "read_uncommitted",
) -> Collected:
    """Read ``topic`` from the start until ``until`` records (distinct request ids if
    ``unique``) arrived or ``timeout`` passed; then read ``extra_wait`` more seconds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation,
    )
    await consumer.start()
    got = Collected()
    seen: set[str] = set()
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    got.records.append(rec)
                    seen.add(
                        header_value(list(rec.headers), "sluice-request-id") or uuid.uuid4().hex
                    )
            if (len(seen) if unique else len(got.records)) >= until:
                break
        end = time.monotonic() + extra_wait
        while time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                got.records.extend(records)
    finally:
        await consumer.stop()
    return got


async def group_lag(settings: Settings, group: str, topic: str) -> dict[int, tuple[int, int]]:
    """partition -> (committed, end offset) for ``group`` on ``topic``."""
    (info,) = await describe_topics(settings, [topic])
    assert info.partitions > 0, f"{topic} has no partitions"
    client = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await client.start()
    try:
        committed = await client.list_consumer_group_offsets(group)
    finally:
        await client.close()
    return {
        p: (committed[tp].offset if (tp := TopicPartition(topic, p)) in committed else 0, end)
        for p, end in info.end_offsets.items()
    }


def prompt(text: str, **fields: Any) -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": text}], **fields})
