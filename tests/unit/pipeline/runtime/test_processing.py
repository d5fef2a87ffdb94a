"""The stage loop's per-record decision without Kafka: breaker → handler → retries → outputs or
dead letter.

The tests that take the ``pipe`` fixture state what a stage produces for the records it is
given; here the pipe hands the records straight to a ``RecordProcessor``, and
``tests/integration/test_processing_broker.py`` runs the same test bodies through
``StageRunner`` on the real broker. The rest step the processor's parts on their own (breaker,
backoff, metrics), which only this side can observe.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from pipeline.errors import FatalError, InvalidInput, StageFault, TransientError
from pipeline.observability.metrics import StageMetrics
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.breaker import BreakerState, CircuitBreaker, ResponseCache
from pipeline.runtime.processing import Decision, RecordProcessor, RetryPolicy, outputs_of
from pipeline.runtime.stage import StageSpec
from schemas.dlt import parse_dlt_headers
from schemas.headers import (
    SLUICE_DEGRADED,
    SLUICE_DLT_REASON,
    SLUICE_REQUEST_ID,
    Headers,
    header_value,
    make_headers,
)
from schemas.messages import CIRCUIT_OPEN, ErrorAnswer, decode_answer

Extra = Sequence[tuple[str, bytes]]  # headers added to every input record

RETRIES = 2  # both pipes retry a retriable failure this often before dead-lettering it

# --- a handler scripted by its records ---------------------------------------------------------


class Scripted:
    """A handler whose answer to each record is what the record's value asks for.

    ``ok…``: an output ``done:<value>`` on the stage's output topic. ``flaky-N``: a transient
    error on its first N attempts, then ok. ``down``: always transient. ``bad``: invalid input.
    ``fault``: a stage fault. ``fatal``: a fatal error. ``boom``: the whole call raises.
    """

    def __init__(self, spec: StageSpec, *, short_by: int = 0) -> None:
        self.spec = spec
        self.short_by = short_by  # return this many results too few
        self.calls: list[list[bytes]] = []
        self.tries: Counter[bytes] = Counter()

    def handle(self, batch: Batch) -> list[Result]:
        values = [r.value or b"" for r in batch]
        self.calls.append(values)
        if b"boom" in values:
            raise RuntimeError("boom")
        results = [self._one(r) for r in batch]
        return results[: len(results) - self.short_by]

    def _one(self, record: Record) -> Result:
        value = record.value or b""
        self.tries[value] += 1
        if value.startswith(b"flaky-") and self.tries[value] <= int(value.split(b"-")[1]):
            return Result(record, error=TransientError("busy, try again"))
        errors = {
            b"down": TransientError("still busy"),
            b"bad": InvalidInput("not a prompt", param="messages"),
            b"fault": StageFault("the model failed"),
            b"fatal": FatalError("the engine is gone"),
        }
        if value in errors:
            return Result(record, error=errors[value])
        out = Output(
            self.spec.output_topics[0],
            record.key,
            b"done:" + value,
            [(SLUICE_REQUEST_ID, record.request_id().encode())],
        )
        return Result(record, outputs=[out], fingerprint=value.decode())

    def fingerprint(self, record: Record) -> str | None:
        return (record.value or b"").decode() or None

    def rebind(self, cached: Sequence[Output], record: Record) -> list[Output]:
        return [
            Output(o.topic, record.key, o.value, [*o.headers, (SLUICE_DEGRADED, b"true")])
            for o in cached
        ]

    async def warmup(self) -> None:
        return None

    async def close(self) -> None:
        return None


# --- what a stage produced, the same shape from both pipes -------------------------------------


@dataclass(frozen=True)
class Got:
    key: bytes | None
    value: bytes | None
    headers: Headers

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


@dataclass
class Produced:
    outputs: list[Got] = field(default_factory=list)  # on the stage's output topic
    dead: list[Got] = field(default_factory=list)  # on <input>.DLT
    answers: list[Got] = field(default_factory=list)  # on the answers topic

    def values(self) -> list[bytes | None]:
        return sorted((g.value for g in self.outputs), key=lambda v: v or b"")


class Pipe(Protocol):
    spec: StageSpec

    async def run(
        self, handler: Scripted, values: Sequence[bytes], headers: Extra = ()
    ) -> Produced:
        """Feed ``values`` (keys ``k0``, ``k1``, …) to a stage running ``handler``; what came out.

        Raises the stage's fatal error, if it hit one."""
        ...


def produced_from(spec: StageSpec, outputs: Sequence[Output]) -> Produced:
    got = Produced()
    for o in outputs:
        item = Got(o.key, o.value, list(o.headers))
        if o.topic == spec.answers_topic:
            got.answers.append(item)
        elif o.topic == f"{spec.input_topic}.DLT":
            got.dead.append(item)
        else:
            assert o.topic in spec.output_topics, o.topic
            got.outputs.append(item)
    return got


def input_headers(i: int, extra: Extra = ()) -> Headers:
    return [*make_headers("test.input", "test", f"req-{i}"), *extra]


# --- the Kafka-free pipe -----------------------------------------------------------------------

SPEC = StageSpec("probe", input_topic="in", answers_topic="answers", output_topics=("out",))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Local:
    """A processor over records made here, recording its backoff sleeps instead of sleeping."""

    spec: StageSpec = SPEC
    clock: Clock = field(default_factory=Clock)
    sleeps: list[float] = field(default_factory=list)
    breaker: CircuitBreaker = field(init=False)
    cache: ResponseCache = field(default_factory=lambda: ResponseCache(16))
    metrics: StageMetrics = field(default_factory=lambda: StageMetrics("probe"))

    def __post_init__(self) -> None:
        self.breaker = CircuitBreaker(threshold=3, cooldown_s=10.0, clock=self.clock)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def processor(self, handler: Scripted) -> RecordProcessor:
        return RecordProcessor(
            handler,
            group_id="probe-group",
            breaker=self.breaker,
            cache=self.cache,
            metrics=self.metrics,
            retry=RetryPolicy(RETRIES, 0.1),
            sleep=self._sleep,
        )

    def batch(self, values: Sequence[bytes], headers: Extra = (), first: int = 0) -> Batch:
        return Batch.of(
            [
                Record(
                    self.spec.input_topic,
                    0,
                    first + i,
                    1_700_000_000_000,
                    f"k{first + i}".encode(),
                    v,
                    input_headers(first + i, headers),
                )
                for i, v in enumerate(values)
            ]
        )

    async def decide(self, handler: Scripted, values: Sequence[bytes]) -> list[Decision]:
        return await self.processor(handler).process(self.batch(values))

    async def run(
        self, handler: Scripted, values: Sequence[bytes], headers: Extra = ()
    ) -> Produced:
        decisions = await self.processor(handler).process(self.batch(values, headers))
        return produced_from(self.spec, outputs_of(decisions))

    def state(self) -> BreakerState:
        """The breaker's state (a call, so mypy does not narrow it between steps)."""
        return self.breaker.state

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"stage": "probe", **labels})
        return value or 0.0


@pytest.fixture
def local() -> Local:
    return Local()


@pytest.fixture
def pipe(local: Local) -> Pipe:
    return local


# --- the decisions, through either pipe --------------------------------------------------------


async def test_every_record_gets_its_handlers_outputs(pipe: Pipe) -> None:
    handler = Scripted(pipe.spec)
    got = await pipe.run(handler, [b"ok-0", b"ok-1", b"ok-2"])
    assert got.values() == [b"done:ok-0", b"done:ok-1", b"done:ok-2"]
    assert sorted((g.key, g.value) for g in got.outputs) == [
        (b"k0", b"done:ok-0"),
        (b"k1", b"done:ok-1"),
        (b"k2", b"done:ok-2"),
    ]
    assert got.dead == [] and got.answers == []
    assert handler.tries == Counter({b"ok-0": 1, b"ok-1": 1, b"ok-2": 1})


async def test_a_retriable_failure_is_retried_until_it_succeeds(pipe: Pipe) -> None:
    handler = Scripted(pipe.spec)
    got = await pipe.run(handler, [b"flaky-2", b"ok"])
    assert got.values() == [b"done:flaky-2", b"done:ok"]
    assert got.dead == [] and got.answers == []
    assert handler.tries == Counter({b"flaky-2": 3, b"ok": 1})  # only the failing one again


async def test_retries_exhausted_is_a_dead_letter_of_the_original_and_an_error_answer(
    pipe: Pipe,
) -> None:
    handler = Scripted(pipe.spec)
    got = await pipe.run(handler, [b"ok", b"down"])
    assert handler.tries[b"down"] == 1 + RETRIES
    assert got.values() == [b"done:ok"]
    [dead] = got.dead
    assert (dead.key, dead.value) == (b"k1", b"down")  # the original bytes and key
    assert dead.header("sluice-request-id") == "req-1"  # the original headers are kept
    assert dead.header(SLUICE_DLT_REASON) == "transient"
    info = parse_dlt_headers(dead.headers)
    assert info is not None and info.topic == pipe.spec.input_topic and info.offset is not None
    assert info.exception_message == "still busy"
    [answer] = got.answers
    assert answer.key == b"k1" and answer.header(SLUICE_REQUEST_ID) == "req-1"
    error = decode_answer(answer.value)
    assert isinstance(error, ErrorAnswer) and error.error.message == "still busy"


async def test_bad_input_is_dead_lettered_at_once_and_its_neighbours_go_on(pipe: Pipe) -> None:
    handler = Scripted(pipe.spec)
    got = await pipe.run(handler, [b"ok-0", b"bad", b"ok-2"])
    assert got.values() == [b"done:ok-0", b"done:ok-2"]
    assert handler.tries[b"bad"] == 1  # not retriable
    [dead] = got.dead
    assert dead.value == b"bad" and dead.header(SLUICE_DLT_REASON) == "schema"
    [answer] = got.answers
    error = decode_answer(answer.value)
    assert isinstance(error, ErrorAnswer) and error.error.param == "messages"


async def test_a_fatal_error_is_raised_not_dead_lettered(pipe: Pipe) -> None:
    with pytest.raises(FatalError, match="the engine is gone"):
        await pipe.run(Scripted(pipe.spec), [b"ok", b"fatal"])


async def test_a_degraded_request_gets_degraded_outputs(pipe: Pipe) -> None:
    got = await pipe.run(Scripted(pipe.spec), [b"ok"], headers=[(SLUICE_DEGRADED, b"true")])
    [out] = got.outputs
    assert out.header(SLUICE_DEGRADED) == "true"


# --- the parts, stepped here -------------------------------------------------------------------


async def test_retries_back_off_exponentially_and_are_counted(local: Local) -> None:
    handler = Scripted(local.spec)
    decisions = await local.decide(handler, [b"down", b"flaky-1", b"ok"])
    assert local.sleeps == [0.1, 0.2]
    assert handler.calls == [[b"down", b"flaky-1", b"ok"], [b"down", b"flaky-1"], [b"down"]]
    assert [d.dead_lettered for d in decisions] == [True, False, False]
    assert local.count("sluice_handler_retries_total") == 3
    assert local.count("sluice_dead_letters_total", reason="transient") == 1
    assert local.count("sluice_error_answers_total", reason="transient") == 1


async def test_no_retries_means_no_sleep(local: Local) -> None:
    processor = local.processor(Scripted(local.spec))
    processor.retry = RetryPolicy(0, 5.0)
    [decision] = await processor.process(local.batch([b"flaky-1"]))
    assert decision.error is not None and decision.error.reason == "transient"
    assert local.sleeps == []
    assert RetryPolicy(3, 0.5).delay(0) == 0.5 and RetryPolicy(3, 0.5).delay(2) == 2.0


async def test_a_raising_handler_fails_the_records_of_that_call_only(local: Local) -> None:
    processor = local.processor(Scripted(local.spec))
    decisions = [
        d
        for i, v in enumerate([b"ok-0", b"boom", b"ok-2"])
        for d in await processor.process(local.batch([v], first=i))
    ]
    assert [d.dead_lettered for d in decisions] == [False, True, False]
    error = decisions[1].error
    assert isinstance(error, StageFault) and error.reason == "handler-exception"
    assert isinstance(error.__cause__, RuntimeError)


async def test_a_batch_call_that_raises_is_handled_one_by_one(local: Local) -> None:
    handler = Scripted(local.spec)
    processor = local.processor(handler)
    decisions = await processor.process(local.batch([b"ok-0", b"boom", b"ok-2"]))
    assert [d.dead_lettered for d in decisions] == [False, True, False]
    assert handler.calls == [[b"ok-0", b"boom", b"ok-2"], [b"ok-0"], [b"boom"], [b"ok-2"]]
    assert [o.value for o in decisions[0].outputs] == [b"done:ok-0"]
    # One bad record is one fault for the breaker, not one per neighbour.
    assert local.breaker.consecutive_faults == 0  # ok-2 succeeded after it
    await processor.process(local.batch([b"boom"]))
    assert local.breaker.consecutive_faults == 1


async def test_a_handler_raising_a_fatal_error_stops_the_stage(local: Local) -> None:
    class Dying(Scripted):
        def handle(self, batch: Batch) -> list[Result]:
            raise FatalError("the producer is gone")

    with pytest.raises(FatalError, match="the producer is gone"):
        await local.decide(Dying(local.spec), [b"ok"])


async def test_a_wrong_number_of_results_is_a_stage_fault_for_every_record(local: Local) -> None:
    decisions = await local.decide(Scripted(local.spec, short_by=1), [b"ok-0", b"ok-1"])
    assert [d.error.reason if d.error else None for d in decisions] == ["stage-fault"] * 2
    assert local.breaker.consecutive_faults == 2


async def test_faults_open_the_breaker_but_bad_input_does_not(local: Local) -> None:
    handler = Scripted(local.spec)
    await local.decide(handler, [b"bad"] * 5)
    assert local.state() == BreakerState.CLOSED
    await local.decide(handler, [b"fault", b"fault", b"ok", b"fault", b"fault"])
    assert local.state() == BreakerState.CLOSED  # the success ended the run
    await local.decide(handler, [b"fault"])
    assert local.state() == BreakerState.OPEN


async def test_while_open_records_are_answered_from_cache_or_refused_without_the_handler(
    local: Local,
) -> None:
    handler = Scripted(local.spec)
    await local.decide(handler, [b"ok-cached"])  # a good answer to remember
    await local.decide(handler, [b"fault"] * 3)
    assert local.state() == BreakerState.OPEN
    calls = len(handler.calls)
    local.clock.now = 5.0  # still cooling down
    cached, refused = await local.decide(handler, [b"ok-cached", b"ok-new"])
    assert len(handler.calls) == calls  # nothing was attempted
    [out] = cached.outputs
    assert out.value == b"done:ok-cached" and out.key == b"k0"  # re-addressed to this record
    assert header_value(out.headers, SLUICE_DEGRADED) == "true"
    assert not cached.dead_lettered and local.count("sluice_cache_answers_total") == 1
    assert refused.error is not None and refused.error.reason == "circuit-open"
    dead, answer = refused.outputs
    assert dead.topic == "in.DLT" and dead.value == b"ok-new"
    assert header_value(dead.headers, SLUICE_DLT_REASON) == "circuit-open"
    error = decode_answer(answer.value)
    assert isinstance(error, ErrorAnswer) and error.error.code == CIRCUIT_OPEN
    assert local.state() == BreakerState.OPEN  # refusals are not faults


async def test_after_the_cooldown_one_probe_decides_whether_the_breaker_closes(
    local: Local,
) -> None:
    handler = Scripted(local.spec)
    await local.decide(handler, [b"fault"] * 3)
    local.clock.now = 10.0
    probe, held = await local.decide(handler, [b"fault", b"ok-1"])
    assert handler.calls[-1] == [b"fault"]  # only the probe was attempted
    assert probe.error is not None and probe.error.reason == "stage-fault"
    assert held.error is not None and held.error.reason == "circuit-open"
    assert local.state() == BreakerState.OPEN  # the probe failed: another cool-down
    local.clock.now = 20.0
    first, second = await local.decide(handler, [b"ok-2", b"ok-3"])
    assert local.state() == BreakerState.CLOSED
    assert not first.dead_lettered and not second.dead_lettered
    assert handler.calls[-2:] == [[b"ok-2"], [b"ok-3"]]  # record by record once closed again


async def test_a_probe_with_bad_input_lets_the_next_record_probe(local: Local) -> None:
    handler = Scripted(local.spec)
    await local.decide(handler, [b"fault"] * 3)
    local.clock.now = 10.0
    bad, good = await local.decide(handler, [b"bad", b"ok"])
    assert bad.error is not None and bad.error.reason == "schema"
    assert not good.dead_lettered
    assert local.state() == BreakerState.CLOSED


async def test_only_good_answers_with_a_fingerprint_are_cached(local: Local) -> None:
    handler = Scripted(local.spec)
    await local.decide(handler, [b"ok-a", b"bad", b"flaky-1"])
    assert local.cache.get("ok-a") is not None and local.cache.get("flaky-1") is not None
    assert local.cache.get("bad") is None
    assert len(local.cache) == 2
