"""Answer routing, without Kafka: which waiting request a reply-partition record belongs to.

``AnswerRouter`` keeps a waiter per request id. An answer record offered to it resolves its
request's waiter with a ``Reply`` (the decoded ``ChatCompletion`` or ``ErrorAnswer``, and the
Sluice facts from its headers: degraded, timings, attempt). Which answer stands is
``schemas.attempts``' rule, "a completion, or else the latest attempt": of the answers to one
request read in one poll, the standing one is delivered; an answer read after delivery that
would have stood (a completion after an error, say from ``sluice replay``) is counted as
``superseded`` and logged, since the caller already has the earlier one; other later copies
(at-least-once redeliveries) are duplicates, answers after the request timed out are late,
answers for requests this router never waited for are foreign; none of them is decoded.

Deltas (``sluice.delta``) go to the request's event queue when it was registered as a stream
(``expect(..., stream=True)``), in ``index`` order: a delta with an index already seen (a
redelivery) is dropped and counted; deltas for unknown or finished requests are counted as
stray and dropped, never an error. A stream's queue ends with its ``Reply``.
``SluiceClient`` (``pipeline/client/client.py``) owns the Kafka side: it publishes the prompts
and feeds every record of its reply partitions to ``AnswerRouter.offer_records``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pipeline.errors import SluiceError
from schemas.attempts import AnswerFacts, answer_facts, standing, supersedes
from schemas.errors import SchemaError
from schemas.headers import (
    CE_TYPE,
    SLUICE_DEGRADED,
    SLUICE_REQUEST_ID,
    SLUICE_TIMINGS,
    HeadersIn,
    header_value,
)
from schemas.messages import ChatCompletion, ErrorAnswer, Timings, decode, decode_answer
from schemas.streaming import CE_DELTA, DeltaMessage

log = logging.getLogger(__name__)

Answer = ChatCompletion | ErrorAnswer
Outcome = Literal["delivered", "duplicate", "superseded", "late", "foreign", "undecodable"]
DeltaOutcome = Literal["queued", "repeated", "stray", "undecodable"]

REMEMBER_ANSWERED = 65_536  # request ids kept after their answer, to tell duplicates apart


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
    attempt: int = 1

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


Event = DeltaMessage | Reply
"""What a stream's queue holds: its deltas in order, then its ``Reply`` (always last)."""


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


# --- reply parsing ----------------------------------------------------------------------------


class AnswerRecord(Protocol):
    """What the router reads of a consumed answers-topic record (an aiokafka record has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


def parse_timings(raw: str | None) -> Timings | None:
    """The ``sluice-timings`` header as ``Timings``; None when absent or unreadable."""
    if raw is None:
        return None
    try:
        return decode(Timings, raw.encode())
    except SchemaError:
        return None


def parse_degraded(headers: HeadersIn) -> bool:
    """Whether the answer says it was served degraded (``sluice-degraded: true``)."""
    return (header_value(headers, SLUICE_DEGRADED) or "").lower() == "true"


# --- matching answers to requests -------------------------------------------------------------


@dataclass(slots=True)
class RouterStats:
    delivered: int = 0
    duplicates: int = 0
    late: int = 0
    foreign: int = 0
    undecodable: int = 0
    timeouts: int = 0
    superseded: int = 0
    deltas: int = 0
    repeated_deltas: int = 0
    stray_deltas: int = 0


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Reply]
    started: float
    events: asyncio.Queue[Event] | None = None
    next_index: int = 0

    def resolve(self, reply: Reply) -> None:
        if not self.future.done():
            self.future.set_result(reply)
            if self.events is not None:
                self.events.put_nowait(reply)


class AnswerRouter:
    """Waiters by request id; answers offered to it resolve them (see the module docstring).

    Ids are remembered (bounded, oldest forgotten first) after they were answered or timed
    out, with the facts of the answer that stands, so a later copy is counted as a duplicate,
    superseding or late rather than as someone else's.
    """

    def __init__(self, remember: int = REMEMBER_ANSWERED) -> None:
        self._pending: dict[str, _Waiter] = {}
        self._finished: OrderedDict[str, AnswerFacts | None] = OrderedDict()  # None: timed out
        self._remember = remember
        self.stats = RouterStats()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._pending

    def expect(self, request_id: str, *, stream: bool = False) -> asyncio.Future[Reply]:
        """Register a waiter (on the running loop) before the request is published; with
        ``stream``, its deltas and then its reply are queued for :meth:`events`."""
        if request_id in self._pending:
            raise ValueError(f"request id {request_id!r} is already waiting for an answer")
        self._finished.pop(request_id, None)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        events: asyncio.Queue[Event] | None = asyncio.Queue() if stream else None
        self._pending[request_id] = _Waiter(future, time.monotonic(), events)
        return future

    def events(self, request_id: str) -> asyncio.Queue[Event]:
        """The event queue of a request registered with ``stream=True``."""
        waiter = self._pending.get(request_id)
        if waiter is None or waiter.events is None:
            raise KeyError(f"request {request_id!r} is not waiting as a stream")
        return waiter.events

    # ---- answers ------------------------------------------------------------------------------

    def offer(
        self,
        request_id: str | None,
        value: bytes | None,
        headers: HeadersIn,
        where: str = "?",
    ) -> Outcome:
        """An answer record: resolve its waiter, or say why it was not used."""
        facts = answer_facts(headers)
        if request_id is None or request_id not in self._pending:
            return self._not_waiting(request_id, facts)
        waiter = self._pending.pop(request_id)
        self._remember_id(request_id, facts)
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
        waiter.resolve(
            Reply(
                request_id=request_id,
                answer=answer,
                latency_s=time.monotonic() - waiter.started,
                degraded=parse_degraded(headers),
                timings=parse_timings(header_value(headers, SLUICE_TIMINGS)),
                attempt=facts.attempt,
            )
        )
        return outcome

    def _not_waiting(self, request_id: str | None, facts: AnswerFacts) -> Outcome:
        if request_id is None or request_id not in self._finished:
            self.stats.foreign += 1
            return "foreign"
        stood = self._finished[request_id]
        if stood is None:
            self.stats.late += 1
            return "late"
        if supersedes(facts, stood) and (facts.completion or facts.attempt > stood.attempt):
            self._finished[request_id] = facts
            self.stats.superseded += 1
            return "superseded"
        self.stats.duplicates += 1
        return "duplicate"

    def offer_record(self, record: AnswerRecord) -> Outcome | DeltaOutcome:
        """One record of a reply partition: a delta, or an answer (by ``sluice-request-id``)."""
        return self.offer_records([record])[0]

    def offer_records(self, records: Iterable[AnswerRecord]) -> list[Outcome | DeltaOutcome]:
        """Records of one poll, in order. Deltas are queued at once; of several answers to one
        waiting request, the one that stands (``schemas.attempts.standing``) is delivered and
        the others are counted as duplicates."""
        items = list(records)
        outcomes: list[Outcome | DeltaOutcome | None] = [None] * len(items)
        answers: dict[str, list[_Offered]] = {}
        for index, record in enumerate(items):
            headers = list(record.headers or ())
            if (header_value(headers, CE_TYPE) or "").strip() == CE_DELTA:
                outcomes[index] = self.offer_delta(record)
                continue
            request_id = header_value(headers, SLUICE_REQUEST_ID)
            if request_id is not None and request_id in self._pending:
                offered = _Offered(index, record, headers, answer_facts(headers))
                answers.setdefault(request_id, []).append(offered)
            else:
                outcomes[index] = self._offer_one(request_id, record, headers)
        for request_id, candidates in answers.items():
            stands = standing(candidates)
            assert stands is not None
            outcomes[stands.index] = self._offer_one(request_id, stands.record, stands.headers)
            for other in candidates:
                if other is not stands:
                    outcomes[other.index] = self._offer_one(request_id, other.record, other.headers)
        return [o if o is not None else "foreign" for o in outcomes]

    def _offer_one(
        self, request_id: str | None, record: AnswerRecord, headers: HeadersIn
    ) -> Outcome:
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        outcome = self.offer(request_id, record.value, headers, where)
        if outcome in ("duplicate", "late", "superseded"):
            log.info("answer %s for request %s ignored: %s", where, request_id, outcome)
        return outcome

    # ---- deltas -------------------------------------------------------------------------------

    def offer_delta(self, record: AnswerRecord) -> DeltaOutcome:
        """A delta record: queued for its streaming request, or counted and dropped."""
        headers = list(record.headers or ())
        request_id = header_value(headers, SLUICE_REQUEST_ID)
        waiter = self._pending.get(request_id) if request_id is not None else None
        if waiter is None or waiter.events is None:
            self.stats.stray_deltas += 1
            return "stray"
        try:
            delta = decode(DeltaMessage, record.value)
        except SchemaError as exc:
            where = f"{record.topic}[{record.partition}]@{record.offset}"
            log.warning("delta %s for request %s does not decode: %s", where, request_id, exc)
            self.stats.stray_deltas += 1
            return "undecodable"
        if delta.index < waiter.next_index:
            self.stats.repeated_deltas += 1
            return "repeated"
        if delta.index > waiter.next_index:
            log.warning(
                "request %s: delta %d arrived where %d was expected",
                request_id,
                delta.index,
                waiter.next_index,
            )
        waiter.next_index = delta.index + 1
        self.stats.deltas += 1
        waiter.events.put_nowait(delta)
        return "queued"

    # ---- ending -------------------------------------------------------------------------------

    def give_up(self, request_id: str, message: str | None = None) -> Reply | None:
        """Stop waiting for ``request_id`` (timeout): a timeout reply, or None if not waiting."""
        waiter = self._pending.pop(request_id, None)
        if waiter is None:
            return None
        self._remember_id(request_id, None)
        self.stats.timeouts += 1
        reply = Reply(
            request_id=request_id,
            answer=ErrorAnswer.timeout(message),
            latency_s=time.monotonic() - waiter.started,
            timed_out=True,
        )
        waiter.resolve(reply)
        return reply

    def discard(self, request_id: str) -> None:
        """Forget a waiter whose request was never published (or whose caller went away)."""
        waiter = self._pending.pop(request_id, None)
        if waiter is not None:
            self._remember_id(request_id, None)
            waiter.future.cancel()

    def fail_all(self, error: BaseException) -> None:
        """Every waiter gets ``error`` (the client is stopping)."""
        for request_id in list(self._pending):
            waiter = self._pending.pop(request_id)
            self._remember_id(request_id, None)
            if not waiter.future.done():
                waiter.future.set_exception(error)
            if waiter.events is not None:
                waiter.events.put_nowait(
                    Reply(request_id, ErrorAnswer.server_error(str(error)), 0.0, timed_out=True)
                )

    def _remember_id(self, request_id: str, facts: AnswerFacts | None) -> None:
        self._finished[request_id] = facts
        self._finished.move_to_end(request_id)
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Offered:
    """An answer record of one poll, with what the standing rule reads of it."""

    index: int
    record: AnswerRecord
    headers: HeadersIn
    facts: AnswerFacts

    @property
    def attempt(self) -> int:
        return self.facts.attempt

    @property
    def completion(self) -> bool:
        return self.facts.completion
