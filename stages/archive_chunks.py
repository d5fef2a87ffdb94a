"""The archiver's chunk buffer: records accumulating per partition until they become one object.

Per partition, records go into an open chunk, encoded as archive lines
(``schemas/archive.py``); the chunk is sealed when it reaches ``max_records`` or ``max_bytes``,
or once it is ``max_age_s`` old. Sealed chunks wait, in offset order, for the partition's writer
(``stages/archiver.py``) to store each as one object named after its first offset and to commit
``last offset + 1``. Nothing here polls Kafka or touches the object store (``TopicPartition``
is only the partition's name), so the sealing rules are tested on their own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from schemas.archive import encode_line, object_key


@dataclass
class Chunk:
    """Consecutive records of one partition that become one object."""

    tp: TopicPartition
    first_offset: int
    opened_at: float
    lines: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    last_offset: int = -1

    def add(self, line: bytes, offset: int) -> None:
        self.lines.append(line)
        self.nbytes += len(line)
        self.last_offset = offset

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def key(self) -> str:
        return object_key(self.tp.topic, self.tp.partition, self.first_offset)

    @property
    def next_offset(self) -> int:
        return self.last_offset + 1


class PartitionBuffer:
    """One partition's open chunk and its sealed chunks waiting to be stored, in offset order."""

    def __init__(self, tp: TopicPartition, max_records: int, max_bytes: int, max_age_s: float):
        self.tp = tp
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.open: Chunk | None = None
        self.sealed: deque[Chunk] = deque()
        self.ready = asyncio.Event()  # set while sealed chunks wait
        self.drained = asyncio.Event()  # set when every sealed chunk is stored
        self.drained.set()
        self.committed: int | None = None
        self.paused = False

    def add(
        self,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]] | tuple[tuple[str, bytes | None], ...] | None,
        *,
        now: float,
    ) -> None:
        """Buffer one record; seals the chunk when it is full."""
        if self.open is None:
            self.open = Chunk(self.tp, offset, now)
        self.open.add(encode_line(offset, timestamp_ms, key, value, headers), offset)
        if len(self.open) >= self.max_records or self.open.nbytes >= self.max_bytes:
            self.seal()

    def seal(self) -> bool:
        """Close the open chunk (if it holds records) for storing."""
        if self.open is None or not self.open.lines:
            return False
        self.sealed.append(self.open)
        self.open = None
        self.ready.set()
        self.drained.clear()
        return True

    def seal_if_older(self, now: float) -> bool:
        if self.open is not None and now - self.open.opened_at >= self.max_age_s:
            return self.seal()
        return False

    @property
    def buffered(self) -> int:
        """Records consumed and not yet stored."""
        return len(self.open or ()) + sum(len(c) for c in self.sealed)
