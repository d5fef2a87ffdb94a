"""The stage loop's Kafka clients, configured in one place."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.config import Settings


def stage_producer(settings: Settings, group_id: str, *, max_request: int) -> AIOKafkaProducer:
    """``acks=all``, idempotent (transactional with ``exactly_once``); nothing larger than
    ``max_request`` is sent, single or batched: it is the smallest ``max.message.bytes`` of
    the topics the stage writes, and a record the broker refused would break the idempotent
    producer's sequence for its partition (fatal)."""
    kwargs: dict[str, Any] = {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
        "max_request_size": max_request,
        "max_batch_size": max_request,
    }
    if settings.exactly_once:
        # Stable per process slot: a restart fences the previous incarnation (see config).
        kwargs["transactional_id"] = f"{group_id}-{settings.instance_id}"
        kwargs["transaction_timeout_ms"] = settings.transaction_timeout_ms
    return AIOKafkaProducer(**settings.kafka_common(), **kwargs)


def stage_consumer(settings: Settings, group_id: str) -> AIOKafkaConsumer:
    """Manual commits, from the earliest offset when the group has none."""
    return AIOKafkaConsumer(
        **settings.kafka_common(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
        max_poll_records=settings.batch_max_records,
        fetch_max_wait_ms=max(1, settings.batch_max_wait_ms),
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
