"""The producer's side of Sluice: publish prompts, get each one's answer (and deltas) back.

``SluiceClient`` is what a producer uses instead of learning Kafka, and what the HTTP gateway
(``stages/gateway/``) is built on, so both share one answer-waiting mechanism:

- Prompts go to the prompts topic on an idempotent ``acks=all`` producer, keyed by conversation
  id (the request id when there is none), with the request id in the body's ``id`` and in the
  ``sluice-request-id`` header, the request's deadline (``sluice-deadline``: now + its timeout)
  and this client's reply address (``sluice-reply-to``).
- Answers come back on the client's own partitions of the replies topic
  (``pipeline/client/replies.py`` says which): a copy of every answer to its prompts, and the
  text deltas of the requests it streams. It reads those partitions with **no group**,
  positioned at their end *before* anything is published, so nothing is missed; it reads no
  other asker's replies and not the answers topic, which stays keyed by conversation for
  downstream consumers.
- Publishing retries retriable Kafka errors until the request's deadline
  (``pipeline/client/publish.py``), so a broker outage shorter than the timeout costs no
  request; ``ready`` is False while the broker is unreachable.
- A request that times out, a stream left before its end and :meth:`SluiceClient.cancel`
  publish a cancel on the control topic, so compute stops generating what nobody waits for.
- Of several answers to one request, the one that stands is kept (``schemas.attempts``).

The matching is ``AnswerRouter`` (``pipeline/client/routing.py``, no Kafka); streams are
``ReplyStream`` (``pipeline/client/stream.py``); this module is the Kafka side. Outcomes are
**result objects**: a request's ``Reply`` holds a ``ChatCompletion`` or an ``ErrorAnswer`` (an
error answer from the pipeline, a refusal made here for a prompt that breaks the schema, or a
timeout made here, code ``timeout``). ``Reply.completion()`` turns an error into an
``AnswerError`` exception for callers who prefer raising. Only failures of the client itself
raise: ``PublishError`` when Kafka refuses a prompt for good, ``ClientStopped`` for requests
still waiting when the client stops, ``FatalError`` when a topic is missing, ``ValueError``
for a request id that is already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber, ProducerClosed

from pipeline.admin import missing_topics, partition_count
from pipeline.client.many import infer_each
from pipeline.client.prompts import Prepared, Prompt, prepare, refusal
from pipeline.client.publish import (
    ProducerReplaced,
    PublishError,
    PublishTimeout,
    publish_until,
)
from pipeline.client.replies import choose_reply_partitions
from pipeline.client.routing import AnswerRouter, Reply
from pipeline.client.stream import ReplyStream
from pipeline.config import Settings
from pipeline.errors import FatalError, TransientError
from schemas.headers import Headers, make_headers
from schemas.messages import CE_PROMPT, encode
from schemas.streaming import CE_CANCEL, CancelMessage, ReplyTo, deadline_header, now_ms

log = logging.getLogger(__name__)

HEALTHY_POLL_S = 30.0  # the reply loop must have polled this recently to be healthy
BROKER_CHECK_S = 2.0  # how often the broker's reachability is checked
BROKER_CHECK_TIMEOUT_S = 5.0
CANCEL_TIMEOUT_S = 10.0  # how long a cancel may take to publish


# --- errors -----------------------------------------------------------------------------------


class ClientStopped(TransientError):
    """The client was stopped while the request was waiting for its answer."""

    fault = False
    reason = "client-stopped"


# --- the client -------------------------------------------------------------------------------


class SluiceClient:
    """Publish prompts and await their answers; ``async with SluiceClient(settings) as c:``."""

    def __init__(
        self, settings: Settings, *, source: str = "client", timeout_s: float | None = None
    ) -> None:
        self.settings = settings
        self.source = source
        self.timeout_s = timeout_s if timeout_s is not None else settings.request_timeout_s
        self.router = AnswerRouter()
        self.published = 0
        self.publish_retries = 0
        self.cancels = 0
        self.reply_partitions: list[int] = []
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._broker_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._polled_at = 0.0
        self._loop_error: str | None = None
        self._broker_ok = False
        self._broker_detail = "not checked yet"
        self._producer_lock = asyncio.Lock()
        self.producer_replacements = 0

    async def __aenter__(self) -> SluiceClient:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the producer, assign and position the reply consumer, start the loops."""
        topics = self.settings.topics
        count = await partition_count(self.settings, topics.replies)
        missing = await missing_topics(self.settings, [topics.control])
        if count == 0 or missing:
            absent = ", ".join([topics.replies] * (count == 0) + missing)
            raise FatalError(f"topics missing: {absent} (create them with: sluice topics create)")
        try:
            mine = choose_reply_partitions(
                self.settings.reply_partitions, self.settings.instance_id, count
            )
        except ValueError as exc:
            raise FatalError(f"SLUICE_REPLY_PARTITIONS: {exc}") from exc
        common = self.settings.kafka_common()
        consumer = AIOKafkaConsumer(
            **common, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
        )
        self._consumer = consumer
        try:
            await consumer.start()
            assigned = [TopicPartition(topics.replies, p) for p in mine]
            consumer.assign(assigned)
            await consumer.seek_to_end(*assigned)
            for tp in assigned:  # resolve every position now, before anything is published
                await consumer.position(tp)
            self._producer = await self._new_producer()
        except BaseException:
            await self.stop()
            raise
        self.reply_partitions = mine
        self._polled_at = time.monotonic()
        self._broker_ok, self._broker_detail = True, "connected at start"
        self._reply_task = asyncio.create_task(self._reply_loop(), name="reply_loop")
        self._broker_task = asyncio.create_task(self._broker_loop(), name="broker_loop")
        log.info(
            "client %s: reading replies from %s partitions %s, publishing to %s",
            self.source,
            topics.replies,
            mine,
            topics.prompts,
        )

    async def stop(self) -> None:
        """Stop the loops; requests still waiting raise ``ClientStopped``; cancels being
        published get a moment to finish."""
        for task in (self._reply_task, self._broker_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._reply_task = self._broker_task = None
        self.router.fail_all(ClientStopped("the client stopped before the answer came"))
        if self._background:
            await asyncio.wait(set(self._background), timeout=CANCEL_TIMEOUT_S)
            for task in set(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def ready(self) -> bool:
        """Started, the reply consumer positioned and polling, and the broker reachable."""
        return (
            self._producer is not None
            and self._reply_task is not None
            and not self._reply_task.done()
            and self._broker_ok
        )

    def readiness(self) -> tuple[bool, str]:
        """``ready``, and why not."""
        if self._producer is None or self._reply_task is None:
            return False, "starting"
        if self._reply_task.done():
            return False, "the reply loop stopped"
        if not self._broker_ok:
            return False, f"Kafka unreachable: {self._broker_detail}"
        return True, "producer and reply consumer started, broker reachable"

    def healthy(self) -> tuple[bool, str]:
        if self._reply_task is None:
            return False, "not started"
        if self._reply_task.done():
            return False, f"reply loop stopped: {self._loop_error or 'cancelled'}"
        idle = time.monotonic() - self._polled_at
        if idle > HEALTHY_POLL_S:
            return False, f"reply loop has not polled for {idle:.0f}s"
        return True, f"{len(self.router)} requests waiting"

    # ---- requests -----------------------------------------------------------------------------

    async def request(
        self,
        prompt: Prompt | Prepared,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Publish one prompt and wait for its answer (or the timeout, as an error reply).

        A ``Prepared`` prompt is published as it is; any other is first checked against the
        schema and refused here (an error reply, nothing published) when preprocess would.
        """
        if isinstance(prompt, Prepared):
            prepared = prompt
        else:
            prepared = prepare(prompt, request_id)
            refused = refusal(prepared)
            if refused is not None:
                return refused
        deadline = self._deadline(timeout_s)
        future = self.router.expect(prepared.request_id)
        try:
            if not await self.publish_prepared([prepared], deadline):
                return await future
            return await self._wait(prepared.request_id, future, deadline)
        finally:
            self.router.discard(prepared.request_id)

    def stream(
        self,
        prompt: Prompt | Prepared,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ReplyStream:
        """A request whose deltas are read as they come: ``async with client.stream(p) as s:
        async for delta in s: ...``, then ``s.reply``. Leaving the block before the answer
        cancels the request."""
        prepared = prompt if isinstance(prompt, Prepared) else prepare(prompt, request_id)
        refused = None if isinstance(prompt, Prepared) else refusal(prepared)
        return ReplyStream(self, prepared, self._deadline(timeout_s), refused)

    async def infer(
        self,
        prompts: Iterable[Prompt],
        *,
        batch_size: int = 64,
        max_in_flight: int | None = None,
        timeout_s: float | None = None,
        on_reply: Callable[[int, Reply], None] | None = None,
    ) -> list[Reply]:
        """Every prompt's reply, in input order (``pipeline.client.many.infer_each`` sends
        them, ``batch_size`` at a time within ``max_in_flight``; use it directly to handle
        replies as they come without holding them). ``on_reply(index, reply)`` is called as
        each reply arrives (e.g. for a progress bar)."""
        prepared = [prepare(p) for p in prompts]
        ids = [p.request_id for p in prepared]
        if len(set(ids)) != len(ids) or any(rid in self.router for rid in ids):
            raise ValueError("request ids must be unique and not already in flight")
        replies: list[Reply | None] = [None] * len(prepared)

        def done(index: int, reply: Reply) -> None:
            replies[index] = reply
            if on_reply is not None:
                on_reply(index, reply)

        await infer_each(
            self,
            enumerate(prepared),
            done,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
        )
        finished = [r for r in replies if r is not None]
        assert len(finished) == len(replies), "every request ends with a reply"
        return finished

    async def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Ask compute to stop serving ``request_id`` (a cancel on the control topic); its
        answer, if it is still being served, becomes a ``cancelled`` error answer."""
        if self._producer is None:
            raise PublishError("the client is not started")
        value = encode(CancelMessage(id=request_id, reason=reason))
        headers = make_headers(CE_CANCEL, self.source, request_id)
        topic = self.settings.topics.control

        async def attempt() -> None:
            await self._send(topic, [(request_id.encode(), value, headers)])

        loop = asyncio.get_running_loop()
        await publish_until(
            attempt,
            loop.time() + CANCEL_TIMEOUT_S,
            what=f"the cancel of request {request_id}",
            backoff_max_s=self.settings.publish_backoff_max_s,
        )
        self.cancels += 1
        log.info("client %s: cancelled request %s (%s)", self.source, request_id, reason)

    def cancel_soon(self, request_id: str, reason: str) -> None:
        """:meth:`cancel` in the background (from a callback or a task being cancelled);
        ``stop`` waits for it. A cancel that cannot be published is logged, not raised."""
        if self._producer is None:
            return
        task = asyncio.create_task(self._cancel_quietly(request_id, reason), name="cancel")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_quietly(self, request_id: str, reason: str) -> None:
        try:
            await self.cancel(request_id, reason)
        except (PublishError, PublishTimeout) as exc:
            log.warning("client %s: cancel of %s not published: %s", self.source, request_id, exc)

    # ---- waiting and publishing ---------------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float:
        """The request's deadline on the event loop's clock."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        return asyncio.get_running_loop().time() + limit

    async def _wait(self, request_id: str, future: asyncio.Future[Reply], deadline: float) -> Reply:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, remaining))
        except TimeoutError:
            reply = self.router.give_up(request_id)
            if reply is None:
                return future.result()  # answered in the same instant
            self.cancel_soon(request_id, "timeout")
            return reply

    async def _new_producer(self) -> AIOKafkaProducer:
        """A started idempotent ``acks=all`` producer."""
        producer = AIOKafkaProducer(
            **self.settings.kafka_common(), acks="all", enable_idempotence=True, linger_ms=2
        )
        await producer.start()
        return producer

    async def _send(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes, Headers]]
    ) -> None:
        """Send ``records`` (key, value, headers) and await every acknowledgement.

        aiokafka's idempotent producer cannot outlive a broker outage long enough to expire its
        batches: once the broker is back its sender fails with ``OutOfOrderSequenceNumber``, and
        that producer then fails every later send with the same error, for ever. Such a producer
        is replaced by a new one (a new producer id) and the send is retried as any retriable
        error is, until the request's deadline; sends still waiting on the dead producer fail
        with ``ProducerClosed`` when it is stopped, and are retried on the new one too.
        """
        producer = self._producer
        if producer is None:
            raise PublishError("the client is not started")
        try:
            acks = [
                await producer.send(topic, value, key=key, headers=headers)
                for key, value, headers in records
            ]
            await asyncio.gather(*acks)
        except (OutOfOrderSequenceNumber, ProducerClosed) as exc:
            if isinstance(exc, ProducerClosed) and self._producer is producer:
                raise  # closed by stop(), not replaced: the client is stopping
            await self._replace_producer(producer)  # a no-op when another send replaced it
            raise ProducerReplaced(f"the producer's sender died ({exc!r}); replaced") from exc

    async def _replace_producer(self, dead: AIOKafkaProducer) -> None:
        async with self._producer_lock:
            if id(self._producer) != id(dead):  # another request replaced it already
                return
            fresh = await self._new_producer()  # a KafkaError here is retried by the caller
            self._producer = fresh
            self.producer_replacements += 1
            log.warning("client %s: producer replaced after its sender died", self.source)
        try:
            await dead.stop()
        except KafkaError as exc:
            log.debug("client %s: stopping the dead producer: %s", self.source, exc)

    async def publish_prepared(self, batch: Sequence[Prepared], deadline: float) -> bool:
        """Publish ``batch`` (``deadline`` on the loop's clock); True once Kafka has it. When
        the deadline passes first, every request of the batch is given up (a timeout reply
        that says so) and False returned."""
        try:
            await self._publish(batch, deadline)
        except PublishTimeout as exc:
            log.error("client %s: %d prompts not published: %s", self.source, len(batch), exc)
            message = "The request could not be queued before its deadline: Kafka is unreachable."
            for p in batch:
                self.router.give_up(p.request_id, message)
            return False
        return True

    async def _publish(self, batch: Sequence[Prepared], deadline: float) -> None:
        if self._producer is None:
            raise PublishError("the client is not started")
        topic = self.settings.topics.prompts
        wall_deadline_ms = now_ms() + int((deadline - asyncio.get_running_loop().time()) * 1000)
        extra: Headers = [deadline_header(wall_deadline_ms)]
        if self.reply_partitions:
            address = ReplyTo(self.settings.topics.replies, self.reply_partitions[0])
            extra.append(address.header())
        records = [
            (p.key, p.value, [*make_headers(CE_PROMPT, self.source, p.request_id), *extra])
            for p in batch
        ]

        async def attempt() -> None:
            await self._send(topic, records)

        def retrying(exc: KafkaError) -> None:
            self.publish_retries += 1
            self._broker_ok, self._broker_detail = False, type(exc).__name__

        what = f"{len(batch)} prompt(s) to {topic}"
        await publish_until(
            attempt,
            deadline,
            what=what,
            backoff_max_s=self.settings.publish_backoff_max_s,
            on_retry=retrying,
        )
        self.published += len(batch)

    # ---- the loops ----------------------------------------------------------------------------

    async def _reply_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            except KafkaError as exc:
                self._loop_error = f"{type(exc).__name__}: {exc}"
                log.warning("client %s: reading replies failed: %s", self.source, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            self._loop_error = None
            self._polled_at = time.monotonic()
            for records in batches.values():
                self.router.offer_records(records)

    async def _broker_loop(self) -> None:
        """Whether the broker answers a metadata request, every ``BROKER_CHECK_S``."""
        producer = self._producer
        assert producer is not None
        while True:
            await asyncio.sleep(BROKER_CHECK_S)
            try:
                ok = await asyncio.wait_for(
                    producer.client.force_metadata_update(), BROKER_CHECK_TIMEOUT_S
                )
            except TimeoutError:
                ok = False
            if ok != self._broker_ok:
                level = logging.INFO if ok else logging.WARNING
                log.log(
                    level,
                    "client %s: Kafka %s",
                    self.source,
                    "reachable again" if ok else "unreachable",
                )
            self._broker_ok = bool(ok)
            self._broker_detail = "metadata refreshed" if ok else "no metadata from any broker"


__all__ = ["ClientStopped", "SluiceClient"]
