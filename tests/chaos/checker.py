"""Read every output topic and say what became of each id that was sent."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer

from pipeline.config import Settings
from schemas.headers import header_value


@dataclass
class Verdict:
    """Each sent id: answered once, answered N times, LOST (neither answered nor
    dead-lettered); ``dead_lettered`` holds the ids with a dead letter (most also have an error
    answer)."""

    answered_once: set[str] = field(default_factory=set)
    answered_more: dict[str, int] = field(default_factory=dict)
    dead_lettered: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.answered_more.values())

    @property
    def answered(self) -> int:
        return len(self.answered_once) + len(self.answered_more)


def _rid(record: object) -> str | None:
    return header_value(list(record.headers or ()), "sluice-request-id")  # type: ignore[attr-defined]


async def read_ids(settings: Settings, topics: list[str], idle_s: float = 3.0) -> Counter[str]:
    """Request ids of every record on ``topics``, read from the start until ``idle_s`` of
    silence."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: Counter[str] = Counter()
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            batch = await consumer.getmany(timeout_ms=500)
            if any(batch.values()):
                quiet_since = time.monotonic()
            for records in batch.values():
                for record in records:
                    rid = _rid(record)
                    if rid is not None:
                        seen[rid] += 1
    finally:
        await consumer.stop()
    return seen


async def check(settings: Settings, sent: list[str]) -> Verdict:
    """Classify ``sent`` against the answers topic and every dead-letter topic."""
    t = settings.topics
    answers = await read_ids(settings, [t.answers])
    dead = await read_ids(settings, [f"{x}.DLT" for x in (t.prompts, t.tokenized, t.generated)])
    verdict = Verdict()
    for rid in sent:
        n = answers.get(rid, 0)
        if dead.get(rid):
            verdict.dead_lettered.add(rid)
        if n == 1:
            verdict.answered_once.add(rid)
        elif n > 1:
            verdict.answered_more[rid] = n
        elif rid not in verdict.dead_lettered:
            verdict.lost.add(rid)
    return verdict
