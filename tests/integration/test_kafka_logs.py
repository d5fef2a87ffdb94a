"""A broker stopped under a running consumer and producer: aiokafka's log stays a few lines
per interval, and the summary line says which broker and how often it was tried."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from infra.process import InfraError
from pipeline import admin
from pipeline.config import Settings
from pipeline.logs import KAFKA_LOGGER, install_kafka_log_summary, remove_kafka_log_summary

INTERVAL_S = 3.0
OUTAGE_S = 15.0


class Lines(logging.Handler):
    """What would reach the process's log: records at WARNING and up."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Attempts(logging.Handler):
    """Every aiokafka record of WARNING and up, before the summary holds any back."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _produce_loop(producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(KafkaError, TimeoutError):
            await asyncio.wait_for(producer.send_and_wait("outage", b"x"), timeout=1.0)
        await asyncio.sleep(0.1)


async def _consume_loop(consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(KafkaError):
            await consumer.getmany(timeout_ms=200)


async def test_a_stopped_broker_gives_a_bounded_log_with_a_summary_line(tmp_path: Path) -> None:
    try:  # a broker of its own: the session's must stay up for the other tests
        broker = await asyncio.to_thread(start_broker, BrokerConfig(data_dir=tmp_path / "kafka"))
    except InfraError as exc:
        pytest.fail(f"the Kafka broker did not start:\n{exc}")
    await admin.create_topics(Settings(bootstrap_servers=broker.address), ["outage"], 3)
    lines, attempts = Lines(), Attempts()
    root, kafka = logging.getLogger(), logging.getLogger(KAFKA_LOGGER)
    level = kafka.level
    kafka.setLevel(logging.WARNING)
    root.addHandler(lines)
    summary = install_kafka_log_summary(INTERVAL_S)
    summary.addFilter(lambda record: attempts.handle(record) or True)
    producer = AIOKafkaProducer(bootstrap_servers=broker.address, acks="all")
    consumer = AIOKafkaConsumer(
        "outage", bootstrap_servers=broker.address, group_id="outage", auto_offset_reset="earliest"
    )
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        await producer.start()
        await consumer.start()
        tasks = [
            asyncio.create_task(_produce_loop(producer, stop), name="produce_loop"),
            asyncio.create_task(_consume_loop(consumer, stop), name="consume_loop"),
        ]
        await asyncio.sleep(3)  # joined and producing
        before = len(lines.records)
        await asyncio.to_thread(stop_broker, broker)
        stopped = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        outage = time.monotonic() - stopped
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=10)
            assert not stuck, f"client loops did not stop: {stuck}"
        with contextlib.suppress(KafkaError, TimeoutError):
            await asyncio.wait_for(consumer.stop(), 10)
        with contextlib.suppress(KafkaError, TimeoutError):
            await asyncio.wait_for(producer.stop(), 10)
        remove_kafka_log_summary()
        root.removeHandler(lines)
        kafka.setLevel(level)
        stop_broker(broker)

    written = [r for r in lines.records[before:] if r.name.startswith(KAFKA_LOGGER)]
    messages = [r.getMessage() for r in written]
    causes = {(r.name, r.msg) for r in written}
    # per cause: its first record, then at most one line per interval (plus the final count)
    bound = len(causes) * (2 + outage / INTERVAL_S)
    assert len(written) <= bound, "\n".join(messages)
    assert attempts.count > 3 * len(written), (attempts.count, messages)  # it did hold back
    port = broker.address.rsplit(":", 1)[1]
    summaries = [m for m in messages if m.startswith("broker ") and " unreachable for " in m]
    assert summaries, "\n".join(messages)
    assert any(f":{port} unreachable for " in m for m in summaries), summaries
    print(
        f"\n{attempts.count} aiokafka records at WARNING+ in a {outage:.0f} s outage; "
        f"{len(written)} lines written, e.g. {summaries[-1]!r}"
    )
