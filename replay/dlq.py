"""``sluice replay dlq``: re-drive dead letters to the topic they came from.

The dead-letter topic is read by the consumer group ``<prefix>-replay-dlq`` (or ``group_id``)
from its committed position to the end offsets seen when the run starts. Each dead letter goes
back to its original topic (Spring's ``kafka_dlt-original-topic``, else Kafka Connect's
``__connect.errors.topic``; ``target_topic`` overrides both) with its original key and value,
its headers without the dead-letter sets, as a new attempt: ``sluice-attempt`` one more than
the dead letter's (1 when it had none), so the answer it gets supersedes the error answer the
dead letter got (``schemas.attempts``: a completion, or else the latest attempt, stands). The
group's position is committed after each batch is acknowledged, so a second run starts where
the first stopped and sends nothing twice (a crash between the acks and the commit re-sends
that one batch; the pipeline de-duplicates by request id).

Filters: ``reasons`` (``sluice-dlt-reason``), and ``max_attempts`` (a record re-driven that
often, that is at attempt ``max_attempts + 1``, is left dead). Records a filter passes over are
still consumed: the group's position moves past them. To re-drive them later, use another
``group_id`` with a filter that selects them (disjoint filters never send a record twice).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.config import Settings
from replay.common import (
    HeaderList,
    NoProgress,
    Progress,
    RateLimiter,
    ReplaySummary,
    partitions_of,
    producer_for,
    read_to_end,
    record_attempt,
    with_attempt,
)
from schemas.dlt import parse_dlt_headers
from schemas.headers import SLUICE_DLT_REASON, SLUICE_REQUEST_ID, header_value

log = logging.getLogger(__name__)

DLT_HEADER_PREFIXES = ("kafka_dlt-", "__connect.errors.")
REPLAY_GROUP = "replay-dlq"


@dataclass(frozen=True)
class DlqReplayOptions:
    dlt_topic: str
    reasons: frozenset[str] = frozenset()  # empty: every reason
    target_topic: str | None = None  # default: each record's original topic
    group_id: str | None = None  # default: <prefix>-replay-dlq
    max_attempts: int = 5  # 0: no limit
    rate: float = 0.0  # records a second, 0: no limit
    dry_run: bool = False
    batch_size: int = 500


@dataclass(frozen=True)
class Decision:
    """What to do with one dead letter: send to ``target``, or skip for ``skip``."""

    target: str | None
    skip: str | None
    attempt: int  # the attempt the re-driven record starts (its `sluice-attempt`)


def redrive_headers(headers: Sequence[tuple[str, bytes | None]], attempt: int) -> HeaderList:
    """The original record's headers: the Spring and Connect dead-letter sets and
    ``sluice-dlt-reason`` removed, ``sluice-attempt`` set to ``attempt``."""
    kept = [
        (k, v)
        for k, v in headers
        if not k.lower().startswith(DLT_HEADER_PREFIXES) and k.lower() != SLUICE_DLT_REASON
    ]
    return with_attempt(kept, attempt)


def decide(headers: Sequence[tuple[str, bytes | None]], options: DlqReplayOptions) -> Decision:
    info = parse_dlt_headers(headers)
    reason = info.reason if info is not None else header_value(headers, SLUICE_DLT_REASON)
    attempt = record_attempt(headers) + 1
    if options.reasons and (reason or "(none)") not in options.reasons:
        return Decision(None, f"reason {reason or '(none)'}", attempt)
    if options.max_attempts and attempt - 1 > options.max_attempts:  # re-drives, this one too
        return Decision(None, f"re-driven {options.max_attempts} times already", attempt)
    target = options.target_topic or (info.topic if info is not None else None)
    if not target:
        return Decision(None, "no original topic in its headers (use --to)", attempt)
    return Decision(target, None, attempt)


async def replay_dlq(
    settings: Settings, options: DlqReplayOptions, progress: Progress | None = None
) -> ReplaySummary:
    """Re-drive what ``options`` select from a dead-letter topic; returns what was done."""
    progress = progress or NoProgress()
    summary = ReplaySummary("replay dlq", options.dry_run)
    group = options.group_id or settings.group_id(REPLAY_GROUP)
    consumer = AIOKafkaConsumer(
        **settings.kafka_common(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=options.batch_size,
    )
    producer = None if options.dry_run else producer_for(settings)
    try:
        await consumer.start()
        tps = await _assign(consumer, await partitions_of(settings, options.dlt_topic))
        ends = await consumer.end_offsets(tps)
        starts = {tp: await consumer.position(tp) for tp in tps}
        progress.begin(
            f"re-driving {options.dlt_topic}", sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        )
        if producer is not None:
            await producer.start()
        limiter = RateLimiter(options.rate)
        async for batch in read_to_end(consumer, ends, max_records=options.batch_size):
            in_flight: list[asyncio.Future[Any]] = []
            for records in batch.values():
                for rec in records:
                    summary.examined += 1
                    headers = list(rec.headers or ())
                    decision = decide(headers, options)
                    if decision.target is None:
                        summary.skipped[decision.skip or "?"] += 1
                        continue
                    if producer is not None:
                        await limiter.acquire()
                        in_flight.append(
                            await producer.send(
                                decision.target,
                                rec.value,
                                key=rec.key,
                                headers=redrive_headers(headers, decision.attempt),
                            )
                        )
                    summary.note_sent(decision.target, header_value(headers, SLUICE_REQUEST_ID))
            if producer is not None:
                await asyncio.gather(*in_flight)
                await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batch.items()})
            progress.advance(sum(len(r) for r in batch.values()), sent=summary.sent)
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
    log.info(
        "replay dlq: %s %d of %d dead letters from %s (group %s)",
        "would send" if options.dry_run else "sent",
        summary.sent,
        summary.examined,
        options.dlt_topic,
        group,
    )
    return summary.finish()


async def _assign(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> list[TopicPartition]:
    """Assign the partitions; positions start at the group's committed offsets."""
    consumer.assign(tps)
    for tp in tps:
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
    return tps
