"""The stage loop's per-record decision, without Kafka: deadline → breaker → handler → retries →
outputs or dead letter.

``RecordProcessor.process(batch)`` turns the records of one unit of work into one ``Decision``
per record, in order: the outputs to produce for it, which are either the handler's outputs
(or a cached answer while the breaker is open) or a dead letter plus an error answer. It raises
only for a fatal error. The runner (``pipeline/runtime/runner.py``) does the Kafka part around
it: polling, producing the decisions' outputs, offsets, commits, rebalances and shutdown.

The steps are separate methods so each can be called (and tested) on its own:

- ``expire``: a record whose ``sluice-deadline`` has passed is not worked on: it becomes an
  ``Expired`` result (dead letter ``expired`` and an error answer), counted in
  ``sluice_expired_total``, and the handler never sees it.
- ``attempt``: results for every record; with the breaker closed the whole batch goes to the
  handler (once ``Admission`` lets the attempt start: see ``admission.py``), otherwise record
  by record: the probe (if the breaker admits one) is handled, the rest answered from the
  response cache or refused as ``circuit-open``.
- ``handle_with_retries``: one handler call, then retriable failures retried with exponential
  backoff; a fatal error raises.
- ``call``: one handler call (a plain function runs in a worker thread). When a call of several
  records raises (or returns the wrong number of results), the records are handled again one
  by one, so only the record that fails gets the error and the breaker sees one fault, not
  one per neighbour.
- ``account``: one finished result fed to the breaker, the admission gate and the response
  cache.
- ``decide`` / ``dead_letter``: a result as outputs; a failure as the original record on
  ``<topic>.DLT`` (``dead_letters.dead_letter``: the Spring header set, a null value stays
  null) and an OpenAI error answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pipeline.errors import CircuitOpen, Expired, SluiceError, StageFault, as_sluice_error
from pipeline.observability.metrics import StageMetrics
from pipeline.runtime.admission import Admission
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.breaker import BreakerState, CircuitBreaker, ResponseCache
from pipeline.runtime.dead_letters import dead_letter
from pipeline.runtime.stage import Handler, output_for
from schemas.headers import SLUICE_DEGRADED, header_bytes, header_value
from schemas.streaming import SLUICE_REPLY_TO, expired, now_ms, parse_deadline, reply_copy

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
ClockMs = Callable[[], int]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a retriable failure is tried again, and how long to wait before each try."""

    retries: int = 0
    backoff_s: float = 0.0

    def delay(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (0-based): ``backoff_s * 2**attempt``."""
        return self.backoff_s * 2.0**attempt


@dataclass(frozen=True, slots=True)
class Decision:
    """What becomes of one record: ``outputs`` to produce, all of which must be acknowledged
    before its offset counts as done. ``error`` is set when the outputs are its dead letter and
    error answer."""

    record: Record
    outputs: list[Output] = field(default_factory=list)
    error: SluiceError | None = None

    @property
    def dead_lettered(self) -> bool:
        return self.error is not None


def outputs_of(decisions: Sequence[Decision]) -> list[Output]:
    """Every output of ``decisions``, in record order."""
    return [o for d in decisions for o in d.outputs]


class RecordProcessor:
    """The per-record decision of one stage: its handler, breaker and response cache."""

    def __init__(
        self,
        handler: Handler,
        *,
        group_id: str,
        breaker: CircuitBreaker,
        cache: ResponseCache,
        metrics: StageMetrics,
        retry: RetryPolicy,
        sleep: Sleep = asyncio.sleep,
        clock_ms: ClockMs = now_ms,
    ) -> None:
        self.handler = handler
        self.spec = handler.spec
        self.stage = handler.spec.name
        self.group_id = group_id
        self.breaker = breaker
        self.cache = cache
        self.metrics = metrics
        self.retry = retry
        self._sleep = sleep
        self._clock_ms = clock_ms
        self._is_async = inspect.iscoroutinefunction(handler.handle)
        self.admission = Admission(breaker)
        self._expired = metrics.expired.labels(self.stage)

    async def process(self, batch: Batch) -> list[Decision]:
        """One decision per record of ``batch``, in order; raises only a fatal error."""
        at = self._clock_ms()
        late = {
            i: self.expire(r, at)
            for i, r in enumerate(batch)
            if self.spec.expires and expired(r.headers, at)
        }
        if not late:
            return [self.decide(result) for result in await self.attempt(batch)]
        live = Batch.of([r for i, r in enumerate(batch) if i not in late])
        handled = iter(await self.attempt(live) if len(live) else [])
        results = [late[i] if i in late else next(handled) for i in range(len(batch))]
        return [self.decide(result) for result in results]

    def expire(self, record: Record, at_ms: int) -> Result:
        """A record whose deadline passed before this stage got to it: not worked on."""
        self._expired.inc()
        deadline = parse_deadline(record.headers) or at_ms
        return Result(
            record,
            error=Expired(
                f"the request's deadline passed {max(0, at_ms - deadline)} ms before the "
                f"{self.stage} stage reached it; it was not processed and can be re-driven "
                "with sluice replay dlq --reason expired"
            ),
        )

    # ---- breaker → handler -----------------------------------------------------------------

    async def attempt(self, batch: Batch) -> list[Result]:
        """Results for every record: handled, served from cache, or refused by the breaker."""
        if self.breaker.state == BreakerState.CLOSED and await self.admission.enter():
            try:
                results = await self.handle_with_retries(batch)
                for result in results:
                    self.account(result)
            finally:
                self.admission.leave()
            return results
        results = []
        for record in batch:
            if self.breaker.admit():
                result = (await self.handle_with_retries(Batch.of([record])))[0]
                self.account(result)
            else:
                result = self.while_open(record)
            results.append(result)
        return results

    def account(self, result: Result) -> None:
        """Feed one finished result to the breaker and the response cache."""
        if result.error is None:
            self.breaker.success()
            self.admission.observe(ok=True)
            if result.fingerprint is not None:
                self.cache.put(result.fingerprint, result.outputs)
        elif result.error.fault:
            self.breaker.fault()
            self.admission.observe(ok=False)
        else:
            self.breaker.release_probe()

    def while_open(self, record: Record) -> Result:
        """A record the breaker did not admit: its cached answer, else ``CircuitOpen``."""
        fingerprint = self.handler.fingerprint(record)
        cached = self.cache.get(fingerprint) if fingerprint is not None else None
        if cached is not None:
            self.metrics.cache_answers.labels(self.stage).inc()
            return Result(record, outputs=self.handler.rebind(cached, record))
        return Result(
            record,
            error=CircuitOpen(
                f"the {self.stage} stage is failing and its circuit breaker is open; "
                "the request was not attempted and can be re-driven with sluice replay dlq"
            ),
        )

    async def handle_with_retries(self, batch: Batch) -> list[Result]:
        """The handler's results, retriable failures retried; raises the first fatal error."""
        results = await self.call(batch)
        for attempt in range(self.retry.retries):
            retry = [i for i, r in enumerate(results) if r.error is not None and r.error.retriable]
            if not retry:
                break
            await self._sleep(self.retry.delay(attempt))
            self.metrics.retries.labels(self.stage).inc(len(retry))
            again = await self.call(Batch.of([results[i].record for i in retry]))
            for i, result in zip(retry, again, strict=True):
                results[i] = result
        for result in results:
            if result.error is not None and result.error.fatal:
                raise result.error
        return results

    async def call(self, batch: Batch) -> list[Result]:
        """One result per record: one handler call, or, when a call of several records raises
        or miscounts, one call per record (an exception becomes that record's error)."""
        results = await self.call_once(batch)
        if results is not None:
            return results
        log.warning(
            "stage %s: a call of %d records from %s failed; handling them one by one",
            self.stage,
            len(batch),
            batch.records[0].where,
        )
        return [r for record in batch for r in await self.call(Batch.of([record]))]

    async def call_once(self, batch: Batch) -> list[Result] | None:
        """One handler call; None when a call of several records failed as a whole (the caller
        isolates), else one result per record, a failure becoming every record's error."""
        t0 = time.perf_counter()
        try:
            if self._is_async:
                out = await self.handler.handle(batch)  # type: ignore[misc]
            else:
                out = await asyncio.to_thread(self.handler.handle, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # becomes a per-record error: counted and dead-lettered
            error = as_sluice_error(exc)
            if error.fatal:
                raise error from exc
            if len(batch) > 1:
                return None
            record = batch.records[0]
            log.exception(
                "stage %s: handler raised on %s request %s",
                self.stage,
                record.where,
                record.request_id(),
            )
            return [Result(record, error=error)]
        finally:
            self.metrics.processing.labels(self.stage).observe(time.perf_counter() - t0)
            self.metrics.batch_size.labels(self.stage).observe(len(batch))
        results: list[Result] = list(out)
        if len(results) != len(batch):
            if len(batch) > 1:
                return None
            error = StageFault(f"handler returned {len(results)} results for {len(batch)} records")
            return [Result(r, error=error) for r in batch]
        return results

    # ---- → outputs or dead letter ----------------------------------------------------------

    def decide(self, result: Result) -> Decision:
        """The outputs for one result: its own (degraded if the request was), or a dead letter."""
        answers = self.spec.answers_topic
        if result.error is None:
            outputs = propagate_degraded(result.record, result.outputs)
            return Decision(result.record, with_reply_copies(result.record, outputs, answers))
        dead = self.dead_letter(result.record, result.error)
        return Decision(
            result.record, with_reply_copies(result.record, dead, answers), error=result.error
        )

    def dead_letter(self, record: Record, error: SluiceError) -> list[Output]:
        """A dead letter with the original bytes (a null value stays null) and the Spring header
        set, and an error answer."""
        request_id = record.request_id()
        log.warning(
            "stage %s: %s request %s dead-lettered: %s (%s)",
            self.stage,
            record.where,
            request_id,
            error.reason,
            error.message,
        )
        dead = dead_letter(record, group=self.group_id, error=error)
        answer = output_for(
            record,
            self.spec.answers_topic,
            error.answer(),
            stage=self.stage,
            request_id=request_id,
            key=record.key,
        )
        self.metrics.dead_letters.labels(self.stage, error.reason).inc()
        self.metrics.error_answers.labels(self.stage, error.reason).inc()
        return [dead, answer]


def with_reply_copies(record: Record, outputs: list[Output], answers: str) -> list[Output]:
    """``outputs`` and, for each answer among them, its copy to the request's reply partition
    (``sluice-reply-to`` of the answer, else of the record: a cached answer rebound here)."""
    address = (
        [(SLUICE_REPLY_TO, raw)] if (raw := header_bytes(record.headers, SLUICE_REPLY_TO)) else []
    )
    copies: list[Output] = []
    for o in outputs:
        copy = reply_copy([*address, *o.headers], o.value) if o.topic == answers else None
        if copy is not None:
            topic, partition, headers, value = copy
            copies.append(Output(topic, o.key, value, headers, partition=partition))
    return [*outputs, *copies]


def propagate_degraded(record: Record, outputs: list[Output]) -> list[Output]:
    """A degraded request's outputs are degraded too: each carries ``sluice-degraded: true``."""
    if header_value(record.headers, SLUICE_DEGRADED) != "true":
        return outputs
    return [
        o
        if header_value(o.headers, SLUICE_DEGRADED) == "true"
        else Output(o.topic, o.key, o.value, [*o.headers, (SLUICE_DEGRADED, b"true")])
        for o in outputs
    ]
