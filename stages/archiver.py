"""The archiver: prompts and answers to object storage, as a replayable conversation log.

Not a stage handler: it batches many records into one object and may commit a partition only
once that object is stored, so it runs its own small loop, with the stage runner's habits
(manual commits, keep polling and pause partitions for backpressure, graceful SIGTERM,
``/metrics`` ``/healthz`` ``/readyz``). Layout and record format: ``schemas/archive.py``;
the reasons behind them: ``docs/ARCHIVE.md``.

Per partition, records go into an open chunk (``stages/archive_chunks.py``); the chunk is sealed
when it reaches ``archive_max_records`` or ``archive_max_bytes`` or is ``archive_max_age_s`` old.
A partition's writer stores its sealed chunks one at a time, in order, and commits
``last offset + 1`` after each: at most one stored-but-uncommitted object exists per partition,
and it starts at the committed offset, so whoever redoes the partition writes that same name
again. A store failure is retried with exponential backoff for as long as it lasts; meanwhile the
partition pauses (the consumer keeps polling), the group's lag grows and
``sluice_archiver_stalled`` is 1. The serving stages never notice: the archiver only reads their
topics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.admin import missing_topics
from pipeline.config import Settings
from pipeline.errors import FatalError
from pipeline.logs import setup_logging
from pipeline.observability.http import HealthServer
from pipeline.storage import ObjectStore, StorageError, open_store
from schemas.archive import encode_object
from stages.archive_chunks import Chunk, PartitionBuffer
from stages.archive_metrics import ArchiverMetrics

log = logging.getLogger(__name__)

STAGE = "archiver"
MAX_SEALED = 2  # sealed chunks waiting to be stored before the partition is paused
POLL_MS = 200
REVOKE_DEADLINE_S = 5.0  # a rebalance waits this long for buffered records to be stored
LAG_INTERVAL_S = 2.0
THREAD_ENCODE_BYTES = 1 << 20  # gzip larger chunks off the event loop


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, archiver: Archiver) -> None:
        self._archiver = archiver

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._archiver._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._archiver._on_assigned(assigned)


class Archiver:
    """Consumes prompts and answers and stores them as objects until asked to stop."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore | None = None,
        *,
        group_id: str | None = None,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else open_store(settings)
        self.group_id = group_id or settings.group_id(STAGE)
        self.topics = [settings.topics.prompts, settings.topics.answers]
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.metrics = ArchiverMetrics(self.topics)
        self.http = HealthServer(
            self.metrics.registry, self.healthy, self.ready, settings.http_host, settings.http_port
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._buffers: dict[TopicPartition, PartitionBuffer] = {}
        self._writers: dict[TopicPartition, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._failing: set[TopicPartition] = set()
        self._commit_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started = False
        self._last_poll = time.monotonic()
        self.fatal: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        missing = await missing_topics(self.settings, self.topics)
        if missing:
            raise FatalError(
                f"archiver: topics missing: {', '.join(missing)} "
                "(create them with: sluice topics create)"
            )
        await self.http.start()
        self._consumer = AIOKafkaConsumer(
            **self.settings.kafka_common(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # aborted transactional outputs are not the log
            max_poll_records=500,
            fetch_max_wait_ms=POLL_MS,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
        )
        await self._consumer.start()
        self._consumer.subscribe(self.topics, listener=_Rebalance(self))
        self._loops = [
            asyncio.create_task(self._fetch_loop(), name="archiver_fetch_loop"),
            asyncio.create_task(self._age_loop(), name="archiver_age_loop"),
            asyncio.create_task(self._lag_loop(), name="archiver_lag_loop"),
        ]
        for task in self._loops:
            task.add_done_callback(self._task_done)
        self._started = True
        log.info(
            "archiver: %s -> %s (group %s; an object per %d records / %d bytes / %.0fs)",
            ", ".join(self.topics),
            self.store.url,
            self.group_id,
            self.settings.archive_max_records,
            self.settings.archive_max_bytes,
            self.settings.archive_max_age_s,
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
        """Stop fetching, store what is buffered within the deadline, commit, leave the group."""
        if self._stopped.is_set():
            return
        self._stopping.set()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        buffered = sum(b.buffered for b in self._buffers.values())
        if buffered:
            log.info(
                "archiver: storing %d buffered records (deadline %.0fs)",
                buffered,
                self.settings.shutdown_deadline_s,
            )
        await asyncio.gather(
            *(self._release(tp, self.settings.shutdown_deadline_s) for tp in list(self._buffers))
        )
        if self._consumer is not None:
            await self._consumer.stop()  # leaves the group
        await self.store.close()
        await self.http.stop()
        self._stopped.set()
        log.info("archiver stopped")

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.fatal is None:
            self.fatal = exc
            log.error("archiver: fatal error, stopping: %s", exc, exc_info=exc)
            self._stopping.set()

    # ---- health ----------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        if self.fatal is not None:
            return False, f"fatal: {self.fatal}"
        idle = time.monotonic() - self._last_poll
        if self._started and idle > self.settings.stall_after_s:
            return False, f"the fetch loop has not polled for {idle:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if not self._buffers:
            return False, "no partitions assigned"
        if self._failing:
            return False, f"storing objects fails for {len(self._failing)} partitions (retrying)"
        return True, "ok"

    # ---- the loops -------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            data = await consumer.getmany(timeout_ms=POLL_MS, max_records=500)
            now = time.monotonic()
            self._last_poll = now
            self.metrics.progress.set(time.time())
            for tp, messages in data.items():
                buffer = self._buffers.get(tp)
                if buffer is None:
                    continue  # revoked while fetched
                for m in messages:
                    buffer.add(m.offset, m.timestamp, m.key, m.value, m.headers, now=now)
                self.metrics.consumed.labels(tp.topic).inc(len(messages))
                self._update_pause(buffer)
            self._update_buffered()

    async def _age_loop(self) -> None:
        tick = min(1.0, self.settings.archive_max_age_s / 4)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for buffer in self._buffers.values():
                if buffer.seal_if_older(now):
                    self._update_pause(buffer)

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(LAG_INTERVAL_S)
            await self._update_lag()

    async def _write_loop(self, buffer: PartitionBuffer) -> None:
        """Store a partition's sealed chunks in order, committing after each."""
        while True:
            await buffer.ready.wait()
            while buffer.sealed:
                chunk = buffer.sealed[0]
                await self._store(chunk)
                await self._commit(buffer, chunk.next_offset)
                buffer.sealed.popleft()
                self._update_pause(buffer)
                self._update_buffered()
            buffer.ready.clear()
            buffer.drained.set()

    async def _store(self, chunk: Chunk) -> None:
        """Put the chunk's object, retrying with exponential backoff until it is stored."""
        topic = chunk.tp.topic
        if chunk.nbytes >= THREAD_ENCODE_BYTES:
            data = await asyncio.to_thread(encode_object, chunk.lines)
        else:
            data = encode_object(chunk.lines)
        delay = self.backoff_initial_s
        attempt = 0
        failing_since: float | None = None
        while True:
            attempt += 1
            t0 = time.perf_counter()
            try:
                await self.store.put(chunk.key, data)
            except StorageError as exc:
                failing_since = failing_since or time.monotonic()
                self.metrics.failures.labels(topic).inc()
                self._set_failing(chunk.tp, True)
                wait = delay * random.uniform(0.8, 1.2)
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "archiver: storing %s (%s[%d]@%d..%d) failed, attempt %d; retrying "
                        "in %.1fs, the partition waits: %s",
                        chunk.key,
                        topic,
                        chunk.tp.partition,
                        chunk.first_offset,
                        chunk.last_offset,
                        attempt,
                        wait,
                        exc,
                    )
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            self.metrics.store_seconds.labels(topic).observe(time.perf_counter() - t0)
            break
        self.metrics.stored.labels(topic).inc(len(chunk))
        self.metrics.objects.labels(topic).inc()
        self.metrics.bytes.labels(topic).inc(len(data))
        self.metrics.last_store.set(time.time())
        self._set_failing(chunk.tp, False)
        if failing_since is not None:
            log.info(
                "archiver: stored %s after %d attempts (%.1fs of failures)",
                chunk.key,
                attempt,
                time.monotonic() - failing_since,
            )
        else:
            log.debug("archiver: stored %s (%d records)", chunk.key, len(chunk))

    async def _commit(self, buffer: PartitionBuffer, offset: int) -> None:
        consumer = self._consumer
        assert consumer is not None
        async with self._commit_lock:
            try:
                await consumer.commit({buffer.tp: offset})
            except KafkaError as exc:
                log.warning(
                    "archiver: %s[%d] is stored up to %d but the commit failed (%s); whoever "
                    "reads the partition next rewrites the same object",
                    buffer.tp.topic,
                    buffer.tp.partition,
                    offset,
                    exc,
                )
                return
        buffer.committed = offset
        self.metrics.commits.inc()

    # ---- bookkeeping -----------------------------------------------------------------------

    def _set_failing(self, tp: TopicPartition, failing: bool) -> None:
        if failing:
            self._failing.add(tp)
        else:
            self._failing.discard(tp)
        self.metrics.stalled.set(1 if self._failing else 0)

    def _update_pause(self, buffer: PartitionBuffer) -> None:
        consumer = self._consumer
        if consumer is None or buffer.tp not in self._buffers:
            return
        if not buffer.paused and len(buffer.sealed) >= MAX_SEALED:
            consumer.pause(buffer.tp)
            buffer.paused = True
        elif buffer.paused and len(buffer.sealed) < MAX_SEALED:
            consumer.resume(buffer.tp)
            buffer.paused = False
        self.metrics.paused.set(sum(1 for b in self._buffers.values() if b.paused))

    def _update_buffered(self) -> None:
        self.metrics.buffered.set(sum(b.buffered for b in self._buffers.values()))

    async def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._buffers:
            return
        tps = list(self._buffers)
        try:
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                buffer = self._buffers.get(tp)
                if buffer is not None and buffer.committed is None:
                    committed = await consumer.committed(tp)
                    if committed is None:
                        committed = (await consumer.beginning_offsets([tp]))[tp]
                    buffer.committed = committed
        except KafkaError as exc:
            log.debug("archiver: lag not updated: %s", exc)
            return
        lag = dict.fromkeys(self.topics, 0)
        for tp, end in ends.items():
            buffer = self._buffers.get(tp)
            if buffer is not None and buffer.committed is not None:
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - buffer.committed)
        for topic, value in lag.items():
            self.metrics.lag.labels(topic).set(value)

    # ---- rebalances ------------------------------------------------------------------------

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        s = self.settings
        for tp in assigned:
            if tp in self._buffers:
                continue
            buffer = PartitionBuffer(
                tp, s.archive_max_records, s.archive_max_bytes, s.archive_max_age_s
            )
            self._buffers[tp] = buffer
            writer = asyncio.create_task(
                self._write_loop(buffer), name=f"archiver_write_loop[{tp.topic}:{tp.partition}]"
            )
            writer.add_done_callback(self._task_done)
            self._writers[tp] = writer
        log.info("archiver: assigned %s", sorted(f"{t.topic}[{t.partition}]" for t in assigned))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        mine = [tp for tp in revoked if tp in self._buffers]
        await asyncio.gather(*(self._release(tp, REVOKE_DEADLINE_S) for tp in mine))
        if mine:
            log.info("archiver: revoked %s", sorted(f"{t.topic}[{t.partition}]" for t in mine))

    async def _release(self, tp: TopicPartition, deadline: float) -> None:
        """Store what a partition buffered (within ``deadline``), then forget the partition.

        Whatever is not stored by then is dropped uncommitted: the next owner reads it again
        from the committed offset and writes the same object names.
        """
        buffer = self._buffers.get(tp)
        if buffer is None:
            return
        buffer.seal()
        try:
            await asyncio.wait_for(buffer.drained.wait(), deadline)
        except TimeoutError:
            log.warning(
                "archiver: %s[%d]: %d records not stored within %.0fs, dropped uncommitted "
                "(re-read from offset %s by the next owner)",
                tp.topic,
                tp.partition,
                buffer.buffered,
                deadline,
                buffer.committed,
            )
        writer = self._writers.pop(tp, None)
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        self._buffers.pop(tp, None)
        self._set_failing(tp, False)
        self._update_buffered()


async def run_archiver(settings: Settings, store: ObjectStore | None = None) -> None:
    """``sluice run archiver``: run until SIGTERM/SIGINT, then shut down gracefully."""
    archiver = Archiver(settings, store)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, archiver.request_stop)
    try:
        await archiver.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main() -> None:
    """``python -m stages.archiver``: the archiver as its own process."""
    import sys

    from pipeline.aio import run_async
    from pipeline.config import load_settings
    from pipeline.errors import SluiceError

    setup_logging()
    try:
        run_async(run_archiver(load_settings()))
    except SluiceError as exc:
        log.error("archiver: %s", exc)
        sys.exit(3)


if __name__ == "__main__":
    main()
