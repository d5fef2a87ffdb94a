"""The producer's side of Sluice: publish prompts, get each one's answer back by request id.

``SluiceClient`` is what a producer uses instead of learning Kafka, and what the HTTP gateway
(``stages/gateway/``) is built on, so both share one answer-waiting mechanism:

- Prompts go to the prompts topic on an idempotent ``acks=all`` producer, keyed by conversation
  id (the request id when there is none), with the request id in the body's ``id`` and in the
  ``sluice-request-id`` header.
- Answers are read from the answers topic by a consumer with **no group**: it is assigned every
  partition and positioned at the end *before* anything is published, so no answer to one of
  this client's prompts can be missed, and no other consumer's offsets are touched. (Partitions
  added to the topic later are picked up at their end once metadata shows them.) Every
  client therefore reads every answer; it decodes only those whose ``sluice-request-id`` it is
  waiting for and ignores the rest.
- The first answer for a request wins; later copies (at-least-once redeliveries) are counted as
  duplicates and dropped, as are answers that arrive after their request timed out (late).

The matching is ``AnswerRouter`` (``pipeline/client/routing.py``, no Kafka); this module is the
Kafka side. Outcomes are **result objects**: a request's ``Reply`` holds a ``ChatCompletion`` or
an ``ErrorAnswer`` (an error answer from the pipeline, or a timeout made here, code
``timeout``). ``Reply.completion()`` turns an error into an ``AnswerError`` exception for
callers who prefer raising. Only failures of the client itself raise: ``PublishError`` when
Kafka does not take a prompt, ``ClientStopped`` for requests still waiting when the client
stops, ``FatalError`` when the answers topic is missing, ``ValueError`` for a request id that is
already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline.admin import missing_topics
from pipeline.client.routing import AnswerRouter, Reply
from pipeline.config import Settings
from pipeline.errors import FatalError, TransientError
from schemas.headers import make_headers
from schemas.messages import CE_PROMPT, PromptMessage

log = logging.getLogger(__name__)

Prompt = str | Mapping[str, Any] | PromptMessage
"""A user message (text), an OpenAI chat-completions request body, or a ``PromptMessage``."""

HEALTHY_POLL_S = 30.0  # the reply loop must have polled this recently to be healthy


# --- errors -----------------------------------------------------------------------------------


class PublishError(TransientError):
    """Kafka did not take the prompt (broker down, topic missing, timeout)."""

    reason = "publish-failed"


class ClientStopped(TransientError):
    """The client was stopped while the request was waiting for its answer."""

    fault = False
    reason = "client-stopped"


# --- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """A prompt as it goes on the prompts topic."""

    request_id: str
    key: bytes
    value: bytes


def prepare(prompt: Prompt, request_id: str | None = None) -> Prepared:
    """The record for ``prompt``: its body with ``id`` set to the request id.

    The request id is ``request_id`` when given, else the body's own ``id``, else a new uuid4.
    The key is the body's ``conversation_id``, else the request id. The body is not validated
    here (preprocess does that and answers with an error); unknown fields are kept.
    """
    body: dict[str, Any]
    if isinstance(prompt, str):
        body = {"messages": [{"role": "user", "content": prompt}]}
    elif isinstance(prompt, PromptMessage):
        body = prompt.model_dump(mode="json", exclude_none=True)
    else:
        body = dict(prompt)
    own = body.get("id")
    rid = request_id or (own if isinstance(own, str) and own else None) or str(uuid.uuid4())
    body["id"] = rid
    conversation = body.get("conversation_id")
    key = conversation if isinstance(conversation, str) and conversation else rid
    return Prepared(rid, key.encode(), orjson.dumps(body))


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
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._polled_at = 0.0
        self._loop_error: str | None = None

    async def __aenter__(self) -> SluiceClient:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the producer, assign and position the reply consumer, start the reply loop."""
        common = self.settings.kafka_common()
        topic = self.settings.topics.answers
        if await missing_topics(self.settings, [topic]):
            raise FatalError(
                f"the answers topic {topic} is missing (create it with: sluice topics create)"
            )
        # No group: every partition is assigned (and new ones as metadata shows them)
        consumer = AIOKafkaConsumer(
            topic,
            **common,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level="read_committed",
        )
        self._consumer = consumer
        try:
            await consumer.start()
            assigned = sorted(consumer.assignment(), key=lambda tp: tp.partition)
            await consumer.seek_to_end(*assigned)
            for tp in assigned:  # resolve every position now, before anything is published
                await consumer.position(tp)
            producer = AIOKafkaProducer(**common, acks="all", enable_idempotence=True, linger_ms=2)
            await producer.start()
            self._producer = producer
        except BaseException:
            await self.stop()
            raise
        self._polled_at = time.monotonic()
        self._reply_task = asyncio.create_task(self._reply_loop(), name="reply_loop")
        log.info(
            "client %s: reading answers from %s (%d partitions), publishing to %s",
            self.source,
            topic,
            len(assigned),
            self.settings.topics.prompts,
        )

    async def stop(self) -> None:
        """Stop the reply loop; requests still waiting raise ``ClientStopped``."""
        if self._reply_task is not None:
            self._reply_task.cancel()
            await asyncio.gather(self._reply_task, return_exceptions=True)
            self._reply_task = None
        self.router.fail_all(ClientStopped("the client stopped before the answer came"))
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def ready(self) -> bool:
        """The producer is started and the reply consumer is positioned and polling."""
        return (
            self._producer is not None
            and self._reply_task is not None
            and not self._reply_task.done()
        )

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
        """Publish one prompt and wait for its answer (or the timeout, as an error reply)."""
        prepared = prompt if isinstance(prompt, Prepared) else prepare(prompt, request_id)
        future = self.router.expect(prepared.request_id)
        try:
            await self._publish([prepared])
            return await self._wait(prepared.request_id, future, timeout_s)
        finally:
            self.router.discard(prepared.request_id)

    async def infer(
        self,
        prompts: Iterable[Prompt],
        *,
        batch_size: int = 64,
        max_in_flight: int | None = None,
        timeout_s: float | None = None,
        on_reply: Callable[[int, Reply], None] | None = None,
    ) -> list[Reply]:
        """Every prompt's reply, in input order.

        Prompts are published ``batch_size`` at a time; a batch goes out once fewer than
        ``max_in_flight`` (default ``8 * batch_size``) requests are waiting, so each request's
        ``timeout_s`` (from its publication; default ``settings.request_timeout_s``) measures
        the pipeline, not a queue in this client. ``on_reply(index, reply)`` is called as each
        reply arrives (e.g. for a progress bar).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        prepared = [prepare(p) for p in prompts]
        ids = [p.request_id for p in prepared]
        if len(set(ids)) != len(ids) or any(rid in self.router for rid in ids):
            raise ValueError("request ids must be unique and not already in flight")
        window = asyncio.Semaphore(max(max_in_flight or 8 * batch_size, batch_size))
        replies: list[Reply | None] = [None] * len(prepared)

        async def wait_one(index: int, future: asyncio.Future[Reply]) -> None:
            try:
                reply = await self._wait(ids[index], future, timeout_s)
            finally:
                self.router.discard(ids[index])
                window.release()
            replies[index] = reply
            if on_reply is not None:
                on_reply(index, reply)

        async with asyncio.TaskGroup() as group:
            for start in range(0, len(prepared), batch_size):
                batch = prepared[start : start + batch_size]
                for _ in batch:
                    await window.acquire()
                futures = [self.router.expect(p.request_id) for p in batch]
                try:
                    await self._publish(batch)
                except BaseException:
                    for p in batch:
                        self.router.discard(p.request_id)
                    raise
                for offset, future in enumerate(futures):
                    index = start + offset
                    group.create_task(wait_one(index, future), name=f"answer_{index}")
        done = [r for r in replies if r is not None]
        assert len(done) == len(replies), "every request ends with a reply"
        return done

    async def _wait(
        self, request_id: str, future: asyncio.Future[Reply], timeout_s: float | None
    ) -> Reply:
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            reply = self.router.give_up(request_id)
            if reply is not None:
                return reply
            return future.result()  # answered in the same instant

    async def _publish(self, batch: Sequence[Prepared]) -> None:
        producer = self._producer
        if producer is None:
            raise PublishError("the client is not started")
        topic = self.settings.topics.prompts
        try:
            acks = [
                await producer.send(
                    topic,
                    p.value,
                    key=p.key,
                    headers=make_headers(CE_PROMPT, self.source, p.request_id),
                )
                for p in batch
            ]
            await asyncio.gather(*acks)
        except KafkaError as exc:
            raise PublishError(f"publishing to {topic} failed: {type(exc).__name__}") from exc
        self.published += len(batch)

    # ---- the reply loop -----------------------------------------------------------------------

    async def _reply_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            except KafkaError as exc:
                self._loop_error = f"{type(exc).__name__}: {exc}"
                log.warning("client %s: reading answers failed: %s", self.source, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            self._loop_error = None
            self._polled_at = time.monotonic()
            for records in batches.values():
                for record in records:
                    self.router.offer_record(record)


__all__ = ["ClientStopped", "Prepared", "Prompt", "PublishError", "SluiceClient", "prepare"]
