"""The batcher (``sluice run batcher``): runs OpenAI batches over the pipeline.

It reads the compacted batches topic in its consumer group (``sluice-batcher``); each batcher
owns the batches of the partitions it is assigned (``stages.batch_state``). On assignment it
reads those partitions from the beginning and acts only once it has caught up, so it starts
from each batch's latest state. For each batch that is not finished it runs a job:

1. ``validating``: read the input file, check it (``stages.batch_input``); problems -> ``failed``
   with ``errors`` naming the lines, else ``in_progress``.
2. ``in_progress``: read back the answers already on the answers topic since the batch's
   creation (``stages.batch_answers``), then publish the lines without one, at most
   ``SLUICE_BATCH_MAX_PENDING`` at a time, each with the request id ``<batch id>-<line>``, the
   window's end as ``sluice-deadline`` and ``custom_id`` in ``metadata``; record
   ``request_counts`` every ``SLUICE_BATCH_PROGRESS_INTERVAL_S``.
3. Every line answered -> ``finalizing``, the output and error files written
   (``stages.batch_job``), ``completed``. The window's end -> ``expired``; a cancel ->
   ``cancelling``, up to ``SLUICE_BATCH_CANCEL_GRACE_S`` for answers in flight, ``cancelled``;
   both with the lines answered so far in the output file and the others in the error file.

Nothing is committed: killed at any point, the next owner of the partition redoes the job from
the state and the answers topic, publishing only lines without an answer, and writes the same
files under the same ids, each line once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.admin import missing_topics
from pipeline.config import Settings
from pipeline.errors import FatalError, SluiceError
from pipeline.observability.http import HealthServer
from pipeline.storage import ObjectStore, open_store
from schemas.batch import BatchObject
from stages.batch_answers import AnswersFollower
from stages.batch_driver import JobDriver
from stages.batch_files import FileStore
from stages.batch_job import SOURCE, Job
from stages.batch_state import (
    BatchView,
    StateWriter,
    batch_prompts_topic,
    batches_topic,
    ensure_batches_topic,
    partition_for,
    topic_partitions,
)

log = logging.getLogger(__name__)

STAGE = "batcher"
RETRY_S = 5.0  # a job whose storage or Kafka failed is retried after this long


class BatcherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.published = Counter(
            "sluice_batcher_published", "Batch lines published", registry=self.registry
        )
        self.answered = Counter(
            "sluice_batcher_answered", "Batch lines given an outcome", registry=self.registry
        )
        self.jobs = Gauge("sluice_batcher_jobs", "Batches being run", registry=self.registry)
        self.finished = Counter(
            "sluice_batcher_batches_finished",
            "Batches finished, by final status",
            ["status"],
            registry=self.registry,
        )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._batcher._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._batcher._on_assigned(assigned)


class Batcher:
    """Runs the batches of its partitions of the batches topic until asked to stop."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.files = FileStore(store if store is not None else open_store(settings))
        self.topic = batches_topic(settings)
        self.prompts_topic = batch_prompts_topic(settings)
        self.view = BatchView()
        self.jobs: dict[str, Job] = {}
        self.wake: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.finished: set[str] = set()
        self.catching_up: dict[int, int] = {}  # owned partition -> end offset still to reach
        self.owned: set[int] = set()
        self.partitions = 0
        self.metrics = BatcherMetrics()
        self.answers = AnswersFollower(settings, self._route)
        self.driver = JobDriver(
            settings,
            files=self.files,
            view=self.view,
            answers=self.answers,
            jobs=self.jobs,
            wake=self.wake,
            write=self._write,
            prompts_topic=self.prompts_topic,
            on_published=self.metrics.published.inc,
        )
        self.http = HealthServer(
            self.metrics.registry,
            self.healthy,
            self.ready,
            settings.http_host,
            settings.http_port,
        )
        self.fatal: BaseException | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._writer: StateWriter | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._polled_at = time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        needed = [self.settings.topics.answers, self.prompts_topic]
        missing = await missing_topics(self.settings, needed)
        if missing:
            raise FatalError(
                f"batcher: topics missing: {', '.join(missing)} "
                "(create them with: sluice topics create)"
            )
        control = self.settings.topics.control
        self.driver.control = None if await missing_topics(self.settings, [control]) else control
        await ensure_batches_topic(self.settings)
        await self.http.start()
        common = self.settings.kafka_common()
        self._producer = AIOKafkaProducer(**common, acks="all", enable_idempotence=True)
        await self._producer.start()
        self.driver.producer = self._producer
        self._writer = StateWriter(self.settings, self._producer, SOURCE)
        await self.answers.start()
        self._consumer = AIOKafkaConsumer(
            **common,
            group_id=self.settings.group_id(STAGE),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
        )
        await self._consumer.start()
        self.partitions = len(await topic_partitions(self.settings, self.topic))
        self._consumer.subscribe([self.topic], listener=_Rebalance(self))
        self._loops = [
            asyncio.create_task(self._state_loop(), name="batcher_state_loop"),
            asyncio.create_task(self.answers._answers_loop(), name="batcher_answers_loop"),
        ]
        for task in self._loops:
            task.add_done_callback(self._loop_done)
        log.info(
            "batcher: batches from %s (group %s), requests to %s, files in %s",
            self.topic,
            self.settings.group_id(STAGE),
            self.prompts_topic,
            self.files.store.url,
        )

    async def run(self) -> None:
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
        """Stop the jobs where they are (their state is in Kafka), then the clients."""
        self._stopping.set()
        await self._stop_jobs(list(self.tasks))
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        await self.answers.stop()
        if self._producer is not None:
            await self._producer.stop()
        await self.files.close()
        await self.http.stop()
        log.info("batcher stopped")

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.fatal is None:
            self.fatal = exc
            log.error("batcher: fatal error, stopping: %s", exc, exc_info=exc)
            self._stopping.set()

    def healthy(self) -> tuple[bool, str]:
        if self.fatal is not None:
            return False, f"fatal: {self.fatal}"
        idle = time.monotonic() - min(self._polled_at, self.answers.polled_at)
        if idle > self.settings.stall_after_s:
            return False, f"a fetch loop has not polled for {idle:.0f}s"
        return True, f"{len(self.tasks)} batches running"

    def ready(self) -> tuple[bool, str]:
        if not self._loops:
            return False, "starting"
        if self.catching_up:
            return False, f"reading {len(self.catching_up)} partitions of {self.topic}"
        return True, f"{len(self.owned)} partitions of {self.topic} owned"

    # ---- the batches topic -------------------------------------------------------------------

    async def _state_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            data = await consumer.getmany(timeout_ms=200, max_records=500)
            self._polled_at = time.monotonic()
            touched: set[str] = set()
            for records in data.values():
                for r in records:
                    batch_id = self.view.apply(r.key, r.value, r.headers)
                    if batch_id is not None:
                        touched.add(batch_id)
            for partition, end in list(self.catching_up.items()):
                if await consumer.position(TopicPartition(self.topic, partition)) >= end:
                    del self.catching_up[partition]
                    touched.update(b for b in self.view.batches if self._partition(b) == partition)
            for batch_id in sorted(touched):
                self._consider(batch_id)

    def _partition(self, batch_id: str) -> int:
        return partition_for(batch_id, self.partitions)

    def _consider(self, batch_id: str) -> None:
        """Start a job for a batch that needs one; wake a running one (a cancel may have come)."""
        partition = self._partition(batch_id)
        if partition not in self.owned or partition in self.catching_up:
            return
        if batch_id in self.tasks:
            self._wake(batch_id)
            return
        batch = self.view.batches.get(batch_id)
        if batch is None or batch.terminal or batch_id in self.finished:
            return
        task = asyncio.create_task(self._job(batch), name=f"batch_{batch_id}")
        self.tasks[batch_id] = task
        self.metrics.jobs.set(len(self.tasks))

    def _wake(self, batch_id: str) -> None:
        event = self.wake.get(batch_id)
        if event is not None:
            event.set()

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        mine = [tp for tp in assigned if tp.topic == self.topic]
        if not mine:
            return
        await consumer.seek_to_beginning(*mine)
        ends = await consumer.end_offsets(mine)
        for tp in mine:
            self.owned.add(tp.partition)
            self.catching_up[tp.partition] = ends[tp]
        log.info("batcher: assigned partitions %s", sorted(tp.partition for tp in mine))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        gone = {tp.partition for tp in revoked if tp.topic == self.topic}
        await self._stop_jobs([b for b in self.tasks if self._partition(b) in gone])
        self.owned -= gone
        for partition in gone:
            self.catching_up.pop(partition, None)

    async def _stop_jobs(self, batch_ids: list[str]) -> None:
        tasks = [self.tasks.pop(b) for b in batch_ids if b in self.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.metrics.jobs.set(len(self.tasks))

    # ---- answers -----------------------------------------------------------------------------

    def _route(self, batch_id: str, line: int, request_id: str, value: bytes | None) -> None:
        job = self.jobs.get(batch_id)
        if job is not None and job.offer(line, request_id, value):
            self.metrics.answered.inc()
            self._wake(batch_id)

    # ---- a job -------------------------------------------------------------------------------

    async def _job(self, batch: BatchObject) -> None:
        batch_id = batch.id
        self.wake[batch_id] = asyncio.Event()
        try:
            await self.driver.run(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not (isinstance(exc, SluiceError) and exc.retriable):
                log.error("batcher: batch %s: fatal error, stopping", batch_id, exc_info=exc)
                self.fatal = self.fatal or exc
                self._stopping.set()
                return
            log.warning("batcher: batch %s failed, retrying in %.0fs: %s", batch_id, RETRY_S, exc)
            await asyncio.sleep(RETRY_S)
            asyncio.get_running_loop().call_soon(self._consider, batch_id)
        finally:
            self.jobs.pop(batch_id, None)
            self.wake.pop(batch_id, None)
            if self.tasks.get(batch_id) is asyncio.current_task():
                del self.tasks[batch_id]
            self.metrics.jobs.set(len(self.tasks))

    async def _write(self, batch: BatchObject, **update: Any) -> BatchObject:
        new = batch.model_copy(update=update)
        assert self._writer is not None
        await self._writer.put(new)
        self.view.put(new)
        job = self.jobs.get(new.id)
        if job is not None:
            job.batch = new
        if new.terminal:
            self.finished.add(new.id)
            self.metrics.finished.labels(new.status).inc()
            log.info("batcher: batch %s %s (%s)", new.id, new.status, new.request_counts)
        return new


async def run_batcher(settings: Settings, store: ObjectStore | None = None) -> None:
    """``sluice run batcher``: run until SIGTERM/SIGINT."""
    batcher = Batcher(settings, store)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, batcher.request_stop)
    try:
        await batcher.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
