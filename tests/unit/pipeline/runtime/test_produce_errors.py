"""Produce errors: one record refused is a dead letter, a lost producer is fatal."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import (
    CorruptRecordException,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
    ProducerFenced,
    RecordTooLargeError,
    UnknownError,
)

from pipeline.errors import FatalError
from pipeline.runtime.batch import Output
from pipeline.runtime.dead_letters import SLUICE_DLT_TRUNCATED, fits
from pipeline.runtime.produce_errors import (
    RecordRejected,
    classify,
    is_record_level,
    send_outputs,
)
from schemas.headers import header_value


@pytest.mark.parametrize(
    "exc",
    [
        MessageSizeTooLargeError(),
        RecordTooLargeError(),
        CorruptRecordException(),
        UnknownError(),
        TypeError("headers"),
    ],
)
def test_record_level_errors(exc: BaseException) -> None:
    assert is_record_level(exc)
    error = classify(exc, stage="preprocess", topic="t")
    assert isinstance(error, RecordRejected)
    assert not error.fatal
    assert not error.fault
    assert error.__cause__ is exc
    assert error.reason in {"record-too-large", "invalid-record"}


@pytest.mark.parametrize(
    "exc",
    [KafkaConnectionError(), KafkaTimeoutError(), ProducerFenced(), NotEnoughReplicasError()],
)
def test_losing_the_broker_or_producer_is_fatal(exc: BaseException) -> None:
    assert not is_record_level(exc)
    error = classify(exc, stage="preprocess", topic="t")
    assert isinstance(error, FatalError)
    assert error.fatal


def test_too_large_answers_as_too_large() -> None:
    error = classify(MessageSizeTooLargeError(), stage="compute", topic="sluice.generated")
    assert error.reason == "record-too-large"
    assert "larger than Kafka accepts" in error.message


class FakeProducer:
    """Refuses values above ``limit`` in send() (as aiokafka does) and fails deliveries of
    topics listed in ``fail``."""

    def __init__(self, limit: int, fail: dict[str, BaseException] | None = None) -> None:
        self.limit = limit
        self.fail = fail or {}
        self.sent: list[tuple[str, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: Any,
        partition: int | None = None,
    ) -> asyncio.Future[None]:
        if len(value or b"") + sum(len(v) for _, v in headers) > self.limit:
            raise MessageSizeTooLargeError("too big")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic in self.fail:
            future.set_exception(self.fail[topic])
        else:
            self.sent.append((topic, value, list(headers)))
            future.set_result(None)
        return future


async def test_send_outputs_returns_refusals_and_fits_dead_letters() -> None:
    producer = FakeProducer(limit=50_000)
    outputs = [
        Output("sluice.tokenized", b"k", b"ok", []),
        Output("sluice.tokenized", b"k", b"x" * 60_000, []),
        Output("sluice.prompts.DLT", b"k", b"y" * 60_000, []),
        Output("sluice.prompts.DLT", b"k", b"", [], tombstone=True),
    ]
    refused = await send_outputs(producer, outputs, stage="preprocess", max_request_size=50_000)
    assert [r.index for r in refused] == [1]
    assert refused[0].error.reason == "record-too-large"
    topics = [t for t, _, _ in producer.sent]
    assert topics == ["sluice.tokenized", "sluice.prompts.DLT", "sluice.prompts.DLT"]
    _, value, headers = producer.sent[1]
    assert value is not None
    assert len(value) < 50_000
    assert header_value(headers, SLUICE_DLT_TRUNCATED) == "value"
    assert producer.sent[2][1] is None  # a tombstone goes out as null
    assert fits(Output("t", b"k", value, headers), 50_000)


async def test_a_refused_delivery_is_returned_too() -> None:
    producer = FakeProducer(limit=10_000, fail={"sluice.answers": CorruptRecordException()})
    outputs = [Output("sluice.answers", None, b"a", []), Output("sluice.deltas", None, b"d", [])]
    refused = await send_outputs(producer, outputs, stage="postprocess", max_request_size=10_000)
    assert [(r.index, r.error.reason) for r in refused] == [(0, "invalid-record")]
    assert [t for t, _, _ in producer.sent] == ["sluice.deltas"]


async def test_a_lost_broker_is_fatal() -> None:
    producer = FakeProducer(limit=10_000, fail={"sluice.answers": KafkaTimeoutError()})
    with pytest.raises(FatalError, match="KafkaTimeoutError"):
        await send_outputs(
            producer,
            [Output("sluice.answers", None, b"a", [])],
            stage="postprocess",
            max_request_size=10_000,
        )


async def test_a_refused_dead_letter_is_fatal() -> None:
    producer = FakeProducer(limit=10_000, fail={"t.DLT": CorruptRecordException()})
    with pytest.raises(FatalError, match="dead letter"):
        await send_outputs(
            producer, [Output("t.DLT", None, b"a", [])], stage="s", max_request_size=10_000
        )
