"""Poison records on the real broker: an undecodable record is skipped and its partition goes
on; a record the broker refuses costs that record, not the producer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.admin import create_topics
from pipeline.config import Settings
from pipeline.runtime.batch import Output, Record
from pipeline.runtime.dead_letters import SLUICE_DLT_TRUNCATED
from pipeline.runtime.produce_errors import send_outputs
from pipeline.runtime.undecodable import (
    UNDECODABLE_ERRORS,
    dead_letter_undecodable,
    recover,
    rewind,
)
from schemas.dlt import DLT_ORIGINAL_OFFSET, decode_dlt_int
from schemas.headers import header_bytes, header_value
from tests.chaos.raw import send_raw_batch

BAD_KEY = b"\xff\xfe-not-utf8"


async def _consume_surviving(
    bootstrap: str, tps: list[TopicPartition], want: int
) -> tuple[list[Record], list[Output]]:
    """What a loop wired with ``recover`` takes from ``tps``: records and dead letters."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    consumer.assign(tps)
    taken: list[Record] = []
    dead: list[Output] = []
    next_offset = {tp: 0 for tp in tps}
    try:
        for _ in range(50):
            if len(taken) >= want:
                break
            try:
                data = await consumer.getmany(timeout_ms=500)
            except UNDECODABLE_ERRORS as exc:
                skipped = await recover(consumer, tps, exc)
                for item in skipped:
                    taken.extend(item.records)
                    dead.extend(dead_letter_undecodable(u, group="g") for u in item.undecodable)
                    next_offset[item.tp] = item.resume_at
                rewind(consumer, {tp: o for tp, o in next_offset.items() if tp not in
                                  {s.tp for s in skipped}})  # fmt: skip
                continue
            for tp, messages in data.items():
                taken.extend(Record.of(m, m.timestamp) for m in messages)
                if messages:
                    next_offset[tp] = messages[-1].offset + 1
    finally:
        await consumer.stop()
    return taken, dead


async def test_a_partition_with_an_undecodable_record_keeps_going(
    bootstrap: str, topic_factory: Callable[..., Awaitable[str]]
) -> None:
    topic = await topic_factory(partitions=2)
    await create_topics(Settings(bootstrap_servers=bootstrap), [f"{topic}.DLT"], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await send_raw_batch(producer, topic, 0, [(b"c", b"g0", []), (b"c", b"g1", [])])
        await send_raw_batch(
            producer,
            topic,
            0,
            [
                (b"c", b"g2", []),
                (b"c", b"poison", [(b"ok", b"1"), (BAD_KEY, b"x")]),
                (b"c", b"g4", []),
            ],
        )
        await send_raw_batch(producer, topic, 0, [(b"c", b"g5", [])])
        await send_raw_batch(producer, topic, 1, [(b"d", b"h0", []), (b"d", b"h1", [])])
        for i in range(6, 26):  # canaries behind it, as ordinary produces
            await producer.send_and_wait(topic, f"g{i}".encode(), key=b"c", partition=0)
    finally:
        await producer.stop()

    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    taken, dead = await _consume_surviving(bootstrap, tps, want=27)

    values = sorted(r.value or b"" for r in taken)
    expected = sorted([f"g{i}".encode() for i in range(26) if i != 3] + [b"h0", b"h1"])
    assert values == expected  # every good record once, the ones around the poison included
    assert [(r.partition, r.offset) for r in taken if r.value == b"g4"] == [(0, 4)]
    (letter,) = dead
    assert letter.topic == f"{topic}.DLT"
    assert letter.value == b"poison"
    assert decode_dlt_int(header_bytes(letter.headers, DLT_ORIGINAL_OFFSET) or b"") == 3
    assert header_value(letter.headers, "sluice-dlt-reason") == "undecodable"
    assert header_bytes(letter.headers, "\\xff\\xfe-not-utf8") == b"x"

    # The dead letter itself is producible.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        assert await send_outputs(producer, dead, stage="t", max_request_size=1 << 20) == []
    finally:
        await producer.stop()


async def test_a_record_larger_than_a_topic_takes_costs_that_record_only(
    bootstrap: str, kafka_broker: object
) -> None:
    topic = f"small-{uuid.uuid4().hex}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "20000"})]
        )
        await admin.create_topics([NewTopic(f"{topic}.DLT", 1, 1)])
    finally:
        await admin.close()
    await asyncio.sleep(0.5)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        refused = await send_outputs(
            producer,
            [
                Output(topic, b"k", b"small", []),
                Output(topic, b"k", b"x" * 50_000, []),  # aiokafka allows it, the topic not
                Output(f"{topic}.DLT", b"k", b"y" * 2_000_000, []),
            ],
            stage="t",
            max_request_size=19_000,  # what the stage's topics accept
        )
        assert [(r.index, r.error.reason) for r in refused] == [(1, "record-too-large")]
        # The same (idempotent) producer goes on delivering to that partition.
        again = await send_outputs(
            producer, [Output(topic, b"k", b"after", [])], stage="t", max_request_size=19_000
        )
        assert again == []
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.subscribe([topic, f"{topic}.DLT"])
        got: dict[str, list[bytes]] = {}
        for _ in range(20):
            data = await consumer.getmany(timeout_ms=500)
            for tp, messages in data.items():
                got.setdefault(tp.topic, []).extend(m.value for m in messages)
                for m in messages:
                    if tp.topic.endswith(".DLT"):
                        assert dict(m.headers)[SLUICE_DLT_TRUNCATED] == b"value"
            if len(got.get(topic, [])) >= 2 and got.get(f"{topic}.DLT"):
                break
    finally:
        await consumer.stop()
    assert got[topic] == [b"small", b"after"]
    (dlt_value,) = got[f"{topic}.DLT"]
    assert 18_000 < len(dlt_value) < 19_000
