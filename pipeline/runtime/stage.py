"""The contract between the stage loop and a stage: a handler plus what the loop needs to know.

A handler is pure: ``handle(batch) -> results`` with no Kafka inside (the loop consumes,
produces, commits, dead-letters and counts). ``handle`` may be a plain function (run in a
worker thread, so tokenizing a big batch does not block the event loop) or a coroutine
(for engines that are asynchronous themselves).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import orjson

from pipeline.errors import as_sluice_error
from pipeline.runtime.batch import Batch, Output, Record, Result
from schemas.headers import (
    SLUICE_ATTEMPT,
    SLUICE_DEGRADED,
    SLUICE_REQUEST_ID,
    TRACEPARENT,
    Headers,
    HeadersIn,
    header_value,
    make_headers,
    parse_attempt,
)
from schemas.messages import Message, encode
from schemas.streaming import SLUICE_DEADLINE, SLUICE_REPLY_TO, parse_deadline, parse_reply_to

log = logging.getLogger(__name__)

# Kafka's longest topic name: a longer reply-to cannot name a topic and is not carried on.
_MAX_TOPIC = 249


@dataclass(frozen=True)
class StageSpec:
    """Where a stage reads and writes, and how its work is cut."""

    name: str
    input_topic: str
    answers_topic: str
    # "partition": one task per partition-batch (cheap, in-order work);
    # "record": one task per record, finishing out of order (generation).
    unit: Literal["partition", "record"] = "partition"
    output_topics: tuple[str, ...] = ()
    # The batch lane (``<prefix>prompts.batch`` / ``….tokenized.batch``), read beside
    # ``input_topic``; the loop pauses its partitions while interactive work waits (see
    # ``pipeline/runtime/lanes.py``). Records of either go to ``<record.topic>.DLT``.
    batch_input_topic: str | None = None
    # Whether the loop answers records past their ``sluice-deadline`` as ``expired`` before
    # the handler sees them. Off for a stage whose work is cheap next to what came before it
    # (postprocess: a generation that finished in time is delivered, not thrown away).
    expires: bool = True

    @property
    def input_topics(self) -> tuple[str, ...]:
        """Every topic the stage reads: the interactive lane, then the batch lane if any."""
        if self.batch_input_topic is None:
            return (self.input_topic,)
        return (self.input_topic, self.batch_input_topic)


class Handler(Protocol):
    spec: StageSpec

    def handle(self, batch: Batch) -> list[Result] | Awaitable[list[Result]]:
        """One result per record of ``batch``, in the same order."""
        ...

    def fingerprint(self, record: Record) -> str | None:
        """Identity of the request for the response cache (None: never cached)."""
        ...

    def rebind(self, cached: Sequence[Output], record: Record) -> list[Output]:
        """Cached outputs re-addressed to ``record``'s request (ids, headers)."""
        ...

    async def warmup(self) -> None:
        """Load what is slow to load, run one short piece of work; before joining the group."""
        ...

    async def close(self) -> None: ...


def carried(headers: HeadersIn) -> dict[str, str]:
    """The request headers every output of a record carries on: ``sluice-deadline``,
    ``sluice-reply-to`` and ``sluice-attempt``, each re-written from its parsed value (so a
    malformed or oversized one from a hostile producer is dropped, not copied)."""
    out: dict[str, str] = {}
    deadline = parse_deadline(headers)
    if deadline is not None:
        out[SLUICE_DEADLINE] = str(deadline)
    reply = parse_reply_to(headers)
    if reply is not None and len(reply.topic) <= _MAX_TOPIC:
        out[SLUICE_REPLY_TO] = f"{reply.topic}:{reply.partition}"
    if header_value(headers, SLUICE_ATTEMPT) is not None:
        out[SLUICE_ATTEMPT] = str(parse_attempt(headers))
    return out


def isolate(batch: Batch, one: Callable[[Record], Result], *, stage: str) -> list[Result]:
    """``one`` applied to each record of ``batch``; an exception becomes that record's error
    (a fatal one propagates), so one bad record never fails its neighbours."""
    results: list[Result] = []
    for record in batch:
        try:
            results.append(one(record))
        except Exception as exc:  # that record's failure: dead-lettered by the loop, counted
            error = as_sluice_error(exc)
            if error.fatal:
                raise
            log.exception(
                "stage %s: %s request %s failed: %s",
                stage,
                record.where,
                header_value(record.headers, SLUICE_REQUEST_ID),
                error.reason,
            )
            results.append(Result(record, error=error))
    return results


def output_for(
    record: Record,
    topic: str,
    message: Message,
    *,
    stage: str,
    request_id: str,
    key: bytes | None,
    extra: dict[str, str] | None = None,
) -> Output:
    """A message produced because of ``record``: CloudEvents headers, the trace continued, the
    request's deadline, reply address and attempt carried on (see ``carried``)."""
    headers = make_headers(
        message.ce_type,
        stage,
        request_id,
        traceparent=header_value(record.headers, TRACEPARENT),
        extra={**carried(record.headers), **(extra or {})},
    )
    return Output(topic=topic, key=key, value=encode(message), headers=headers)


def rebind_ids(
    cached: Sequence[Output],
    record: Record,
    *,
    stage: str,
    request_id: str,
    conversation_id: str,
    key: bytes | None,
) -> list[Output]:
    """Default cache rebinding for internal messages with top-level ``id``/``conversation_id``."""
    out: list[Output] = []
    for o in cached:
        body = orjson.loads(o.value)
        if isinstance(body, dict):
            body["id"] = request_id
            body["conversation_id"] = conversation_id
        ce_type = header_value(o.headers, "ce_type") or "sluice.unknown"
        headers: Headers = make_headers(
            ce_type,
            stage,
            request_id,
            traceparent=header_value(record.headers, TRACEPARENT),
            extra=carried(record.headers),
        )
        headers.append((SLUICE_DEGRADED, b"true"))
        out.append(Output(topic=o.topic, key=key, value=orjson.dumps(body), headers=headers))
    return out
