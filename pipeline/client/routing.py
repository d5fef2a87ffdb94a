"""Answer routing, without Kafka: which waiting request an answer record belongs to.

``AnswerRouter`` keeps a waiter per request id. An answer record offered to it resolves its
request's waiter with a ``Reply`` (the decoded ``ChatCompletion`` or ``ErrorAnswer``, and the
Sluice facts from its headers: degraded, timings); the first answer wins. Later copies
(at-least-once redeliveries) are counted as duplicates, answers after their request timed out as
late, answers for requests this router never waited for as foreign; none of them is decoded.
``SluiceClient`` (``pipeline/client/client.py``) owns the Kafka side: it publishes the prompts
and feeds every answer record it reads to ``AnswerRouter.offer_record``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pipeline.errors import SluiceError
from schemas.errors import SchemaError
from schemas.headers import (
    SLUICE_DEGRADED,
    SLUICE_REQUEST_ID,
    SLUICE_TIMINGS,
    HeadersIn,
    header_value,
)
from schemas.messages import ChatCompletion, ErrorAnswer, Timings, decode, decode_answer

log = logging.getLogger(__name__)

Answer = ChatCompletion | ErrorAnswer
Outcome = Literal["delivered", "duplicate", "late", "foreign", "undecodable"]

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
                    degraded=parse_degraded(headers),
                    timings=parse_timings(header_value(headers, SLUICE_TIMINGS)),
                )
            )
        return outcome

    def offer_record(self, record: AnswerRecord) -> Outcome:
        """An answer record as consumed: routed by its ``sluice-request-id`` header."""
        headers = list(record.headers or ())
        request_id = header_value(headers, SLUICE_REQUEST_ID)
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        outcome = self.offer(request_id, record.value, headers, where)
        if outcome in ("duplicate", "late"):
            log.info("answer %s for request %s ignored: %s", where, request_id, outcome)
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
