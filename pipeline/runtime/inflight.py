"""The stage loop's units of work in flight: which task holds which records, and how many bytes.

The offset tracker counts records per partition; this holds the tasks themselves, so the loop
can wait for a revoked partition's work, bound what it holds in bytes as well as records, and
say in a crash report which requests were in flight (ids and positions only, never text).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from pipeline.runtime.batch import Record
from schemas.headers import SLUICE_REQUEST_ID, header_value

# A crash report lists at most this many in-flight records.
MAX_DESCRIBED = 1000


@dataclass(frozen=True, slots=True)
class Work:
    """One unit of work: records of one partition, consumed under ``epoch``."""

    tp: TopicPartition
    records: tuple[Record, ...]
    epoch: int
    size_bytes: int


class InFlight:
    """Tasks in flight and the bytes of the records they hold."""

    def __init__(self) -> None:
        self.tasks: dict[asyncio.Task[None], Work] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.tasks)

    def add(self, task: asyncio.Task[None], work: Work) -> None:
        self.tasks[task] = work
        self.bytes += work.size_bytes

    def done(self, task: asyncio.Task[None]) -> Work | None:
        work = self.tasks.pop(task, None)
        if work is not None:
            self.bytes -= work.size_bytes
        return work

    def of(self, partitions: set[TopicPartition]) -> list[asyncio.Task[None]]:
        """The tasks working on records of ``partitions``."""
        return [t for t, w in self.tasks.items() if w.tp in partitions]

    def describe(self) -> list[dict[str, Any]]:
        """The records in flight for a crash report: request id, topic, partition, offset."""
        out: list[dict[str, Any]] = []
        for work in list(self.tasks.values()):
            for record in work.records:
                if len(out) >= MAX_DESCRIBED:
                    return out
                out.append(
                    {
                        "request_id": header_value(record.headers, SLUICE_REQUEST_ID)
                        or record.request_id(),
                        "topic": record.topic,
                        "partition": record.partition,
                        "offset": record.offset,
                        "state": "in-flight",
                    }
                )
        return out
