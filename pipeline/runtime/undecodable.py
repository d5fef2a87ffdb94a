"""Get past records aiokafka cannot unpack, without losing the records around them.

When a fetched batch holds a record aiokafka cannot decode (a header key that is not UTF-8),
``getmany`` raises (``UnicodeDecodeError``) every time it reaches that batch and the consumer's
position does not move: the partition stops for good, and a restart only meets it again. Worse,
partitions drained earlier in the same ``getmany`` call had their positions advanced while their
records were lost with the exception.

``recover`` is what the loop calls with the exception in hand: for each partition it fetches the
raw bytes at the consumer's position (one fetch, outside aiokafka's decoder), reads them with the
tolerant reader, and, where it finds an undecodable record, returns the decodable records of
that window (to handle as usual), the undecodable ones (to dead-letter with what can be known:
topic, partition, offset, timestamp, key, value, headers) and seeks past the batch that held
them. ``rewind`` puts every other partition back where the loop last took records from.

Depends on aiokafka's client for the one raw fetch (``consumer._client``; aiokafka is pinned
below 0.15).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import NoError, for_code
from aiokafka.protocol.fetch import FetchRequest

from pipeline.config import Topics
from pipeline.errors import InvalidInput
from pipeline.runtime.batch import Output, Record
from pipeline.runtime.raw_records import RawRecord, read_batches
from schemas.dlt import make_dlt_headers

log = logging.getLogger(__name__)

# What getmany raises when it meets a record it cannot unpack.
UNDECODABLE_ERRORS: tuple[type[BaseException], ...] = (UnicodeDecodeError,)

RAW_FETCH_MAX_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A record aiokafka could not unpack, as read from the raw bytes."""

    topic: str
    partition: int
    raw: RawRecord
    problem: str

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.raw.offset}"


@dataclass(frozen=True, slots=True)
class Skipped:
    """One partition got past undecodable records."""

    tp: TopicPartition
    records: list[Record]  # the decodable records of the window, in offset order: handle them
    undecodable: list[Undecodable]  # dead-letter these
    resume_at: int  # where the consumer now reads on


def as_record(topic: str, partition: int, raw: RawRecord) -> Record:
    """A decodable raw record as the loop's ``Record``."""
    return Record(
        topic=topic,
        partition=partition,
        offset=raw.offset,
        timestamp_ms=raw.timestamp_ms,
        key=raw.key,
        value=raw.value,
        headers=[(k.decode("utf-8"), v if v is not None else b"") for k, v in raw.headers],
        timestamp_type=raw.timestamp_type,
    )


def dead_letter_undecodable(item: Undecodable, *, group: str) -> Output:
    """The dead letter of an undecodable record: its key and value as they were (null stays
    null), its headers with names that are not UTF-8 written with backslash escapes (Kafka
    clients only write text names), the Spring set, reason ``undecodable``."""
    raw = item.raw
    error = InvalidInput(f"the record could not be decoded: {item.problem}", reason="undecodable")
    original = [(k.decode("utf-8", "backslashreplace"), v) for k, v in raw.headers]
    return Output(
        topic=Topics.dlt(item.topic),
        key=raw.key,
        value=raw.value or b"",
        headers=make_dlt_headers(
            original,
            topic=item.topic,
            partition=item.partition,
            offset=raw.offset,
            timestamp_ms=raw.timestamp_ms,
            group=group,
            reason=error.reason,
            exc=error,
            timestamp_type=raw.timestamp_type,
        ),
        tombstone=raw.value is None,
    )


async def fetch_raw(consumer: Any, tp: TopicPartition, offset: int, max_bytes: int) -> bytes:
    """The record bytes the partition's leader returns for a fetch at ``offset``."""
    client = consumer._client
    node = client.cluster.leader_for_partition(tp)
    if node is None or node < 0:
        await client.force_metadata_update()
        node = client.cluster.leader_for_partition(tp)
    request = FetchRequest(0, 1, max_bytes, 0, [(tp.topic, [(tp.partition, offset, max_bytes)])])
    response = await client.send(node, request)
    for _topic, partitions in response.topics:
        for partition, error_code, _highwater, *data in partitions:
            if partition != tp.partition:
                continue
            error = for_code(error_code)
            if error is not NoError:
                raise error(f"raw fetch of {tp.topic}[{tp.partition}]@{offset}")
            return bytes(data[-1] or b"")
    return b""


async def skip_undecodable(
    consumer: Any, tp: TopicPartition, *, max_bytes: int = RAW_FETCH_MAX_BYTES
) -> Skipped | None:
    """If the records at ``tp``'s position include undecodable ones, seek past the batch that
    holds the first of them and say what was there; None when there is nothing to skip."""
    position: int = await consumer.position(tp)
    raw = await fetch_raw(consumer, tp, position, max_bytes)
    records: list[Record] = []
    bad: list[Undecodable] = []
    for batch in read_batches(raw):
        if not batch.control:
            for record in batch.records:
                if record.offset < position:
                    continue
                problem = record.problem
                if problem is None:
                    records.append(as_record(tp.topic, tp.partition, record))
                else:
                    bad.append(Undecodable(tp.topic, tp.partition, record, problem))
        if bad:
            consumer.seek(tp, batch.next_offset)
            for item in bad:
                log.warning(
                    "%s: undecodable record (%s); skipped, to be dead-lettered",
                    item.where,
                    item.problem,
                )
            return Skipped(tp, records, bad, batch.next_offset)
    return None


async def recover(
    consumer: Any, partitions: Iterable[TopicPartition], exc: BaseException
) -> list[Skipped]:
    """After ``getmany`` raised ``exc`` (one of ``UNDECODABLE_ERRORS``): skip past the
    undecodable records on each of ``partitions``. Raises ``exc`` again when none is found,
    since then it was something else."""
    skipped = [s for tp in partitions if (s := await skip_undecodable(consumer, tp)) is not None]
    if not skipped:
        raise exc
    return skipped


def rewind(consumer: Any, positions: Mapping[TopicPartition, int]) -> None:
    """Seek each partition back to the offset after the last record the loop took from it: a
    ``getmany`` that raised may have moved them past records it never returned."""
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
