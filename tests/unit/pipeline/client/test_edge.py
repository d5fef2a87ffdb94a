"""The client's Kafka side with a fake producer: deadlines, reply addresses, retries while the
broker is away, cancels, streams and the answer that stands."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
)

from pipeline.client import PublishError, Reply, SluiceClient
from pipeline.client.publish import PublishTimeout, publish_until
from pipeline.config import Settings
from schemas.headers import SLUICE_ATTEMPT, header_value, make_headers
from schemas.messages import CE_ANSWER, CE_ANSWER_ERROR, ErrorAnswer, encode
from schemas.streaming import (
    CE_DELTA,
    SLUICE_DEADLINE,
    SLUICE_REPLY_TO,
    DeltaMessage,
    now_ms,
    parse_reply_to,
)
from tests.unit.pipeline.client.test_routing import completion


@dataclass
class Sent:
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass
class FakeProducer:
    """Takes every record, after failing the first ``failures`` sends with ``error``."""

    failures: int = 0
    error: type[Exception] = KafkaConnectionError
    sent: list[Sent] = field(default_factory=list)
    prompted: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        if self.failures > 0:
            self.failures -= 1
            raise self.error("broker away")
        self.sent.append(Sent(topic, value, key, headers))
        if topic.endswith("prompts"):
            self.prompted.set()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def on(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]

    async def stop(self) -> None:
        return None


def client_with(producer: FakeProducer, **settings: Any) -> SluiceClient:
    client = SluiceClient(
        Settings(topic_prefix="e.", publish_backoff_max_s=0.01, **settings), source="test"
    )
    client._producer = producer
    client.reply_partitions = [4]
    return client


@dataclass(frozen=True)
class Consumed:
    value: bytes | None
    headers: list[tuple[str, bytes]]
    topic: str = "e.replies"
    partition: int = 4
    offset: int = 0


def answer(rid: str, value: bytes, *, attempt: int = 1, error: bool = False) -> Consumed:
    ce_type = CE_ANSWER_ERROR if error else CE_ANSWER
    return Consumed(value, make_headers(ce_type, "pp", rid, extra={SLUICE_ATTEMPT: str(attempt)}))


def delta(rid: str, index: int, text: str, finish: str | None = None) -> Consumed:
    value = encode(DeltaMessage(id=rid, index=index, delta=text, finish_reason=finish))
    return Consumed(value, make_headers(CE_DELTA, "compute", rid))


async def answer_when_published(client: SluiceClient, producer: FakeProducer, *records: Any) -> str:
    await producer.prompted.wait()
    rid = orjson.loads(producer.on("e.prompts")[-1].value)["id"]
    client.router.offer_records([r(rid) if callable(r) else r for r in records])
    return str(rid)


async def test_every_prompt_carries_its_deadline_and_the_reply_address() -> None:
    producer = FakeProducer()
    client = client_with(producer)
    before = now_ms()
    task = asyncio.create_task(client.request("hi", timeout_s=30))
    await answer_when_published(client, producer, lambda rid: answer(rid, completion(rid)))
    assert (await task).ok
    (prompt,) = producer.on("e.prompts")
    deadline = int(header_value(prompt.headers, SLUICE_DEADLINE) or 0)
    assert before + 29_000 <= deadline <= now_ms() + 30_000
    address = parse_reply_to(prompt.headers)
    assert address is not None and (address.topic, address.partition) == ("e.replies", 4)
    assert header_value(prompt.headers, SLUICE_REPLY_TO) == "e.replies:4"


async def test_a_broker_outage_shorter_than_the_timeout_costs_nothing() -> None:
    producer = FakeProducer(failures=5, error=KafkaTimeoutError)
    client = client_with(producer)
    task = asyncio.create_task(client.request("hi", timeout_s=30))
    await answer_when_published(client, producer, lambda rid: answer(rid, completion(rid)))
    assert (await task).ok
    assert client.publish_retries == 5 and client.published == 1


async def test_an_outage_past_the_deadline_is_a_clear_timeout() -> None:
    producer = FakeProducer(failures=10**6)
    client = client_with(producer)
    reply = await client.request("hi", timeout_s=0.2)
    assert reply.timed_out and reply.status == 504
    assert isinstance(reply.answer, ErrorAnswer) and "Kafka" in reply.answer.error.message
    assert producer.sent == []


async def test_an_error_no_retry_fixes_is_raised_at_once() -> None:
    client = client_with(FakeProducer(failures=1, error=MessageSizeTooLargeError))
    with pytest.raises(PublishError, match="MessageSizeTooLargeError"):
        await client.request("hi", timeout_s=30)


async def test_a_producer_whose_sender_died_is_replaced_and_the_request_served() -> None:
    """After a long broker outage aiokafka's idempotent producer fails every send with
    OutOfOrderSequenceNumber for ever; the client starts a new producer and carries on."""
    dead = FakeProducer(failures=10**6, error=OutOfOrderSequenceNumber)
    fresh = FakeProducer()
    client = client_with(dead)

    async def new_producer() -> FakeProducer:
        return fresh

    client._new_producer = new_producer  # type: ignore[method-assign]
    task = asyncio.create_task(client.request("hi", timeout_s=30))
    await answer_when_published(client, fresh, lambda rid: answer(rid, completion(rid)))
    assert (await task).ok
    assert client.producer_replacements == 1 and client._producer is fresh
    assert dead.sent == [] and len(fresh.on("e.prompts")) == 1


async def test_a_send_waiting_on_a_replaced_producer_is_retried_on_the_new_one() -> None:
    """A send still waiting on the dead producer fails with ProducerClosed when another request
    replaced and stopped it; it is published on the new producer, not raised."""
    fresh = FakeProducer()

    class Replaced(FakeProducer):
        async def send(
            self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
        ) -> asyncio.Future[None]:
            client._producer = fresh
            raise ProducerClosed()

    client = client_with(Replaced())
    task = asyncio.create_task(client.request("hi", timeout_s=30))
    await answer_when_published(client, fresh, lambda rid: answer(rid, completion(rid)))
    assert (await task).ok and client.producer_replacements == 0


async def test_a_producer_closed_by_stop_is_not_replaced() -> None:
    client = client_with(FakeProducer(failures=1, error=ProducerClosed))
    with pytest.raises(PublishError, match="ProducerClosed"):
        await client.request("hi", timeout_s=30)


async def test_publish_until_gives_up_at_the_deadline() -> None:
    calls = 0

    async def never() -> None:
        nonlocal calls
        calls += 1
        raise KafkaConnectionError("down")

    loop = asyncio.get_running_loop()
    with pytest.raises(PublishTimeout, match="KafkaConnectionError"):
        await publish_until(never, loop.time() + 0.2, what="x", backoff_max_s=0.02)
    assert calls > 2


async def test_a_request_that_times_out_is_cancelled() -> None:
    producer = FakeProducer()
    client = client_with(producer)
    reply = await client.request("nobody answers", timeout_s=0.05)
    assert reply.timed_out
    await asyncio.gather(*client._background)
    (cancel,) = producer.on("e.control")
    body = orjson.loads(cancel.value)
    assert body == {"id": reply.request_id, "reason": "timeout"}
    assert header_value(cancel.headers, "ce_type") == "sluice.cancel"
    assert cancel.key == reply.request_id.encode()


async def test_a_stream_yields_deltas_in_order_then_its_reply() -> None:
    producer = FakeProducer()
    client = client_with(producer)
    texts: list[str] = []

    async def read() -> Reply | None:
        async with client.stream("hi", timeout_s=30) as stream:
            async for d in stream:
                texts.append(d.delta)
            return stream.reply

    task = asyncio.create_task(read())
    await answer_when_published(
        client,
        producer,
        lambda rid: delta(rid, 0, "He"),
        lambda rid: delta(rid, 0, "He"),  # a redelivery: dropped
        lambda rid: delta(rid, 1, "llo", "stop"),
        lambda rid: answer(rid, completion(rid, "Hello")),
    )
    reply = await task
    assert texts == ["He", "llo"]
    assert reply is not None and reply.completion().content == "Hello"
    assert client.router.stats.repeated_deltas == 1
    assert producer.on("e.control") == []  # answered: nothing to cancel


async def test_leaving_a_stream_early_cancels_it() -> None:
    producer = FakeProducer()
    client = client_with(producer)

    async def read_one() -> str:
        async with client.stream("hi", timeout_s=30) as stream:
            async for d in stream:
                return d.delta
        return ""

    task = asyncio.create_task(read_one())
    rid = await answer_when_published(client, producer, lambda r: delta(r, 0, "He"))
    assert await task == "He"
    await asyncio.gather(*client._background)
    assert [orjson.loads(c.value)["id"] for c in producer.on("e.control")] == [rid]
    assert client.router.offer_records([delta(rid, 1, "x")]) == ["stray"]


async def test_of_answers_read_together_a_completion_stands_over_an_error() -> None:
    producer = FakeProducer()
    client = client_with(producer)
    task = asyncio.create_task(client.request("hi", timeout_s=30))
    rid = await answer_when_published(
        client,
        producer,
        lambda r: answer(r, encode(ErrorAnswer.invalid_request("circuit open")), error=True),
        lambda r: answer(r, completion(r, "late but good"), attempt=2),
    )
    reply = await task
    assert reply.completion().content == "late but good" and reply.attempt == 2
    later = answer(rid, encode(ErrorAnswer.invalid_request("x")), attempt=3, error=True)
    assert client.router.offer_records([later]) == ["duplicate"]


async def test_a_completion_after_a_delivered_error_is_counted_as_superseding() -> None:
    producer = FakeProducer()
    client = client_with(producer)
    task = asyncio.create_task(client.request("hi", timeout_s=30))
    rid = await answer_when_published(
        client, producer, lambda r: answer(r, encode(ErrorAnswer.server_error()), error=True)
    )
    assert not (await task).ok
    assert client.router.offer_records([answer(rid, completion(rid), attempt=2)]) == ["superseded"]
    assert client.router.stats.superseded == 1
