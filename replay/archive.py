"""Reading the conversation log back: list a topic's objects, stream its records in a window.

Records come out per partition in offset order, each exactly once: objects are read in order of
their start offset and a record at or below the highest offset already read for its partition
is a duplicate (objects overlap only when a crash redo cut them differently) and is skipped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.archive import (
    TOPICS_DIR,
    ArchivedRecord,
    ArchiveFormatError,
    ObjectName,
    decode_object,
    parse_object_key,
    partition_dir,
)

if TYPE_CHECKING:
    from pipeline.storage import ObjectStore

READ_AHEAD = 4  # objects fetched concurrently ahead of the one being read


@dataclass(frozen=True)
class Window:
    """Which records to read: partitions, an offset range and a time range (all optional).

    ``from_offset``/``since_ms`` are inclusive, ``to_offset``/``until_ms`` exclusive; offsets
    apply to every selected partition.
    """

    partitions: frozenset[int] | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    @classmethod
    def of(
        cls,
        partitions: Collection[int] | None = None,
        from_offset: int | None = None,
        to_offset: int | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> Window:
        return cls(
            frozenset(partitions) if partitions else None,
            from_offset,
            to_offset,
            since_ms,
            until_ms,
        )

    def admits(self, record: ArchivedRecord) -> bool:
        if self.partitions is not None and record.partition not in self.partitions:
            return False
        if self.from_offset is not None and record.offset < self.from_offset:
            return False
        if self.to_offset is not None and record.offset >= self.to_offset:
            return False
        if self.since_ms is not None and record.timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or record.timestamp_ms < self.until_ms


class ArchiveReader:
    """Reads archived records of one store; counts what it skipped as duplicates."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.duplicates = 0

    async def topics(self) -> list[str]:
        """The topics that have objects in the archive."""
        keys = await self.store.list(f"{TOPICS_DIR}/")
        return sorted({name.topic for key in keys if (name := parse_object_key(key))})

    async def objects(self, topic: str, window: Window | None = None) -> list[ObjectName]:
        """The topic's objects that may hold records of ``window``, by partition and offset.

        An object is left out when it starts at or after ``to_offset``, or when the next object
        of its partition starts at or before ``from_offset``: the archiver writes each
        partition as one contiguous run from any offset it (re)starts at, so the later objects
        hold every stored record from their start on.
        """
        window = window or Window()
        names = [
            name
            for key in await self.store.list(partition_dir(topic))
            if (name := parse_object_key(key)) is not None and name.topic == topic
        ]
        if window.partitions is not None:
            names = [n for n in names if n.partition in window.partitions]
        names.sort(key=lambda n: (n.partition, n.start_offset))
        kept: list[ObjectName] = []
        for i, name in enumerate(names):
            if window.to_offset is not None and name.start_offset >= window.to_offset:
                continue
            following = names[i + 1] if i + 1 < len(names) else None
            if (
                window.from_offset is not None
                and following is not None
                and following.partition == name.partition
                and following.start_offset <= window.from_offset
            ):
                continue
            kept.append(name)
        return kept

    async def records(
        self,
        topic: str,
        window: Window | None = None,
        *,
        objects: list[ObjectName] | None = None,
        on_object: Callable[[ObjectName], None] | None = None,
    ) -> AsyncIterator[ArchivedRecord]:
        """Every archived record of ``topic`` in ``window``, once, by partition and offset."""
        window = window or Window()
        names = objects if objects is not None else await self.objects(topic, window)
        high: dict[int, int] = {}
        pending: deque[tuple[ObjectName, asyncio.Task[bytes]]] = deque()
        queue = deque(names)
        try:
            while queue or pending:
                while queue and len(pending) < READ_AHEAD:
                    name = queue.popleft()
                    pending.append((name, asyncio.create_task(self.store.get(name.key))))
                name, task = pending.popleft()
                data = await task
                try:
                    records = decode_object(data, name.topic, name.partition)
                except ArchiveFormatError as exc:
                    raise ArchiveFormatError(f"{self.store.url} {name.key}: {exc}") from exc
                for record in records:
                    if record.offset <= high.get(record.partition, -1):
                        self.duplicates += 1
                        continue
                    high[record.partition] = record.offset
                    if window.admits(record):
                        yield record
                if on_object is not None:
                    on_object(name)
        finally:
            for _, task in pending:
                task.cancel()
            await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
