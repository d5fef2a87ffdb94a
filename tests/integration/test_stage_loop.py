"""The stage loop on the real broker, at its edges: a record it cannot decode, an output Kafka
will not take, a request whose deadline has passed, and the topic limit read at start-up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline import admin
from pipeline.config import Settings, Topics
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.delivery import DEFAULT_MAX_REQUEST, max_record_bytes
from pipeline.runtime.runner import StageRunner
from pipeline.runtime.stage import Handler, StageSpec
from schemas.headers import SLUICE_DLT_REASON, SLUICE_REQUEST_ID, header_value
from schemas.messages import EXPIRED, ErrorAnswer, decode_answer
from schemas.streaming import SLUICE_DEADLINE, now_ms
from stages.registry import build_handler
from tests.chaos.raw import send_raw_batch
from tests.integration.kafka_io import collect, group_lag, produce, prompt
from tests.paths import REPO_ROOT
from tests.unit.pipeline.runtime.test_processing import Scripted

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
WITHIN_S = 30.0


async def _fresh(settings: Settings) -> Settings:
    await admin.create_topics(settings)
    deadline = time.monotonic() + WITHIN_S
    while missing := await admin.missing_topics(settings, settings.topics.all_topics()):
        assert time.monotonic() < deadline, f"topics never listed: {missing}"
        await asyncio.sleep(0.1)
    return settings


@asynccontextmanager
async def _running(settings: Settings, *handlers: Handler) -> AsyncIterator[list[StageRunner]]:
    runners = [StageRunner(settings, h) for h in handlers]
    for runner in runners:
        await runner.start()
    try:
        yield runners
    finally:
        for runner in runners:
            runner.request_stop()
            await runner.shutdown()
    for runner in runners:
        assert runner.fatal is None, runner.fatal


class Huge(Scripted):
    """``huge`` gets an output of 2 MiB: more than any default topic takes."""

    def _one(self, record: Record) -> Result:
        if record.value == b"huge":
            out = Output(self.spec.output_topics[0], record.key, b"x" * (2 << 20), [])
            return Result(record, outputs=[out])
        return super()._one(record)


def _spec(settings: Settings) -> StageSpec:
    topics = settings.topics
    return StageSpec("probe", topics.prompts, topics.answers, output_topics=(topics.tokenized,))


async def test_undecodable_and_unproducible_records_are_dead_letters_and_the_partition_goes_on(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = await _fresh(settings_factory(partitions=1))
    spec = _spec(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    async with _running(settings, Huge(spec)) as [runner]:
        try:
            await send_raw_batch(producer, spec.input_topic, 0, [(b"k", b"ok-0", [])])
            bad = [(b"k", b"poison", [(b"\xff\xfe-not-utf8", b"x")]), (b"k", b"ok-1", [])]
            await send_raw_batch(producer, spec.input_topic, 0, bad)
            for value in (b"huge", b"ok-2", b"ok-3"):
                await producer.send_and_wait(spec.input_topic, value, key=b"k", partition=0)
        finally:
            await producer.stop()
        out = await collect(settings, spec.output_topics[0], until=4, within=WITHIN_S)
        dead = await collect(
            settings, Topics.dlt(spec.input_topic), until=2, within=WITHIN_S, unique=False
        )
        assert runner.fatal is None
    assert sorted(r.value for r in out.records) == [b"done:ok-0", b"done:ok-1", b"done:ok-2",
                                                   b"done:ok-3"]  # fmt: skip
    reasons = {r.value[:6]: header_value(list(r.headers), SLUICE_DLT_REASON) for r in dead.records}
    assert reasons == {b"poison": "undecodable", b"huge": "record-too-large"}


async def test_max_record_bytes_is_the_smallest_limit_of_the_written_topics(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    small, plain = f"small-{uuid.uuid4().hex}", f"plain-{uuid.uuid4().hex}"
    client = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await client.start()
    try:
        await client.create_topics(
            [
                NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "20000"}),
                NewTopic(plain, 1, 1),
            ]
        )
    finally:
        await client.close()
    assert await max_record_bytes(settings, [plain]) == DEFAULT_MAX_REQUEST
    assert await max_record_bytes(settings, [plain, small]) == 20000


async def test_a_prompt_past_its_deadline_is_expired_not_generated(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = await _fresh(
        settings_factory(model_path=MODEL, engine="echo", partitions=1, max_prompt_bytes=4096)
    )
    topics = settings.topics
    late = [(SLUICE_DEADLINE, str(now_ms() - 1000).encode())]
    live = [(SLUICE_DEADLINE, str(now_ms() + 120_000).encode())]
    await produce(
        settings,
        topics.prompts,
        [
            (b"c1", prompt("too late", id="late-1"), late),
            (b"c2", prompt("in time", id="live-1"), live),
        ],
    )
    handlers = [build_handler(s, settings) for s in ("preprocess", "compute", "postprocess")]
    async with _running(settings, *handlers):
        answers = await collect(settings, topics.answers, until=2, within=WITHIN_S)
        generated = await collect(settings, topics.generated, until=1, within=5.0, extra_wait=1.0)
        dead = await collect(settings, Topics.dlt(topics.prompts), until=1, within=WITHIN_S)
    by_id = answers.by_request()
    [expired_answer] = by_id["late-1"]
    error = decode_answer(expired_answer.value)
    assert isinstance(error, ErrorAnswer) and error.error.code == EXPIRED
    [completion] = by_id["live-1"]
    assert not isinstance(decode_answer(completion.value), ErrorAnswer)
    assert header_value(list(completion.headers), SLUICE_DEADLINE) == live[0][1].decode()
    [letter] = dead.records
    assert header_value(list(letter.headers), SLUICE_DLT_REASON) == "expired"
    assert orjson.loads(letter.value)["id"] == "late-1"
    ids = [header_value(list(r.headers), SLUICE_REQUEST_ID) for r in generated.records]
    assert ids == ["live-1"]  # nothing was generated for the expired one


class Slow(Scripted):
    """One record per unit, each taking ``delay_s``; counts every call."""

    def __init__(self, spec: StageSpec, delay_s: float) -> None:
        super().__init__(StageSpec(spec.name, spec.input_topic, spec.answers_topic, "record",
                                   spec.output_topics))  # fmt: skip
        self.delay_s = delay_s
        self.want = 1
        self.started = asyncio.Event()  # set once ``want`` calls have started

    async def handle(self, batch: Batch) -> list[Result]:  # type: ignore[override]
        self.calls.append([r.value or b"" for r in batch])
        if len(self.calls) >= self.want:
            self.started.set()
        await asyncio.sleep(self.delay_s)
        return [self._one(r) for r in batch]


async def test_a_rebalance_finishes_in_flight_work_before_giving_partitions_up(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = await _fresh(settings_factory(partitions=2, revoke_deadline_s=20.0))
    spec = _spec(settings)
    first, second = Slow(spec, 2.0), Slow(spec, 0.0)
    n = 20
    await produce(settings, spec.input_topic, [(f"k{i}".encode(), f"ok-{i}".encode(), [])
                                               for i in range(n)])  # fmt: skip
    first.want = n
    async with _running(settings, first) as [runner]:
        await asyncio.wait_for(first.started.wait(), WITHIN_S)
        assert runner.tracker.in_flight == n  # all taken, all generating
        async with _running(settings, second):  # joins the group: a rebalance
            out = await collect(settings, spec.output_topics[0], until=n, within=WITHIN_S,
                                unique=False, extra_wait=1.0)  # fmt: skip
    # Nothing was thrown away and redone: every record handled once, answered once.
    assert len(first.calls) + len(second.calls) == n
    assert sorted(r.value for r in out.records) == sorted(f"done:ok-{i}".encode()
                                                          for i in range(n))  # fmt: skip


async def test_shutdown_hands_back_unfinished_work_within_its_deadline(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = await _fresh(settings_factory(partitions=1, shutdown_deadline_s=3.0))
    spec = _spec(settings)
    stuck = Slow(spec, 3600.0)
    await produce(settings, spec.input_topic, [(b"k", b"ok-0", [])])
    runner = StageRunner(settings, stuck)
    await runner.start()
    await asyncio.wait_for(stuck.started.wait(), WITHIN_S)
    runner.request_stop()
    await asyncio.wait_for(runner.shutdown(), timeout=WITHIN_S)  # a hang guard, not a timing
    assert runner.fatal is None and len(runner.inflight) == 0
    lag = await group_lag(settings, runner.group_id, spec.input_topic)
    assert lag == {0: (0, 1)}  # handed back: offset 0 not committed, so it is redone
