"""The stage loop's new parts without Kafka: deadlines, admission under a burst, delivery with
refusals, the byte bound, carried headers, per-record isolation, the in-flight listing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from pipeline.errors import FatalError, StageFault
from pipeline.runtime.admission import Admission
from pipeline.runtime.backpressure import Change, InFlightBound
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.breaker import BreakerState, CircuitBreaker
from pipeline.runtime.delivery import Delivery
from pipeline.runtime.inflight import InFlight, Work
from pipeline.runtime.processing import Decision
from pipeline.runtime.stage import carried, isolate, output_for
from schemas.headers import (
    SLUICE_ATTEMPT,
    SLUICE_DLT_REASON,
    SLUICE_REQUEST_ID,
    header_value,
    make_headers,
)
from schemas.messages import EXPIRED, ErrorAnswer, decode_answer
from schemas.streaming import SLUICE_DEADLINE, SLUICE_REPLY_TO
from tests.unit.pipeline.runtime.test_processing import Local, Scripted
from tests.unit.pipeline.runtime.test_produce_errors import FakeProducer

NOW_MS = 1_800_000_000_000


@pytest.fixture
def local() -> Local:
    return Local()


# --- deadlines -----------------------------------------------------------------------------


async def test_an_expired_record_is_answered_and_dead_lettered_without_the_handler(
    local: Local,
) -> None:
    handler = Scripted(local.spec)
    processor = local.processor(handler)
    processor._clock_ms = lambda: NOW_MS
    past = [(SLUICE_DEADLINE, str(NOW_MS - 1500).encode())]
    future = [(SLUICE_DEADLINE, str(NOW_MS + 5000).encode())]
    batch = local.batch([b"ok-0", b"ok-1", b"ok-2"])
    records = list(batch.records)
    records[0] = Record(**{**_fields(records[0]), "headers": [*records[0].headers, *past]})
    records[2] = Record(**{**_fields(records[2]), "headers": [*records[2].headers, *future]})
    decisions = await processor.process(Batch.of(records))
    assert handler.calls == [[b"ok-1", b"ok-2"]]  # the expired one never reached it
    assert [d.error.reason if d.error else None for d in decisions] == ["expired", None, None]
    dead, answer = decisions[0].outputs
    assert dead.topic == "in.DLT" and dead.value == b"ok-0"
    assert header_value(dead.headers, SLUICE_DLT_REASON) == "expired"
    error = decode_answer(answer.value)
    assert isinstance(error, ErrorAnswer) and error.error.code == EXPIRED
    assert "1500 ms" in error.error.message
    assert local.count("sluice_expired_total") == 1
    assert local.state() == BreakerState.CLOSED and local.breaker.consecutive_faults == 0
    # The answer carries the request's deadline on, like every output.
    assert header_value(answer.headers, SLUICE_DEADLINE) == str(NOW_MS - 1500)


async def test_a_stage_that_does_not_expire_hands_late_records_to_its_handler(
    local: Local,
) -> None:
    """Postprocess: a generation that finished in time is answered however late it arrives."""
    local.spec = dataclasses.replace(local.spec, expires=False)
    handler = Scripted(local.spec)
    processor = local.processor(handler)
    processor._clock_ms = lambda: NOW_MS
    decisions = await processor.process(
        local.batch([b"ok-0"], headers=[(SLUICE_DEADLINE, str(NOW_MS - 1).encode())])
    )
    assert handler.calls == [[b"ok-0"]]
    assert [d.error for d in decisions] == [None]
    assert local.count("sluice_expired_total") == 0


async def test_a_batch_of_only_expired_records_calls_nothing(local: Local) -> None:
    handler = Scripted(local.spec)
    processor = local.processor(handler)
    processor._clock_ms = lambda: NOW_MS
    decisions = await processor.process(
        local.batch([b"ok-0", b"ok-1"], headers=[(SLUICE_DEADLINE, str(NOW_MS).encode())])
    )
    assert handler.calls == []
    assert all(d.error is not None and d.error.reason == "expired" for d in decisions)


def _fields(record: Record) -> dict[str, Any]:
    return {name: getattr(record, name) for name in Record.__slots__}


# --- admission: a burst cannot outrun the breaker --------------------------------------------


class SlowFaults(Scripted):
    """An async handler that fails every record after a yield, as an engine bridge would."""

    async def handle(self, batch: Batch) -> list[Result]:  # type: ignore[override]
        self.calls.append([r.value or b"" for r in batch])
        await asyncio.sleep(0.001)
        return [Result(r, error=StageFault("engine down")) for r in batch]


async def test_a_burst_against_a_failing_handler_reaches_it_at_most_threshold_times(
    local: Local,
) -> None:
    handler = SlowFaults(local.spec)
    processor = local.processor(handler)
    batches = [local.batch([f"r{i}".encode()], first=i) for i in range(300)]
    decided = await asyncio.gather(*(processor.process(b) for b in batches))
    assert len(handler.calls) == local.breaker.threshold  # 3: none past the threshold
    reasons = Counter(d.error.reason for [d] in decided if d.error is not None)
    assert reasons == {"stage-fault": 3, "circuit-open": 297}
    assert processor.admission.outstanding == 0


async def test_once_proven_a_burst_runs_all_at_once(local: Local) -> None:
    running = 0
    most = 0

    class Slow(Scripted):
        async def handle(self, batch: Batch) -> list[Result]:  # type: ignore[override]
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.001)
            running -= 1
            return [self._one(r) for r in batch]

    processor = local.processor(Slow(local.spec))
    await processor.process(local.batch([b"ok-first"]))
    assert processor.admission.proven
    await asyncio.gather(*(processor.process(local.batch([b"ok"], first=i)) for i in range(50)))
    assert most == 50


async def test_admission_limits_attempts_until_a_success() -> None:
    breaker = CircuitBreaker(threshold=3)
    gate = Admission(breaker)
    assert [await gate.enter() for _ in range(3)] == [True] * 3
    waiting = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    assert not waiting.done()  # the fourth waits
    breaker.success()
    gate.observe(ok=True)
    gate.leave()
    assert await waiting is True and gate.limit() is None
    breaker.fault()
    gate.observe(ok=False)
    assert gate.limit() == 2


async def test_waiting_attempts_take_the_open_path_when_the_breaker_opens() -> None:
    breaker = CircuitBreaker(threshold=1)
    gate = Admission(breaker)
    assert await gate.enter()
    waiting = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    breaker.fault()
    gate.observe(ok=False)
    gate.leave()
    assert await waiting is False  # not attempted: the caller refuses or answers from cache


# --- delivery ------------------------------------------------------------------------------


def _decision(local: Local, i: int, value: bytes) -> Decision:
    [record] = local.batch([b"in"], first=i).records
    return Decision(record, [Output("out", record.key, value, [(SLUICE_REQUEST_ID, b"r")])])


async def test_a_refused_output_becomes_its_records_dead_letter_and_answer(local: Local) -> None:
    processor = local.processor(Scripted(local.spec))
    producer = FakeProducer(limit=10_000)
    delivery = Delivery(
        producer,
        stage="probe",
        max_request_size=5_000,
        dead_letter=processor.dead_letter,
        metrics=local.metrics,
    )
    decisions = [_decision(local, 0, b"a"), _decision(local, 1, b"x" * 8_000)]
    decisions.append(_decision(local, 2, b"c"))
    await delivery.deliver(decisions)
    topics = [(t, v) for t, v, _ in producer.sent]
    assert ("out", b"a") in topics and ("out", b"c") in topics
    assert all(v != b"x" * 8_000 for _, v in topics)  # never sent
    [dead] = [h for t, _, h in producer.sent if t == "in.DLT"]
    assert header_value(dead, SLUICE_DLT_REASON) == "record-too-large"
    [answer] = [v for t, v, _ in producer.sent if t == "answers"]
    error = decode_answer(answer)
    assert isinstance(error, ErrorAnswer) and "larger than Kafka accepts" in error.error.message
    assert local.count("sluice_records_produced_total", topic="out") == 2


async def test_losing_the_producer_is_fatal(local: Local) -> None:
    processor = local.processor(Scripted(local.spec))
    producer = FakeProducer(limit=10_000, fail={"out": KafkaConnectionError()})
    delivery = Delivery(
        producer,
        stage="probe",
        max_request_size=5_000,
        dead_letter=processor.dead_letter,
        metrics=local.metrics,
    )
    with pytest.raises(FatalError):
        await delivery.deliver([_decision(local, 0, b"a")])


# --- the byte bound --------------------------------------------------------------------------


def test_the_byte_bound_pauses_too_and_resumes_when_both_are_at_half() -> None:
    bound = InFlightBound(100, max_bytes=1_000)
    assert bound.update(1, 999) is None
    assert bound.update(1, 1_000) is Change.PAUSE
    assert bound.update(1, 600) is None  # bytes above half
    assert bound.update(60, 400) is None  # records above half
    assert bound.update(50, 500) is Change.RESUME
    assert InFlightBound(10).update(5, 10**12) is None  # records only
    with pytest.raises(ValueError, match="max_bytes"):
        InFlightBound(1, max_bytes=0)


async def test_in_flight_counts_bytes_and_lists_ids_not_text() -> None:
    inflight = InFlight()
    tp = TopicPartition("in", 0)
    record = Record("in", 0, 7, 0, b"k", b'{"id": "req-7", "messages": "secret"}', [])

    async def nothing() -> None:
        return None

    task = asyncio.create_task(nothing())
    inflight.add(task, Work(tp, (record,), 1, 38))
    assert inflight.bytes == 38 and inflight.of({tp}) == [task]
    assert inflight.describe() == [
        {"request_id": "req-7", "topic": "in", "partition": 0, "offset": 7, "state": "in-flight"}
    ]
    await task
    inflight.done(task)
    assert inflight.bytes == 0 and len(inflight) == 0


# --- headers carried on, isolation -----------------------------------------------------------


def test_outputs_carry_deadline_reply_to_and_attempt_and_drop_malformed_ones() -> None:
    good = [
        (SLUICE_DEADLINE, b" 1800000000000"),
        (SLUICE_REPLY_TO, b"sluice.replies:3"),
        (SLUICE_ATTEMPT, b"2"),
    ]
    assert carried(good) == {
        SLUICE_DEADLINE: "1800000000000",
        SLUICE_REPLY_TO: "sluice.replies:3",
        SLUICE_ATTEMPT: "2",
    }
    bad = [(SLUICE_DEADLINE, b"soon"), (SLUICE_REPLY_TO, b"x" * 300 + b":1")]
    assert carried(bad) == {}
    assert carried([]) == {}
    record = Record("in", 0, 0, 0, b"k", b"{}", [*make_headers("t", "s", "r"), *good])
    answer = output_for(
        record, "answers", ErrorAnswer.server_error("x"), stage="s", request_id="r", key=None
    )
    assert header_value(answer.headers, SLUICE_REPLY_TO) == "sluice.replies:3"
    assert header_value(answer.headers, SLUICE_ATTEMPT) == "2"


def test_isolate_turns_one_records_exception_into_its_error_only() -> None:
    records = [Record("in", 0, i, 0, None, str(i).encode(), []) for i in range(3)]

    def one(record: Record) -> Result:
        if record.value == b"1":
            raise KeyError("template")
        return Result(record, outputs=[Output("out", None, record.value or b"", [])])

    results = isolate(Batch.of(records), one, stage="probe")
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error is not None and results[1].error.reason == "handler-exception"

    def fatal(record: Record) -> Result:
        raise FatalError("gone")

    with pytest.raises(FatalError):
        isolate(Batch.of(records), fatal, stage="probe")
