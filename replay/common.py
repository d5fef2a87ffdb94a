"""What the recovery tools share: progress, rate limit, summary, times, reading to the end."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.admin import describe_topics
from pipeline.config import Settings
from schemas.attempts import AnswerFacts, answer_facts, supersedes
from schemas.headers import (
    FIRST_ATTEMPT,
    SLUICE_ATTEMPT,
    SLUICE_REQUEST_ID,
    header_value,
    parse_attempt,
)

log = logging.getLogger(__name__)

LEGACY_REPLAY_ATTEMPT: Final = "sluice-replay-attempt"
"""What replay wrote before ``sluice-attempt``: the re-drives so far (attempt - 1). Read only."""

HeaderList = list[tuple[str, bytes | None]]


class Progress(Protocol):
    """Where a tool reports progress: a rich progress bar in the CLI, nothing in tests."""

    def begin(self, phase: str, total: int | None) -> None:
        """A new phase of work (a new bar), ``total`` units when known."""
        ...

    def advance(self, n: int = 1, **counts: int) -> None:
        """``n`` units of the current phase done; ``counts`` are shown beside the bar."""
        ...


class NoProgress:
    def begin(self, phase: str, total: int | None) -> None:
        return None

    def advance(self, n: int = 1, **counts: int) -> None:
        return None


class RateLimiter:
    """At most ``per_second`` acquisitions a second, evenly spaced (0: no limit)."""

    def __init__(self, per_second: float = 0.0) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0

    async def acquire(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        self._next = max(self._next, now)
        wait = self._next - now
        self._next += self.interval
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass
class ReplaySummary:
    """What a run did, for the CLI's table and for tests."""

    action: str
    dry_run: bool
    examined: int = 0
    sent: int = 0  # in a dry run: would be sent
    skipped: Counter[str] = field(default_factory=Counter)
    targets: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first request ids sent
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0

    def note_sent(self, target: str, request_id: str | None) -> None:
        self.sent += 1
        self.targets[target] += 1
        if request_id is not None and len(self.examples) < 10:
            self.examples.append(request_id)

    def finish(self) -> ReplaySummary:
        self.elapsed_s = time.monotonic() - self.started
        return self

    def rows(self) -> list[tuple[str, str]]:
        verb = "would send" if self.dry_run else "sent"
        rows = [("examined", f"{self.examined:,}"), (verb, f"{self.sent:,}")]
        rows += [(f"  to {topic}", f"{n:,}") for topic, n in sorted(self.targets.items())]
        rows += [(f"skipped: {why}", f"{n:,}") for why, n in sorted(self.skipped.items())]
        rows.append(("time", f"{self.elapsed_s:.1f}s"))
        if self.examples:
            rows.append(("first request ids", ", ".join(self.examples[:5])))
        return rows


_RELATIVE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[smhd])(?:\s+ago)?", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> int:
    """A point in time as Unix milliseconds.

    Accepts ISO 8601 (``2026-11-28T03:00:00Z``; no zone means UTC), Unix seconds or
    milliseconds (``1764298800``, ``1764298800000``) and durations before now (``90m``,
    ``2h``, ``1d``, ``30s``, optionally followed by ``ago``).
    """
    value = text.strip()
    if match := _RELATIVE.fullmatch(value):
        seconds = float(match["n"]) * _UNIT_S[match["unit"].lower()]
        return int(((time.time() if now is None else now) - seconds) * 1000)
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        return int(number) if number > 1e11 else int(number * 1000)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(
            f"not a time: {text!r} (ISO 8601, Unix seconds or ms, or e.g. 2h for 2 hours ago)"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def format_ms(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_attempt(headers: Sequence[tuple[str, bytes | None]]) -> int:
    """The attempt a record belongs to: its ``sluice-attempt``, else one more than an older
    replay's ``sluice-replay-attempt``, else the first."""
    if header_value(headers, SLUICE_ATTEMPT) is None:
        legacy = header_value(headers, LEGACY_REPLAY_ATTEMPT)
        if legacy is not None and legacy.strip().isdigit():
            return FIRST_ATTEMPT + int(legacy)
    return parse_attempt(headers)


def with_attempt(headers: Sequence[tuple[str, bytes | None]], attempt: int) -> HeaderList:
    """``headers`` with ``sluice-attempt`` set to ``attempt`` (replacing any, and any older
    ``sluice-replay-attempt``)."""
    names = {SLUICE_ATTEMPT, LEGACY_REPLAY_ATTEMPT}
    kept = [(k, v) for k, v in headers if k.lower() not in names]
    return [*kept, (SLUICE_ATTEMPT, str(attempt).encode())]


def producer_for(settings: Settings) -> AIOKafkaProducer:
    """The producer the tools re-publish with: acks=all, idempotent, like the stages."""
    return AIOKafkaProducer(
        **settings.kafka_common(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=1 << 20,
    )


async def read_to_end(
    consumer: AIOKafkaConsumer,
    ends: dict[TopicPartition, int],
    *,
    max_records: int = 500,
    idle_s: float = 10.0,
) -> AsyncIterator[dict[TopicPartition, list[Any]]]:
    """Batches from an assigned, positioned consumer until every partition reaches ``ends``.

    Records at or past a partition's end are left out (they arrived after the run began, so
    a re-driven record that fails again is not re-driven twice in one run). Stops early, with
    a warning, when nothing arrives for ``idle_s`` though some partition is short of its end
    (an open transaction holding back ``read_committed`` readers).
    """
    last_data = time.monotonic()
    while True:
        pending = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
        if not pending:
            return
        data = await consumer.getmany(*pending, timeout_ms=500, max_records=max_records)
        batch = {
            tp: kept
            for tp, records in data.items()
            if (kept := [r for r in records if r.offset < ends.get(tp, 0)])
        }
        if batch:
            last_data = time.monotonic()
            yield batch
        elif time.monotonic() - last_data > idle_s:
            short = {f"{tp.topic}[{tp.partition}]": ends[tp] for tp in pending}
            log.warning(
                "stopped short of the end offsets %s: nothing arrived for %.0fs", short, idle_s
            )
            return


async def partitions_of(settings: Settings, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic``; ValueError when there is no such topic."""
    infos = await describe_topics(settings, [topic])
    if not infos or not infos[0].end_offsets:
        raise ValueError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p) for p in sorted(infos[0].end_offsets)]


def note_answer(
    answers: dict[str, AnswerFacts], headers: Sequence[tuple[str, bytes | None]]
) -> None:
    """Fold one answer record into ``answers`` (request id -> the answer that stands)."""
    rid = header_value(headers, SLUICE_REQUEST_ID)
    if rid:
        facts = answer_facts(headers)
        if supersedes(facts, answers.get(rid)):
            answers[rid] = facts


async def topic_answers(
    settings: Settings, topic: str, answers: dict[str, AnswerFacts] | None = None
) -> dict[str, AnswerFacts]:
    """Request id -> the answer that stands, over every answer on a live topic read from the
    start, added to ``answers`` (those read before, e.g. from the archive)."""
    consumer = AIOKafkaConsumer(
        **settings.kafka_common(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    found: dict[str, AnswerFacts] = {} if answers is None else answers
    try:
        await consumer.start()
        tps = await partitions_of(settings, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        async for batch in read_to_end(consumer, ends):
            for records in batch.values():
                for rec in records:
                    note_answer(found, list(rec.headers or ()))
    finally:
        await consumer.stop()
    return found
