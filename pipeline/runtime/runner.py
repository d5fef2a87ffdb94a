"""The one stage loop every Sluice service runs: the Kafka side of a stage.

Consume micro-batches (``getmany``), hand each unit of work to ``RecordProcessor``
(``pipeline/runtime/processing.py``: breaker → handler → retries → outputs or dead letter, one
``Decision`` per record, no Kafka inside), produce every output with ``acks=all`` on the
idempotent producer, and commit an input offset only once all of its outputs are acknowledged.
Work may finish out of order; ``OffsetTracker`` commits per partition up to the highest
contiguous finished offset. The consumer keeps polling while handlers run (partitions are
paused, not the loop), so ``max_poll_interval_ms`` never trips. Rebalances and graceful
shutdown live here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from pipeline.admin import missing_topics
from pipeline.config import Settings, Topics
from pipeline.errors import FatalError
from pipeline.observability.gpu import GpuCollector
from pipeline.observability.http import HealthServer
from pipeline.observability.metrics import StageMetrics
from pipeline.observability.process import ProcessMemoryCollector
from pipeline.runtime.backpressure import Change, InFlightBound
from pipeline.runtime.batch import Batch, Record
from pipeline.runtime.breaker import BreakerState, CircuitBreaker, ResponseCache
from pipeline.runtime.offsets import OffsetTracker
from pipeline.runtime.processing import Decision, RecordProcessor, RetryPolicy, outputs_of
from pipeline.runtime.stage import Handler

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: StageRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._runner._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._runner._on_assigned(assigned)


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
        self._latency = self.metrics.latency.labels(self.stage)  # hot path: bound once
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
        self._tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._txn_lock = asyncio.Lock()
        self._commit_lock = asyncio.Lock()
        self.backpressure = InFlightBound(settings.max_in_flight)
        self._warm = False
        self._assigned: set[TopicPartition] = set()
        self._last_poll = time.monotonic()
        self._last_finish = time.monotonic()
        self.fatal: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check topics, warm up, then join the consumer group and start the loops."""
        needed = [
            self.spec.input_topic,
            Topics.dlt(self.spec.input_topic),
            self.spec.answers_topic,
            *self.spec.output_topics,
        ]
        missing = await missing_topics(self.settings, needed)
        if missing:
            raise FatalError(
                f"stage {self.stage}: topics missing: {', '.join(missing)} "
                "(create them with: sluice topics create)"
            )
        self.cache.load()
        await self.http.start()
        t0 = time.monotonic()
        await self.handler.warmup()
        self._warm = True
        log.info("stage %s warmed up in %.2fs", self.stage, time.monotonic() - t0)
        common = self.settings.kafka_common()
        producer_kwargs: dict[str, Any] = {
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 2,
            "max_batch_size": 1 << 20,
        }
        if self.settings.exactly_once:
            # Stable per process slot: a restart fences the previous incarnation (see config).
            producer_kwargs["transactional_id"] = f"{self.group_id}-{self.settings.instance_id}"
            producer_kwargs["transaction_timeout_ms"] = self.settings.transaction_timeout_ms
        self._producer = AIOKafkaProducer(**common, **producer_kwargs)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **common,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if self.settings.exactly_once else "read_uncommitted",
            max_poll_records=self.settings.batch_max_records,
            fetch_max_wait_ms=max(1, self.settings.batch_max_wait_ms),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
        )
        await self._consumer.start()
        self._consumer.subscribe([self.spec.input_topic], listener=_Rebalance(self))
        self._loops = [
            asyncio.create_task(self._fetch_loop(), name=f"{self.stage}_fetch_loop"),
            asyncio.create_task(self._commit_loop(), name=f"{self.stage}_commit_loop"),
        ]
        for task in self._loops:
            task.add_done_callback(self._task_done)
        self.metrics.ready.labels(self.stage).set(0)

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
        self._stopping.set()
        fetch = [t for t in self._loops if t.get_name().endswith("_fetch_loop")]
        await asyncio.gather(*fetch, return_exceptions=True)
        if self._tasks:
            log.info(
                "stage %s: finishing %d in-flight tasks (deadline %.0fs)",
                self.stage,
                len(self._tasks),
                self.settings.shutdown_deadline_s,
            )
            _, pending = await asyncio.wait(
                list(self._tasks), timeout=self.settings.shutdown_deadline_s
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._consumer is not None:
            await self._commit()
            log.info(
                "stage %s: committed %s; leaving the group",
                self.stage,
                {f"{tp.topic}[{tp.partition}]": o for tp, o in self.tracker.positions().items()},
            )
            await self._consumer.stop()  # leaves the group
        if self._producer is not None:
            await self._producer.stop()
        self.cache.save()
        await self.handler.close()
        await self.http.stop()
        self._stopped.set()
        log.info("stage %s stopped", self.stage)

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
        if self.tracker.in_flight and now - self._last_finish > stall:
            return False, f"no work finished for {now - self._last_finish:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self._warm:
            return False, "warming up"
        if not self._assigned:
            return False, "no partitions assigned"
        if self.breaker.state == BreakerState.OPEN:
            return False, "circuit breaker open"
        return True, "ok"

    # ---- the loops -------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        max_records = self.settings.batch_max_records
        wait_ms = self.settings.batch_max_wait_ms
        while not self._stopping.is_set():
            room = self._apply_backpressure()
            data = await consumer.getmany(timeout_ms=wait_ms, max_records=min(max_records, room))
            self._last_poll = time.monotonic()
            self.metrics.progress.labels(self.stage).set(time.time())
            for tp, messages in data.items():
                if tp not in self._assigned:
                    continue
                records = [Record.of(m, m.timestamp) for m in messages]
                epoch = self.tracker.add_many(tp, [r.offset for r in records])
                self.metrics.consumed.labels(self.stage, tp.topic).inc(len(records))
                units = (
                    [Batch.of([r]) for r in records]
                    if self.spec.unit == "record"
                    else [Batch.of(records)]
                )
                for batch in units:
                    task = asyncio.create_task(self._process(batch, tp, epoch))
                    self._tasks[task] = tp
                    task.add_done_callback(self._task_done)
            self._in_flight.set(self.tracker.in_flight)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.fatal is None:
            self.fatal = exc
            log.error("stage %s: fatal error, stopping: %s", self.stage, exc, exc_info=exc)
            self._stopping.set()

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self._commit()

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

    def _apply_backpressure(self) -> int:
        """Pause every partition at the in-flight bound, resume at half; how many may come."""
        consumer = self._consumer
        assert consumer is not None
        in_flight = self.tracker.in_flight
        change = self.backpressure.update(in_flight)
        if change is Change.PAUSE:
            consumer.pause(*self._assigned)
            self.metrics.paused.labels(self.stage).set(len(self._assigned))
            log.info(
                "stage %s: %d in flight >= %d, pausing %d partitions",
                self.stage,
                in_flight,
                self.backpressure.max_records,
                len(self._assigned),
            )
        elif change is Change.RESUME:
            consumer.resume(*self._assigned)
            self.metrics.paused.labels(self.stage).set(0)
        return self.backpressure.room(in_flight)

    # ---- rebalances ------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._commit(only=revoked)
        stale = [t for t, tp in self._tasks.items() if tp in revoked]
        for task in stale:
            task.cancel()
        await asyncio.gather(*stale, return_exceptions=True)
        for tp in revoked:
            self.tracker.revoke(tp)
        self._assigned -= revoked
        if revoked:
            log.info(
                "stage %s: revoked %s (dropped %d in-flight tasks; the new owner redoes them)",
                self.stage,
                sorted(str(tp) for tp in revoked),
                len(stale),
            )
        self._update_ready()

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self.tracker.assign(tp)
        self._assigned |= assigned
        if self.backpressure.paused and self._consumer is not None and assigned:
            self._consumer.pause(*assigned)
        log.info("stage %s: assigned %s", self.stage, sorted(str(tp) for tp in assigned))
        self._update_ready()

    def _on_breaker_change(self, state: BreakerState) -> None:
        self.metrics.breaker_state.labels(self.stage).set(int(state))
        self.metrics.breaker_transitions.labels(self.stage, state.name.lower()).inc()
        self._update_ready()

    def _update_ready(self) -> None:
        self.metrics.ready.labels(self.stage).set(1 if self.ready()[0] else 0)

    # ---- one unit of work ------------------------------------------------------------------

    async def _process(self, batch: Batch, tp: TopicPartition, epoch: int) -> None:
        if self.settings.exactly_once:
            async with self._txn_lock:
                await self._process_transactional(batch, tp, epoch)
            return
        decisions = await self.processor.process(batch)
        await self._produce(decisions)
        now = time.time()
        latency = self._latency
        for record in batch:
            self.tracker.finish(tp, record.offset, epoch)
            latency.observe(max(0.0, now - record.timestamp_ms / 1000))
        self._last_finish = time.monotonic()
        self._in_flight.set(self.tracker.in_flight)

    async def _process_transactional(self, batch: Batch, tp: TopicPartition, epoch: int) -> None:
        producer = self._producer
        assert producer is not None
        decisions = await self.processor.process(batch)
        async with producer.transaction():
            await self._produce(decisions)
            last = batch.records[-1].offset
            await producer.send_offsets_to_transaction({tp: last + 1}, self.group_id)
        for record in batch:
            self.tracker.finish(tp, record.offset, epoch)
        self._last_finish = time.monotonic()

    async def _produce(self, decisions: Sequence[Decision]) -> None:
        """Produce every decision's outputs and wait until all are acknowledged."""
        producer = self._producer
        assert producer is not None
        outputs = outputs_of(decisions)
        try:
            futures = [
                await producer.send(o.topic, o.value, key=o.key, headers=o.headers) for o in outputs
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise FatalError(f"stage {self.stage}: producing outputs failed: {exc!r}") from exc
        per_topic = Counter(o.topic for o in outputs)
        for topic, n in per_topic.items():
            self.metrics.produced.labels(self.stage, topic).inc(n)


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
