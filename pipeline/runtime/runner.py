"""The one stage loop every Sluice service runs: the Kafka side of a stage.

Consume micro-batches (``Fetcher``: ``getmany``, and a way past undecodable records), hand each
unit of work to ``RecordProcessor`` (``pipeline/runtime/processing.py``: deadline → breaker →
handler → retries → outputs or dead letter, one ``Decision`` per record, no Kafka inside),
produce every output with ``acks=all`` on the idempotent producer (``Delivery``: a record Kafka
refuses becomes that record's dead letter, a lost producer is fatal), and commit an input offset
only once all of its outputs are acknowledged. Work may finish out of order; ``OffsetTracker``
commits per partition up to the highest contiguous finished offset. The consumer keeps polling
while handlers run (partitions are paused, not the loop), so ``max_poll_interval_ms`` never
trips. Rebalances (in-flight work of lost partitions finished within ``revoke_deadline_s``),
graceful shutdown (within ``shutdown_deadline_s``) and the fatal path (a crash report, then
stop) live here too. A stage whose spec names a ``batch_input_topic`` reads both lanes;
``Pausing`` (``pipeline/runtime/pausing.py``) pauses the batch lane's partitions while
interactive work waits, and every partition at the in-flight bound.

A handler may expose ``max_in_flight: int | None`` (read after warm-up: the most records it
can usefully hold, e.g. compute's 2x its engine's batch; the loop's bound becomes the smaller of
that and the setting, so the rest stays in Kafka as lag for other workers) and
``last_progress() -> float`` (``time.monotonic()`` of its last progress, e.g. a generated
token, so long generations do not fail ``/healthz``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from pipeline.admin import cluster_id, missing_topics
from pipeline.config import Settings, Topics
from pipeline.errors import FatalError
from pipeline.observability import crash
from pipeline.observability.gpu import GpuCollector
from pipeline.observability.http import HealthServer
from pipeline.observability.metrics import StageMetrics
from pipeline.observability.process import ProcessMemoryCollector
from pipeline.runtime.backpressure import InFlightBound
from pipeline.runtime.batch import Batch, Record
from pipeline.runtime.breaker import BreakerState, CircuitBreaker, ResponseCache
from pipeline.runtime.clients import stage_consumer, stage_producer
from pipeline.runtime.delivery import Delivery, max_record_bytes
from pipeline.runtime.fetching import Fetcher
from pipeline.runtime.inflight import InFlight, Work
from pipeline.runtime.offsets import OffsetTracker
from pipeline.runtime.pausing import Pausing
from pipeline.runtime.processing import RecordProcessor, RetryPolicy
from pipeline.runtime.rebalance import Rebalance, finish_or_hand_back, within
from pipeline.runtime.stage import Handler
from pipeline.runtime.units import Units

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2
# Of the shutdown deadline, what is kept for committing, leaving the group and closing.
SHUTDOWN_RESERVE_S = 2.0


class StageRunner:
    """Runs one handler against Kafka until asked to stop."""

    def __init__(self, settings: Settings, handler: Handler, *, group_id: str | None = None):
        self.settings = settings
        self.handler = handler
        self.spec = handler.spec
        self.stage = handler.spec.name
        self.group_id = group_id or settings.group_id(self.stage)
        self.metrics = StageMetrics(self.stage)
        self.metrics.registry.register(ProcessMemoryCollector())
        self.metrics.registry.register(GpuCollector())
        self._in_flight = self.metrics.in_flight.labels(self.stage)
        for collector in getattr(handler, "collectors", list)():
            self.metrics.registry.register(collector)
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold,
            settings.breaker_cooldown_s,
            on_change=self._on_breaker_change,
        )
        self.cache = ResponseCache(
            settings.response_cache_size, settings.state_dir / "cache" / f"{self.stage}.json"
        )
        self.processor = RecordProcessor(
            handler,
            group_id=self.group_id,
            breaker=self.breaker,
            cache=self.cache,
            metrics=self.metrics,
            retry=RetryPolicy(settings.handler_retries, settings.retry_backoff_ms / 1000),
        )
        self.tracker = OffsetTracker()
        self.http = HealthServer(
            self.metrics.registry, self.healthy, self.ready, settings.http_host, settings.http_port
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.inflight = InFlight()
        self._fetcher: Fetcher | None = None
        self._units_or_none: Units | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self.backpressure = InFlightBound(settings.max_in_flight, settings.max_in_flight_bytes)
        self.pausing = Pausing(
            self.backpressure,
            stage=self.stage,
            batch_topic=self.spec.batch_input_topic,
            admitted=getattr(handler, "admitted", None),
            on_change=self._on_paused,
        )
        self._warm = False
        self._last_poll = time.monotonic()
        self._last_finish = time.monotonic()
        self.fatal: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check topics, warm up, then join the consumer group and start the loops."""
        inputs = self.spec.input_topics
        writes = [*map(Topics.dlt, inputs), self.spec.answers_topic, *self.spec.output_topics]
        missing = await missing_topics(self.settings, [*inputs, *writes])
        if missing:
            raise FatalError(
                f"stage {self.stage}: topics missing: {', '.join(missing)} "
                "(create them with: sluice topics create)"
            )
        max_request = await max_record_bytes(self.settings, writes)
        self.cache.load()
        await self.http.start()
        t0 = time.monotonic()
        await self.handler.warmup()
        self._warm = True
        log.info("stage %s warmed up in %.2fs", self.stage, time.monotonic() - t0)
        self._bound_by_handler()
        crash.add_inflight(self.inflight.describe)
        self._producer = stage_producer(self.settings, self.group_id, max_request=max_request)
        await self._producer.start()
        delivery = Delivery(
            self._producer,
            stage=self.stage,
            max_request_size=max_request,
            dead_letter=self.processor.dead_letter,
            metrics=self.metrics,
        )
        self._units_or_none = Units(
            processor=self.processor,
            delivery=delivery,
            producer=self._producer,
            tracker=self.tracker,
            metrics=self.metrics,
            exactly_once=self.settings.exactly_once,
            finished=self._finished,
        )
        self._consumer = stage_consumer(self.settings, self.group_id)
        await self._consumer.start()
        self.pausing.attach(self._consumer)
        self._fetcher = Fetcher(self._consumer, await cluster_id(self.settings))
        self._consumer.subscribe(
            list(inputs), listener=Rebalance(self._on_revoked, self._on_assigned)
        )
        self._loops = [
            asyncio.create_task(self._fetch_loop(), name=f"{self.stage}_fetch_loop"),
            asyncio.create_task(self._commit_loop(), name=f"{self.stage}_commit_loop"),
        ]
        for task in self._loops:
            task.add_done_callback(self._task_done)
        self.metrics.ready.labels(self.stage).set(0)

    def _bound_by_handler(self) -> None:
        """The in-flight bound: the setting, or the handler's ``max_in_flight`` if smaller."""
        capacity = getattr(self.handler, "max_in_flight", None)
        if isinstance(capacity, int) and 0 < capacity < self.backpressure.max_records:
            self.backpressure.max_records = capacity
            log.info("stage %s: at most %d records in flight (the handler's)", self.stage, capacity)

    async def run(self) -> None:
        """Start, serve until ``request_stop`` (or a fatal error), then shut down."""
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            await self.shutdown()
        if self.fatal is not None:
            raise self.fatal

    def request_stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop fetching, finish in-flight work within the deadline, commit, leave the group."""
        if self._stopped.is_set():
            return
        deadline = self.settings.shutdown_deadline_s
        ends = time.monotonic() + deadline
        self._stopping.set()
        fetch = [t for t in self._loops if t.get_name().endswith("_fetch_loop")]
        await asyncio.gather(*fetch, return_exceptions=True)
        if self.inflight:
            reserve = min(SHUTDOWN_RESERVE_S, deadline / 5)
            log.info(
                "stage %s: finishing %d in-flight tasks (deadline %.0fs)",
                self.stage,
                len(self.inflight),
                deadline,
            )
            left = max(0.0, ends - reserve - time.monotonic())
            _, handed_back = await finish_or_hand_back(list(self.inflight.tasks), left)
            if handed_back:
                log.warning(
                    "stage %s: handed back %d unfinished tasks (uncommitted; redone by the "
                    "partitions' next owner)",
                    self.stage,
                    handed_back,
                )
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._leave(ends)
        self.cache.save()
        await within(self.handler.close(), ends, "closing the handler")
        await self.http.stop()
        self._stopped.set()
        log.info("stage %s stopped", self.stage)

    async def _leave(self, ends: float) -> None:
        """Commit what is finished, leave the group, stop the producer: before ``ends``."""
        if self._consumer is not None:
            await within(self._commit(), ends, "the final commit")
            log.info(
                "stage %s: committed %s; leaving the group",
                self.stage,
                {f"{tp.topic}[{tp.partition}]": o for tp, o in self.tracker.positions().items()},
            )
            await within(self._consumer.stop(), ends, "leaving the group")
        if self._producer is not None:
            await within(self._producer.stop(), ends, "stopping the producer")

    # ---- health ----------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        now = time.monotonic()
        stall = self.settings.stall_after_s
        if self.fatal is not None:
            return False, f"fatal: {self.fatal}"
        handler_ok, why = getattr(self.handler, "healthy", _alive)()  # e.g. compute's engine
        if not handler_ok:
            return False, why
        if self._loops and now - self._last_poll > stall:
            return False, f"the fetch loop has not polled for {now - self._last_poll:.0f}s"
        if self.tracker.in_flight and now - self._last_progress() > stall:
            return False, f"no work finished for {now - self._last_progress():.0f}s"
        return True, "ok"

    def _last_progress(self) -> float:
        """When work last progressed: a record finished, or the handler reported progress."""
        reported = getattr(self.handler, "last_progress", None)
        if callable(reported):
            return max(self._last_finish, float(reported()))
        return self._last_finish

    def ready(self) -> tuple[bool, str]:
        if not self._warm:
            return False, "warming up"
        if not self.pausing.assigned:
            return False, "no partitions assigned"
        if self.breaker.state == BreakerState.OPEN:
            return False, "circuit breaker open"
        return True, "ok"

    # ---- the loops -------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        fetcher = self._fetcher
        assert fetcher is not None
        max_records = self.settings.batch_max_records
        wait_ms = self.settings.batch_max_wait_ms
        while not self._stopping.is_set():
            room = self.pausing.update(self.tracker.in_flight, self.inflight.bytes)
            fetched = await fetcher.fetch(timeout_ms=wait_ms, max_records=min(max_records, room))
            self._last_poll = time.monotonic()
            self.metrics.progress.labels(self.stage).set(time.time())
            for tp in fetched.partitions():
                if tp not in self.pausing.assigned:
                    continue  # revoked meanwhile: the next owner reads them
                epoch = self.tracker.add_many(tp, fetched.offsets(tp))
                records = fetched.records.get(tp, [])
                self.pausing.fetched(records)
                undecodable = fetched.undecodable.get(tp, [])
                self.metrics.consumed.labels(self.stage, tp.topic).inc(
                    len(records) + len(undecodable)
                )
                units = (
                    [Batch.of([r]) for r in records]
                    if self.spec.unit == "record"
                    else [Batch.of(records)] * bool(records)
                )
                for batch in units:
                    work = Work(tp, batch.records, epoch, batch.size_bytes)
                    self._spawn(self._units.process(batch, tp, epoch), work)
                if undecodable:
                    upto = fetched.offsets(tp)[-1] + 1
                    dead = self._units.dead_letter_undecodable(undecodable, tp, epoch, upto=upto)
                    self._spawn(dead, Work(tp, (), epoch, 0))
            self._in_flight.set(self.tracker.in_flight)

    @property
    def _units(self) -> Units:
        assert self._units_or_none is not None, "start() makes the producer first"
        return self._units_or_none

    def _finished(self, records: Sequence[Record]) -> None:
        """A unit of work is done: the batch lane's gate and the in-flight bound look again."""
        self._last_finish = time.monotonic()
        self._in_flight.set(self.tracker.in_flight)
        self.pausing.finished(records)
        if self._consumer is not None:
            self.pausing.update(self.tracker.in_flight, self.inflight.bytes)

    def _on_paused(self, partitions: int, batch_lane: int) -> None:
        self.metrics.paused.labels(self.stage).set(partitions)
        if self.spec.batch_input_topic is not None:
            self.metrics.batch_lane_paused.labels(self.stage).set(batch_lane)

    def _spawn(self, work: Coroutine[Any, Any, None], what: Work) -> None:
        task = asyncio.create_task(work)
        self.inflight.add(task, what)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.inflight.done(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The fatal path: write a crash report (with the records in flight), then stop."""
        if self.fatal is not None:
            return
        self.fatal = exc
        log.error("stage %s: fatal error, stopping: %s", self.stage, exc, exc_info=exc)
        crash.report(None, exc)
        self._stopping.set()

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self._commit()
            self.cache.save_if_due()

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None or self.settings.exactly_once:
            return
        async with self._commit_lock:
            offsets = self.tracker.committable()
            if only is not None:
                offsets = {tp: o for tp, o in offsets.items() if tp in only}
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                log.warning(
                    "stage %s: commit of %s failed (%s); the work will be redone",
                    self.stage,
                    offsets,
                    exc,
                )
                return
            self.tracker.mark_committed(offsets)
            self.metrics.commits.labels(self.stage).inc()
            log.debug("stage %s: committed %s", self.stage, offsets)

    # ---- rebalances ------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish the lost partitions' work within ``revoke_deadline_s``, commit it, and hand
        back (cancel, uncommitted) what is left; only then let the partitions go."""
        self.pausing.revoke(revoked)  # from now on, records fetched for them are not taken
        work = self.inflight.of(revoked)
        pending = [t for t in work if not t.done()]
        if pending and self.settings.revoke_deadline_s > 0:
            await asyncio.wait(pending, timeout=self.settings.revoke_deadline_s)
        await self._commit(only=revoked)  # what finished, before anything is handed back
        finished, handed_back = await finish_or_hand_back(work, 0)
        for tp in revoked:
            self.tracker.revoke(tp)
        if self._fetcher is not None:
            self._fetcher.forget(revoked)
        if revoked:
            log.info(
                "stage %s: revoked %s (finished %d in-flight tasks, handed back %d: the new "
                "owner redoes those)",
                self.stage,
                sorted(str(tp) for tp in revoked),
                finished,
                handed_back,
            )
        self._update_ready()

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self.tracker.assign(tp)
        self.pausing.assign(assigned)  # paused at once if the bound or the lane's gate says so
        log.info("stage %s: assigned %s", self.stage, sorted(str(tp) for tp in assigned))
        self._update_ready()

    def _on_breaker_change(self, state: BreakerState) -> None:
        self.metrics.breaker_state.labels(self.stage).set(int(state))
        self.metrics.breaker_transitions.labels(self.stage, state.name.lower()).inc()
        self._update_ready()

    def _update_ready(self) -> None:
        self.metrics.ready.labels(self.stage).set(1 if self.ready()[0] else 0)


def _alive() -> tuple[bool, str]:
    return True, "ok"


async def run_stage(settings: Settings, handler: Handler) -> None:
    """``sluice run <stage>``: run until SIGTERM/SIGINT, then shut down gracefully."""
    import signal

    runner = StageRunner(settings, handler)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.request_stop)
    try:
        await runner.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
