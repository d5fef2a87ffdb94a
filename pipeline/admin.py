"""Topic administration: create every Sluice topic (idempotent) and describe them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from pipeline.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    end_offsets: dict[int, int]

    @property
    def messages(self) -> int:
        """End offsets summed: the number of records ever written (retention aside)."""
        return sum(self.end_offsets.values())


def admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**settings.kafka_common(), request_timeout_ms=15000)


async def create_topics(
    settings: Settings, names: Iterable[str] | None = None, partitions: int | None = None
) -> tuple[list[str], list[str]]:
    """Create topics that are missing; returns (created, already there)."""
    wanted = list(names) if names is not None else settings.topics.all_topics()
    parts = partitions or settings.partitions
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created: list[str] = []
        if missing:
            rf = settings.replication_factor
            response = await admin.create_topics([NewTopic(t, parts, rf) for t in missing])
            for topic, code, message in response.topic_errors:
                if code == 0:
                    created.append(topic)
                elif code != TopicAlreadyExistsError.errno:
                    raise for_code(code)(f"creating topic {topic}: {message}")
        return created, [t for t in wanted if t not in created]
    finally:
        await admin.close()


async def describe_topics(
    settings: Settings, names: Iterable[str] | None = None
) -> list[TopicInfo]:
    """Partitions and end offsets per topic (missing topics are left out)."""
    wanted = list(names) if names is not None else settings.topics.all_topics()
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        present = [t for t in wanted if t in existing]
        described = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    partitions = {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described}
    tps = [TopicPartition(t, p) for t in present for p in partitions.get(t, [])]
    consumer = AIOKafkaConsumer(**settings.kafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
    return [
        TopicInfo(
            t,
            len(partitions.get(t, [])),
            {tp.partition: off for tp, off in ends.items() if tp.topic == t},
        )
        for t in present
    ]


def _offsets_of(topic: str, ends: dict[TopicPartition, int]) -> dict[int, int]:
    return {tp.partition: off for tp, off in ends.items() if tp.topic == topic}


async def missing_topics(settings: Settings, names: Iterable[str]) -> list[str]:
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [t for t in names if t not in existing]
