"""The per-record decision on the real broker: the test bodies of
``tests/unit/pipeline/runtime/test_processing.py`` that take a ``pipe``, run here through
``StageRunner`` (records produced to a topic, outputs read back from the output, dead-letter and
answers topics) instead of straight through the ``RecordProcessor``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer

from pipeline import admin
from pipeline.config import Settings, Topics
from pipeline.runtime.runner import StageRunner
from pipeline.runtime.stage import StageSpec
from tests.integration.kafka_io import produce
from tests.unit.pipeline.runtime import test_processing as bodies
from tests.unit.pipeline.runtime.test_processing import (
    RETRIES,
    Extra,
    Got,
    Pipe,
    Produced,
    Scripted,
    input_headers,
)

WITHIN_S = 30.0


@dataclass
class BrokerPipe:
    """A ``StageRunner`` per run, on fresh topics of the session broker."""

    settings: Settings
    spec: StageSpec

    async def run(
        self, handler: Scripted, values: Sequence[bytes], headers: Extra = ()
    ) -> Produced:
        runner = StageRunner(self.settings, handler)
        await runner.start()
        try:
            items = [(f"k{i}".encode(), v, input_headers(i, headers)) for i, v in enumerate(values)]
            await produce(self.settings, self.spec.input_topic, items)
            got = await self._read(runner, len(values))
        finally:
            runner.request_stop()
            await runner.shutdown()
        if runner.fatal is not None:
            raise runner.fatal
        return got

    async def _read(self, runner: StageRunner, n: int) -> Produced:
        """Read until every record is decided (an output or a dead letter plus its answer)."""
        spec = self.spec
        consumer = AIOKafkaConsumer(
            *spec.output_topics,
            Topics.dlt(spec.input_topic),
            spec.answers_topic,
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        got = Produced()
        into = {spec.answers_topic: got.answers, Topics.dlt(spec.input_topic): got.dead}
        deadline = time.monotonic() + WITHIN_S
        try:
            while runner.fatal is None and time.monotonic() < deadline:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for r in records:
                        item = Got(r.key, r.value, [(k, v or b"") for k, v in r.headers])
                        into.get(tp.topic, got.outputs).append(item)
                if len(got.outputs) + len(got.dead) >= n and len(got.answers) >= len(got.dead):
                    break
        finally:
            await consumer.stop()
        return got


@pytest.fixture
async def pipe(settings_factory: Callable[..., Settings]) -> Pipe:
    settings = settings_factory(partitions=1, handler_retries=RETRIES, retry_backoff_ms=1)
    await admin.create_topics(settings)
    deadline = time.monotonic() + WITHIN_S
    # A broker may list a topic a moment after creating it; the runner refuses missing topics.
    while missing := await admin.missing_topics(settings, settings.topics.all_topics()):
        assert time.monotonic() < deadline, f"topics never listed: {missing}"
        await asyncio.sleep(0.1)
    topics = settings.topics
    spec = StageSpec(
        "probe",
        input_topic=topics.prompts,
        answers_topic=topics.answers,
        output_topics=(topics.tokenized,),
    )
    return BrokerPipe(settings, spec)


test_every_record_gets_its_handlers_outputs = bodies.test_every_record_gets_its_handlers_outputs
test_a_retriable_failure_is_retried_until_it_succeeds = (
    bodies.test_a_retriable_failure_is_retried_until_it_succeeds
)
test_retries_exhausted_is_a_dead_letter_of_the_original_and_an_error_answer = (
    bodies.test_retries_exhausted_is_a_dead_letter_of_the_original_and_an_error_answer
)
test_bad_input_is_dead_lettered_at_once_and_its_neighbours_go_on = (
    bodies.test_bad_input_is_dead_lettered_at_once_and_its_neighbours_go_on
)
test_a_fatal_error_is_raised_not_dead_lettered = (
    bodies.test_a_fatal_error_is_raised_not_dead_lettered
)
test_a_degraded_request_gets_degraded_outputs = bodies.test_a_degraded_request_gets_degraded_outputs
