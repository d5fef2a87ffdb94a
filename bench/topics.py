"""Reading what the pipeline wrote: every record of some topics, from the start, with headers.

The benchmarks that count outcomes (generated vs expired, answers' timings, dead-letter
reasons) read the topics after a run rather than trusting a process's own counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer

from schemas.headers import header_value


@dataclass(frozen=True, slots=True)
class Seen:
    topic: str
    request_id: str | None
    headers: dict[str, str]
    value: bytes | None
    timestamp_ms: int


async def read_topics(bootstrap: str, topics: list[str], idle_s: float = 3.0) -> list[Seen]:
    """Every record on ``topics`` from the start until ``idle_s`` of silence."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    seen: list[Seen] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            batch = await consumer.getmany(timeout_ms=500)
            if any(batch.values()):
                quiet_since = time.monotonic()
            for records in batch.values():
                for r in records:
                    headers = list(r.headers or ())
                    decoded = {k: v.decode("utf-8", "replace") for k, v in headers if v}
                    rid = header_value(headers, "sluice-request-id")
                    seen.append(Seen(r.topic, rid, decoded, r.value, r.timestamp))
    finally:
        await consumer.stop()
    return seen


def timing(record: Seen, name: str) -> float | None:
    """One field of a record's ``sluice-timings`` header (seconds), None where absent."""
    raw = record.headers.get("sluice-timings")
    if raw is None:
        return None
    value = orjson.loads(raw).get(name)
    return float(value) if isinstance(value, int | float) else None
