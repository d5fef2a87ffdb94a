"""``sluice replay prompts``: re-publish archived prompts, all of a window or only unanswered ones.

A re-published prompt keeps its key, value and headers, and so its request id: the body's
``id``, else its ``sluice-request-id`` header, else the id derived from its original position,
which is then added as a ``sluice-request-id`` header (the new position would derive another).
Each re-published prompt starts a new attempt: its ``sluice-attempt`` is one more than the
highest the run knows of (the prompt's own, and with ``--unanswered`` that of its standing
answer), so its answer supersedes the earlier ones (``schemas.attempts``). Within a run each
request id is sent once.

``--unanswered``: a prompt is answered when an answer with its request id is in the archive
(answers topic), or, with ``check_topic``, on the live answers topic, and the answer that
stands by the rule "a completion, or else the latest attempt" is a completion, or, unless
``retry_errors``, an error answer (dead-lettered work has its own path: ``sluice replay dlq``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.admin import cluster_id_or_unknown
from pipeline.config import Settings
from pipeline.runtime.batch import Record, derived_request_id
from pipeline.storage import ObjectStore
from replay.archive import ArchiveReader, Window
from replay.common import (
    HeaderList,
    NoProgress,
    Progress,
    RateLimiter,
    ReplaySummary,
    note_answer,
    producer_for,
    record_attempt,
    topic_answers,
    with_attempt,
)
from schemas.archive import ArchivedRecord
from schemas.attempts import AnswerFacts
from schemas.headers import SLUICE_REQUEST_ID, header_value

log = logging.getLogger(__name__)

SEND_WINDOW = 500  # sends in flight before waiting for their acks


@dataclass(frozen=True)
class PromptReplayOptions:
    window: Window = field(default_factory=Window)
    unanswered: bool = False
    check_topic: bool = False  # also count answers on the live answers topic
    retry_errors: bool = False  # error answers do not count as answered
    source_topic: str | None = None  # the archived prompts topic (default: settings')
    answers_topic: str | None = None  # the answers topic (default: settings')
    target_topic: str | None = None  # where to re-publish (default: the prompts topic)
    rate: float = 0.0  # records a second, 0: no limit
    dry_run: bool = False


def prompt_request_id(record: ArchivedRecord, cluster_id: str = "") -> str:
    """The request id the pipeline gave (or will give) this prompt; ``cluster_id`` is that of
    the cluster the archived prompt was read from (prompts without an id derive theirs from
    it)."""
    return Record.of(record, record.timestamp_ms, cluster_id).request_id()


def replay_headers(
    record: ArchivedRecord,
    request_id: str,
    answered: AnswerFacts | None = None,
    cluster_id: str = "",
) -> HeaderList:
    """The original headers, the request id made explicit if needed, and a new attempt: one
    more than the prompt's and than that of the answer that stands (if known)."""
    headers: HeaderList = list(record.headers)
    derived = derived_request_id(Record.of(record, record.timestamp_ms, cluster_id))
    if request_id == derived and header_value(headers, SLUICE_REQUEST_ID) is None:
        headers.append((SLUICE_REQUEST_ID, request_id.encode()))
    latest = max(record_attempt(headers), answered.attempt if answered is not None else 0)
    return with_attempt(headers, latest + 1)


async def archived_answers(
    reader: ArchiveReader, topic: str, *, progress: Progress
) -> dict[str, AnswerFacts]:
    """Request id -> the archived answer that stands."""
    names = await reader.objects(topic)
    progress.begin(f"reading archived answers ({topic})", len(names))
    answers: dict[str, AnswerFacts] = {}
    async for record in reader.records(
        topic, objects=names, on_object=lambda _: progress.advance(1, answers=len(answers))
    ):
        note_answer(answers, record.headers)
    return answers


def is_answered(answer: AnswerFacts | None, *, retry_errors: bool) -> bool:
    """Whether a prompt whose standing answer is ``answer`` needs no replay."""
    return answer is not None and (answer.completion or not retry_errors)


async def replay_prompts(
    settings: Settings,
    store: ObjectStore,
    options: PromptReplayOptions,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Re-publish the archived prompts ``options`` select; returns what was done."""
    progress = progress or NoProgress()
    source = options.source_topic or settings.topics.prompts
    target = options.target_topic or settings.topics.prompts
    answers_topic = options.answers_topic or settings.topics.answers
    summary = ReplaySummary("replay prompts", options.dry_run)
    reader = ArchiveReader(store)

    answers: dict[str, AnswerFacts] = {}
    if options.unanswered:
        answers = await archived_answers(reader, answers_topic, progress=progress)
        if options.check_topic:
            progress.begin(f"reading live answers ({answers_topic})", None)
            before = len(answers)
            await topic_answers(settings, answers_topic, answers)
            progress.advance(1, answers=len(answers) - before)

    cluster = await cluster_id_or_unknown(settings)  # id-less prompts derive theirs from it
    names = await reader.objects(source, options.window)
    if not names:
        log.warning("no archived objects of %s in %s for this window", source, store.url)
    progress.begin(f"replaying prompts from {source}", len(names))
    limiter = RateLimiter(options.rate)
    producer = None if options.dry_run else producer_for(settings)
    in_flight: list[asyncio.Future[Any]] = []
    seen: set[str] = set()
    try:
        if producer is not None:
            await producer.start()
        async for record in reader.records(
            source,
            options.window,
            objects=names,
            on_object=lambda _: progress.advance(1, sent=summary.sent),
        ):
            summary.examined += 1
            rid = prompt_request_id(record, cluster)
            if is_answered(answers.get(rid), retry_errors=options.retry_errors):
                summary.skipped["answered"] += 1
                continue
            if rid in seen:
                summary.skipped["same request id again"] += 1
                continue
            seen.add(rid)
            if producer is not None:
                await limiter.acquire()
                headers = replay_headers(record, rid, answers.get(rid), cluster)
                in_flight.append(
                    await producer.send(target, record.value, key=record.key, headers=headers)
                )
                if len(in_flight) >= SEND_WINDOW:
                    await asyncio.gather(*in_flight)
                    in_flight.clear()
            summary.note_sent(target, rid)
        if in_flight:
            await asyncio.gather(*in_flight)
    finally:
        if producer is not None:
            await producer.stop()
    if reader.duplicates:
        summary.skipped["overlapping archive copies"] += reader.duplicates
    log.info(
        "replay prompts: %s %d of %d archived prompts from %s to %s",
        "would send" if options.dry_run else "sent",
        summary.sent,
        summary.examined,
        store.url,
        target,
    )
    return summary.finish()
