"""Token streaming, compute side: a request's text deltas, sent to its reply partition.

While a request with a ``sluice-reply-to`` header generates, the engine tells its
:class:`DeltaStream` the tokens so far (as often as ``StreamPolicy`` allows: once per
``SLUICE_DELTA_INTERVAL_MS`` or per ``SLUICE_DELTA_TOKENS`` new tokens, whichever first). The
stream decodes them with the model's tokenizer exactly as postprocess decodes the final answer,
cuts at the earliest stop string as postprocess does, and sends only text that cannot change
any more: nothing at or past a stop string, no tail that could still grow into one, no
incomplete UTF-8 character and no trailing whitespace (a tokenizer's clean-up may still fold it
into the next token). So the concatenated deltas equal the final answer's content exactly; the
last delta carries the rest of it, ``finish_reason`` and ``usage``.

Deltas are best-effort side outputs, not part of the record's at-least-once outputs: the
:class:`DeltaPublisher` sends them with a producer of its own (``acks=1``, no idempotence, never
transactional, so the stage's producer and its exactly-once mode are untouched), from a bounded
backlog by one ``_send_loop`` (so one request's deltas stay in order) that never waits for an
acknowledgement. A delta that cannot be queued is not lost: its text goes with the next one of
that request. A failed send is counted; it never fails the record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter

from pipeline.config import Settings
from schemas.answers import Usage
from schemas.headers import TRACEPARENT, Headers, HeadersIn, header_value, make_headers
from schemas.messages import encode
from schemas.streaming import DeltaMessage, ReplyTo
from stages.postprocess import apply_stop
from stages.text import TextModel

log = logging.getLogger(__name__)

STAGE = "compute"
BACKLOG = 10_000  # deltas queued for sending, all requests together
SEND_TIMEOUT_S = 2.0  # a send that cannot even be queued by the producer (unknown topic)


def stable_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` (a decoding of a generation so far) is final: not a trailing
    incomplete character (U+FFFD, its other bytes still to come), nothing from the earliest stop
    string on, no tail that the text to come could grow into a stop string, and no trailing
    whitespace."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    known = text[:end]
    for stop in stops:
        if not stop:
            continue
        at = known.find(stop)
        if at >= 0:
            end = min(end, at)
        for k in range(min(len(stop) - 1, len(known)), 0, -1):  # longest partial match first
            if known.endswith(stop[:k]):
                end = min(end, len(known) - k)
                break
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


class DeltaText:
    """One request's text, sent piece by piece: what is new and final since the last piece."""

    def __init__(self, text: TextModel, stops: Sequence[str]) -> None:
        self.text = text
        self.stops = list(stops)
        self.sent = ""
        self.diverged = False  # a later decoding changed text already sent: no more pieces

    def more(self, tokens: list[int]) -> str:
        """The final text after what was sent, for ``tokens`` so far ('' when none); call
        ``took`` once it is sent."""
        if self.diverged:
            return ""
        decoded = self.text.decode(tokens)
        safe = decoded[: stable_end(decoded, self.stops)]
        if len(safe) <= len(self.sent):
            return ""
        if not safe.startswith(self.sent):
            self.diverged = True
            return ""
        return safe[len(self.sent) :]

    def took(self, piece: str) -> None:
        self.sent += piece

    def rest(self, output_ids: list[int]) -> tuple[str, bool] | None:
        """The final content after what was sent, and whether a stop string cut it, exactly as
        postprocess makes the answer; None when what was sent is not its beginning."""
        content, stopped = apply_stop(self.text.decode(output_ids), self.stops)
        if self.diverged or not content.startswith(self.sent):
            return None
        return content[len(self.sent) :], stopped


@dataclass(frozen=True, slots=True)
class _Delta:
    reply: ReplyTo
    key: bytes | None
    value: bytes
    headers: Headers


class DeltaPublisher:
    """Sends deltas best-effort with its own producer (see the module's text)."""

    def __init__(self, settings: Settings, backlog: int = BACKLOG) -> None:
        self.settings = settings
        self._queue: asyncio.Queue[_Delta] = asyncio.Queue(backlog)
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = Counter(
            "sluice_compute_deltas_total",
            "Text deltas the broker acknowledged on reply partitions.",
            registry=None,
        )
        self.failed = Counter(
            "sluice_compute_delta_failures_total",
            "Text deltas whose send failed (best-effort: the answer is unaffected).",
            registry=None,
        )
        self.dropped = Counter(
            "sluice_compute_deltas_dropped_total",
            "Text deltas not sent: `backlog` (queue full; the text goes with the request's next "
            "delta), `diverged` (the tokenizer changed text already sent; the stream stops, the "
            "answer is unaffected), `stopped` (the publisher is not running).",
            ["reason"],
            registry=None,
        )

    def collectors(self) -> list[Any]:
        return [self.sent, self.failed, self.dropped]

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **self.settings.kafka_common(), acks=1, enable_idempotence=False, linger_ms=1
        )
        await self._producer.start()
        self._task = asyncio.create_task(self._send_loop(), name="deltas_send_loop")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._producer is not None:
            await self._producer.stop()  # flushes what was handed to it
            self._producer = None

    def publish(
        self, reply: ReplyTo, key: bytes | None, message: DeltaMessage, trace: HeadersIn
    ) -> bool:
        """Queue ``message`` for ``reply``; False (and counted) when it cannot be queued."""
        if self._task is None:
            self.dropped.labels("stopped").inc()
            return False
        headers = make_headers(
            message.ce_type, STAGE, message.id, traceparent=header_value(trace, TRACEPARENT)
        )
        try:
            self._queue.put_nowait(_Delta(reply, key, encode(message), headers))
        except asyncio.QueueFull:
            self.dropped.labels("backlog").inc()
            return False
        return True

    async def _send_loop(self) -> None:
        producer = self._producer
        assert producer is not None
        while True:
            delta = await self._queue.get()
            try:
                sent = await asyncio.wait_for(
                    producer.send(
                        delta.reply.topic,
                        delta.value,
                        key=delta.key,
                        partition=delta.reply.partition,
                        headers=delta.headers,
                    ),
                    SEND_TIMEOUT_S,
                )
            except (KafkaError, TimeoutError, AssertionError) as exc:  # aiokafka asserts partitions
                self.failed.inc()
                log.debug("delta to %s failed: %r", delta.reply, exc)
                continue
            sent.add_done_callback(self._acked)

    def _acked(self, sent: asyncio.Future[Any]) -> None:
        if sent.cancelled() or sent.exception() is not None:
            self.failed.inc()
        else:
            self.sent.inc()


class DeltaStream:
    """One request's stream: tokens in (the engine's listener), deltas out to its reply."""

    def __init__(
        self,
        publisher: DeltaPublisher,
        text: TextModel,
        *,
        request_id: str,
        reply: ReplyTo,
        key: bytes | None,
        stops: Sequence[str],
        trace: HeadersIn,
    ) -> None:
        self.publisher = publisher
        self.pieces = DeltaText(text, stops)
        self.request_id = request_id
        self.reply = reply
        self.key = key
        self.trace = trace
        self.index = 0

    def tokens(self, ids: list[int]) -> None:
        """The engine's ``on_tokens``: send what became final, if anything."""
        was = self.pieces.diverged
        piece = self.pieces.more(ids)
        if self.pieces.diverged and not was:
            self.publisher.dropped.labels("diverged").inc()
        if piece and self._send(DeltaMessage(id=self.request_id, index=self.index, delta=piece)):
            self.pieces.took(piece)

    def finish(self, output_ids: list[int], finish_reason: str, usage: Usage) -> None:
        """The last delta: the rest of the content, ``finish_reason`` (``stop`` when a stop
        string cut it, as postprocess says) and ``usage``."""
        rest = self.pieces.rest(output_ids)
        if rest is None:
            self.publisher.dropped.labels("diverged").inc()
            log.warning("request %s: streamed text diverged from the answer", self.request_id)
            return
        piece, stopped = rest
        last = DeltaMessage(
            id=self.request_id,
            index=self.index,
            delta=piece,
            finish_reason="stop" if stopped else finish_reason,
            usage=usage,
        )
        if self._send(last):
            self.pieces.took(piece)

    def _send(self, message: DeltaMessage) -> bool:
        if not self.publisher.publish(self.reply, self.key, message, self.trace):
            return False
        self.index += 1
        return True
