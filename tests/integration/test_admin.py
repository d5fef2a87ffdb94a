"""Topics that are ready when ``create_topics`` returns, and a coordinator ready for the groups.

A client that starts right after topics are created must meet no leader changes and no missing
coordinator: every retry aiokafka would make is logged as a warning or an error, which is what
``sluice demo`` and a fresh stage used to print.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from pipeline import admin
from pipeline.config import Settings


async def test_fresh_topics_take_writes_and_groups_join_without_a_retry(
    settings_factory: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_factory(partitions=6)
    group = f"g-{uuid.uuid4().hex[:12]}"
    with caplog.at_level(logging.WARNING, logger="aiokafka"):
        created, _ = await admin.create_topics(settings)
        assert set(created) == set(settings.topics.all_topics())
        await admin.wait_for_coordinator(settings, [group])
        producer = AIOKafkaProducer(**settings.kafka_common(), acks="all")
        await producer.start()
        try:
            for topic in settings.topics.main_topics():
                for partition in range(6):
                    await producer.send_and_wait(topic, b"x", partition=partition)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            settings.topics.prompts,
            **settings.kafka_common(),
            group_id=group,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            got = 0
            for _ in range(50):
                batch = await consumer.getmany(timeout_ms=200)
                got += sum(len(records) for records in batch.values())
                if got == 6:
                    break
        finally:
            await consumer.stop()
    assert got == 6
    noise = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("aiokafka")]
    assert noise == []


async def test_waiting_for_a_topic_that_never_comes_names_it(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    with pytest.raises(KafkaTimeoutError, match="no leader yet for never-made"):
        await admin.wait_for_leaders(settings, ["never-made"], timeout_s=1.0)
