"""What flows through the stage loop: records in, outputs out, one result per record."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from schemas.headers import SLUICE_REQUEST_ID, Headers, header_value
from schemas.ids import positional_request_id

if TYPE_CHECKING:
    from pipeline.errors import SluiceError

UNKNOWN_CLUSTER = "unknown-cluster"  # records not read from a broker (tests, offline archives)


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, detached from aiokafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_type: int = 0  # Kafka's: 0 CreateTime (set by the producer), 1 LogAppendTime
    cluster_id: str = ""  # the Kafka cluster it was read from: request ids derive from it

    @classmethod
    def of(cls, source: Any, timestamp_ms: int, cluster_id: str = "") -> Record:
        """A copy of an aiokafka ``ConsumerRecord`` or an archived record (the same field names
        but the timestamp's; an archived record has no timestamp type and counts as
        CreateTime); ``None`` header values, which both allow, become ``b""``."""
        return cls(
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            timestamp_ms=timestamp_ms,
            key=source.key,
            value=source.value,
            headers=[(k, v if v is not None else b"") for k, v in (source.headers or ())],
            timestamp_type=int(getattr(source, "timestamp_type", 0) or 0),
            cluster_id=cluster_id,
        )

    @property
    def where(self) -> str:
        """``topic[partition]@offset``, as every log line about a record names it."""
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def request_id(self) -> str:
        """The request id: the JSON body's ``id``, else the ``sluice-request-id`` header, else
        one derived from the record (:func:`derived_request_id`).

        The body wins because it is what the producer wrote (preprocess answers under it too);
        the derived id is the same for every read of this record (a redelivery after a crash
        gets the same id, so its answers are de-duplicated by it) and differs for a record at
        the same position of another cluster or of a re-created topic.
        """
        if self.value:
            try:
                body = orjson.loads(self.value)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("id"), str) and body["id"]:
                return str(body["id"])
        rid = header_value(self.headers, SLUICE_REQUEST_ID)
        if rid:
            return rid
        return derived_request_id(self)


def derived_request_id(record: Record) -> str:
    """The id of a prompt that came without one: ``schemas.ids.positional_request_id`` of the
    record's cluster, position and timestamp."""
    return positional_request_id(
        record.cluster_id or UNKNOWN_CLUSTER,
        record.topic,
        record.partition,
        record.offset,
        record.timestamp_ms,
    )


@dataclass(frozen=True, slots=True)
class Output:
    """One record to produce. ``tombstone``: produce a null value (``value`` is then ``b""``),
    so that the dead letter of a null record is null too, not empty."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    tombstone: bool = False
    partition: int | None = None  # None: the producer's partitioner (by key)

    @property
    def wire_value(self) -> bytes | None:
        """What goes to the producer: ``None`` for a tombstone, else the value."""
        return None if self.tombstone else self.value


@dataclass(slots=True)
class Result:
    """What a handler made of one record: outputs, or an error (never both)."""

    record: Record
    outputs: list[Output] = field(default_factory=list)
    error: SluiceError | None = None
    fingerprint: str | None = None  # the request's identity for the response cache

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Batch:
    """Records handed to a handler together, in consumption order."""

    records: tuple[Record, ...]

    @classmethod
    def of(cls, records: Sequence[Record]) -> Batch:
        return cls(tuple(records))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def size_bytes(self) -> int:
        return sum(len(r.value or b"") for r in self.records)

    def filter(self, keep: Callable[[Record], bool]) -> Batch:
        return Batch(tuple(r for r in self.records if keep(r)))

    def split(self, max_records: int) -> list[Batch]:
        """Consecutive chunks of at most ``max_records``."""
        n = max(1, max_records)
        return [Batch(self.records[i : i + n]) for i in range(0, len(self.records), n)]

    def by_partition(self) -> list[Batch]:
        """One batch per (topic, partition), each in offset order."""
        groups: dict[tuple[str, int], list[Record]] = {}
        for record in self.records:
            groups.setdefault((record.topic, record.partition), []).append(record)
        return [Batch(tuple(rs)) for rs in groups.values()]
