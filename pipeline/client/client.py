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

Outcomes are **result objects**: a request's ``Reply`` holds a ``ChatCompletion`` or an
``ErrorAnswer`` (an error answer from the pipeline, or a timeout made here, code ``timeout``).
``Reply.completion()`` turns an error into an ``AnswerError`` exception for callers who prefer
raising. Only failures of the client itself raise: ``PublishError`` when Kafka does not take a
prompt, ``ClientStopped`` for requests still waiting when the client stops, ``FatalError`` when
the answers topic is missing, ``ValueError`` for a request id that is already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline.admin import missing_topics
from pipeline.config import Settings
from pipeline.errors import FatalError, SluiceError, TransientError
from schemas.errors import SchemaError
from schemas.headers import (
    SLUICE_DEGRADED,
    SLUICE_REQUEST_ID,
    SLUICE_TIMINGS,
    HeadersIn,
    header_value,
    make_headers,
)
from schemas.messages import (
    CE_PROMPT,
    ChatCompletion,
    ErrorAnswer,
    PromptMessage,
    Timings,
    decode,
    decode_answer,
)

log = logging.getLogger(__name__)

Prompt = str | Mapping[str, Any] | PromptMessage
"""A user message (text), an OpenAI chat-completions request body, or a ``PromptMessage``."""
Answer = ChatCompletion | ErrorAnswer
Outcome = Literal["delivered", "duplicate", "late", "foreign", "undecodable"]

REMEMBER_ANSWERED = 65_536  # request ids kept after their answer, to tell duplicates apart
HEALTHY_POLL_S = 30.0  # the reply loop must have polled this recently to be healthy


# --- errors -----------------------------------------------------------------------------------


class AnswerError(SluiceError):
    """A request was answered with an error (or timed out); ``reply`` has the whole answer."""

    fault = False
    reason = "error-answer"

    def __init__(self, reply: Reply) -> None:
        assert isinstance(reply.answer, ErrorAnswer)
        super().__init__(reply.answer.error.message, reason=reply.answer.error.code)
        self.reply = reply
        self.error_answer = reply.answer
        self.status = reply.status

    def answer(self) -> ErrorAnswer:
        return self.error_answer


class PublishError(TransientError):
    """Kafka did not take the prompt (broker down, topic missing, timeout)."""

    reason = "publish-failed"


class ClientStopped(TransientError):
    """The client was stopped while the request was waiting for its answer."""

    fault = False
    reason = "client-stopped"


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """How one request ended: its answer, and the Sluice facts that came with it in headers."""

    request_id: str
    answer: Answer
    latency_s: float
    degraded: bool = False
    timed_out: bool = False
    timings: Timings | None = None

    @property
    def ok(self) -> bool:
        return isinstance(self.answer, ChatCompletion)

    @property
    def status(self) -> int:
        """The HTTP status an OpenAI server would answer with: 200, or the error's status."""
        return 200 if isinstance(self.answer, ChatCompletion) else self.answer.http_status()

    def completion(self) -> ChatCompletion:
        """The completion; raises ``AnswerError`` for an error answer or a timeout."""
        if isinstance(self.answer, ChatCompletion):
            return self.answer
        raise AnswerError(self)


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


# --- matching answers to requests (no Kafka) --------------------------------------------------


@dataclass(slots=True)
class RouterStats:
    delivered: int = 0
    duplicates: int = 0
    late: int = 0
    foreign: int = 0
    undecodable: int = 0
    timeouts: int = 0


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Reply]
    started: float


class AnswerRouter:
    """Waiters by request id; answers offered to it resolve them, first answer wins.

    Ids are remembered (bounded, oldest forgotten first) after they were answered or timed
    out, so a later copy is counted as a duplicate or as late rather than as someone else's.
    """

    def __init__(self, remember: int = REMEMBER_ANSWERED) -> None:
        self._pending: dict[str, _Waiter] = {}
        self._finished: OrderedDict[str, bool] = OrderedDict()  # id -> timed out
        self._remember = remember
        self.stats = RouterStats()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._pending

    def expect(self, request_id: str) -> asyncio.Future[Reply]:
        """Register a waiter (on the running loop) before the request is published."""
        if request_id in self._pending:
            raise ValueError(f"request id {request_id!r} is already waiting for an answer")
        self._finished.pop(request_id, None)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Waiter(future, time.monotonic())
        return future

    def offer(
        self, request_id: str | None, value: bytes | None, headers: HeadersIn, where: str = "?"
    ) -> Outcome:
        """An answer record: resolve its waiter, or say why it was not used."""
        if request_id is None or request_id not in self._pending:
            if request_id is not None and request_id in self._finished:
                late = self._finished[request_id]
                if late:
                    self.stats.late += 1
                else:
                    self.stats.duplicates += 1
                return "late" if late else "duplicate"
            self.stats.foreign += 1
            return "foreign"
        waiter = self._pending.pop(request_id)
        self._remember_id(request_id, timed_out=False)
        outcome: Outcome = "delivered"
        try:
            answer: Answer = decode_answer(value)
        except SchemaError as exc:
            log.error("answer %s for request %s does not decode: %s", where, request_id, exc)
            self.stats.undecodable += 1
            answer = ErrorAnswer.server_error("The answer to this request could not be decoded.")
            outcome = "undecodable"
        else:
            self.stats.delivered += 1
        if not waiter.future.done():
            waiter.future.set_result(
                Reply(
                    request_id=request_id,
                    answer=answer,
                    latency_s=time.monotonic() - waiter.started,
                    degraded=(header_value(headers, SLUICE_DEGRADED) or "").lower() == "true",
                    timings=_timings(header_value(headers, SLUICE_TIMINGS)),
                )
            )
        return outcome

    def give_up(self, request_id: str) -> Reply | None:
        """Stop waiting for ``request_id`` (timeout): a timeout reply, or None if not waiting."""
        waiter = self._pending.pop(request_id, None)
        if waiter is None:
            return None
        self._remember_id(request_id, timed_out=True)
        self.stats.timeouts += 1
        reply = Reply(
            request_id=request_id,
            answer=ErrorAnswer.timeout(),
            latency_s=time.monotonic() - waiter.started,
            timed_out=True,
        )
        if not waiter.future.done():
            waiter.future.set_result(reply)
        return reply

    def discard(self, request_id: str) -> None:
        """Forget a waiter whose request was never published (or whose caller went away)."""
        waiter = self._pending.pop(request_id, None)
        if waiter is not None:
            self._remember_id(request_id, timed_out=True)
            waiter.future.cancel()

    def fail_all(self, error: BaseException) -> None:
        """Every waiter gets ``error`` (the client is stopping)."""
        for request_id in list(self._pending):
            waiter = self._pending.pop(request_id)
            self._remember_id(request_id, timed_out=True)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _remember_id(self, request_id: str, *, timed_out: bool) -> None:
        self._finished[request_id] = timed_out
        self._finished.move_to_end(request_id)
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)


def _timings(raw: str | None) -> Timings | None:
    if raw is None:
        return None
    try:
        return decode(Timings, raw.encode())
    except SchemaError:
        return None


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
            for tp, records in batches.items():
                for rec in records:
                    headers = list(rec.headers or ())
                    rid = header_value(headers, SLUICE_REQUEST_ID)
                    where = f"{tp.topic}[{tp.partition}]@{rec.offset}"
                    outcome = self.router.offer(rid, rec.value, headers, where)
                    if outcome in ("duplicate", "late"):
                        log.info("answer %s for request %s ignored: %s", where, rid, outcome)


__all__ = [
    "Answer",
    "AnswerError",
    "AnswerRouter",
    "ClientStopped",
    "Prepared",
    "Prompt",
    "PublishError",
    "Reply",
    "RouterStats",
    "SluiceClient",
    "prepare",
]
