"""Transport benchmark, part 1: what the stage loop costs over a bare aiokafka loop.

1 KB records through a consume -> produce -> commit hop, on a private broker, two ways in the
same run, alternating:

* ``bare``: an aiokafka loop (``getmany``, send every record with ``acks=all`` on the
  idempotent producer, await the acks, commit);
* ``runner``: ``pipeline.runtime.runner.StageRunner`` with an identity handler.

Each reads a full backlog (the input topic is filled before any consumer starts) and is timed
from the first record consumed to the N-th output acknowledged. Run by ``bench.transport``.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console

from bench.common import load_average, median
from pipeline import admin
from pipeline.config import Settings, Topics
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.runner import StageRunner
from pipeline.runtime.stage import StageSpec
from schemas.headers import make_headers

console = Console()

MESSAGE_BYTES = 1024
WARMUP_MESSAGES = 2_000
PARTITIONS = 3
BATCH_RECORDS = 256
BATCH_WAIT_MS = 20
WATCH_INTERVAL_S = 0.002  # how often both variants are checked for the N-th ack
PRODUCER_KWARGS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 2,
    "max_batch_size": 1 << 20,
}


@dataclass
class HopRun:
    """One timed pass of one variant over a full backlog."""

    variant: str
    index: int
    messages: int
    seconds: float
    outputs: int  # records found on the output topic afterwards
    load_before: list[float]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


class Identity:
    """The smallest handler the loop can run: every record out again, unchanged."""

    def __init__(self, input_topic: str, answers_topic: str, output_topic: str) -> None:
        self.spec = StageSpec(
            name="identity",
            input_topic=input_topic,
            answers_topic=answers_topic,
            output_topics=(output_topic,),
        )
        self._out = output_topic
        self.first_call: float | None = None  # perf_counter of the first batch handed over

    def handle(self, batch: Batch) -> list[Result]:
        if self.first_call is None:
            self.first_call = time.perf_counter()
        out = self._out
        return [Result(r, outputs=[Output(out, r.key, r.value or b"", r.headers)]) for r in batch]

    def fingerprint(self, record: Record) -> str | None:
        return None

    def rebind(self, cached: Sequence[Output], record: Record) -> list[Output]:
        return []

    async def warmup(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def fill(settings: Settings, topic: str, n: int) -> None:
    """``n`` 1 KB records, round-robin over the partitions, in full producer batches."""
    value = bytes(range(256)) * (MESSAGE_BYTES // 256)
    producer = AIOKafkaProducer(
        **settings.kafka_common(), acks=1, linger_ms=50, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        batches = [producer.create_batch() for _ in range(PARTITIONS)]
        futures: list[asyncio.Future[Any]] = []
        for i in range(n):
            p = i % PARTITIONS
            rid = f"bench-{i}"
            headers = make_headers("sluice.bench", "bench", rid)
            item = {"timestamp": None, "key": f"conv-{i % 1000}".encode(), "value": value}
            if batches[p].append(**item, headers=headers) is None:
                futures.append(await producer.send_batch(batches[p], topic, partition=p))
                batches[p] = producer.create_batch()
                batches[p].append(**item, headers=headers)
        for p, batch in enumerate(batches):
            futures.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def wait_leaders(settings: Settings, names: Sequence[str], within: float = 30.0) -> None:
    """Until every partition of ``names`` has a leader (new topics take a moment)."""
    client = admin.admin_client(settings)
    await client.start()
    try:
        async with asyncio.timeout(within):
            while True:
                described = await client.describe_topics(list(names))
                leaders = [p["leader"] for d in described for p in d["partitions"]]
                if len(leaders) == PARTITIONS * len(names) and min(leaders) >= 0:
                    break
                await asyncio.sleep(0.1)
        # The controller names a leader a moment before the broker serves the partition.
        await asyncio.sleep(1.0)
    finally:
        await client.close()


async def watch(progress: Callable[[], int], n: int) -> float:
    """perf_counter when ``progress()`` first reads >= n; checked every WATCH_INTERVAL_S.

    Both variants are watched the same way, so they pay the same polling cost and resolution.
    """
    # Polled on purpose: the runner signals no event per ack, and both variants must be timed
    # by the same clockwork.
    while progress() < n:  # noqa: ASYNC110
        await asyncio.sleep(WATCH_INTERVAL_S)
    return time.perf_counter()


async def bare_hop(settings: Settings, src: str, dst: str, n: int) -> float:
    """The aiokafka loop with no framework; seconds from first record to the N-th ack."""
    common = settings.kafka_common()
    producer = AIOKafkaProducer(**common, **PRODUCER_KWARGS)
    consumer = AIOKafkaConsumer(
        src,
        **common,
        group_id=f"{src}-bare",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=BATCH_RECORDS,
        fetch_max_wait_ms=BATCH_WAIT_MS,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    await producer.start()
    await consumer.start()
    acked = 0
    first: float | None = None
    watcher = asyncio.create_task(watch(lambda: acked, n))
    try:
        while acked < n and not watcher.done():
            data = await consumer.getmany(timeout_ms=BATCH_WAIT_MS, max_records=BATCH_RECORDS)
            if not data:
                continue
            if first is None:
                first = time.perf_counter()
            futures = [
                await producer.send(dst, m.value, key=m.key, headers=list(m.headers))
                for messages in data.values()
                for m in messages
            ]
            await asyncio.gather(*futures)
            acked += len(futures)
            await consumer.commit({tp: ms[-1].offset + 1 for tp, ms in data.items()})
        end = await watcher
    finally:
        watcher.cancel()
        await consumer.stop()
        await producer.stop()
    assert first is not None
    return end - first


async def runner_hop(settings: Settings, src: str, dst: str, n: int, *, answers: str) -> float:
    """The same hop through StageRunner; seconds from first record to the N-th ack."""
    handler = Identity(src, answers, dst)
    runner = StageRunner(settings, handler, group_id=f"{src}-runner")

    def acked() -> int:  # offsets done (outputs acked), contiguous from 0 on a fresh topic
        return sum(p or 0 for p in runner.tracker.positions().values())

    await runner.start()
    try:
        end = await watch(acked, n)
        if runner.fatal is not None:
            raise runner.fatal
    finally:
        runner.request_stop()
        await runner.shutdown()
    assert handler.first_call is not None
    return end - handler.first_call


async def transport_overhead(bootstrap: str, n: int, repeats: int, state: Path) -> list[HopRun]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    settings = Settings(
        bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        batch_max_records=BATCH_RECORDS,
        batch_max_wait_ms=BATCH_WAIT_MS,
        response_cache_size=0,
        http_port=0,
        state_dir=state,
    )
    plan = [(v, i) for i in range(repeats) for v in ("bare", "runner")]
    warm = [("bare", -1), ("runner", -1)]  # untimed: group coordinator, broker JIT, imports
    answers = f"{prefix}answers"
    names = [answers]
    for v, i in warm + plan:
        names += [f"{prefix}{v}{i}.in", f"{prefix}{v}{i}.out", Topics.dlt(f"{prefix}{v}{i}.in")]
    await admin.create_topics(settings, names, partitions=PARTITIONS)
    await wait_leaders(settings, names)
    with console.status(f"filling {len(plan)} input topics with {n:,} records each"):
        for v, i in plan:
            await fill(settings, f"{prefix}{v}{i}.in", n)
        for v, i in warm:
            await fill(settings, f"{prefix}{v}{i}.in", WARMUP_MESSAGES)
    timeout = max(120.0, n / 100)
    with console.status("warm-up pass of each variant (untimed)"):
        async with asyncio.timeout(timeout):
            src = f"{prefix}bare-1"
            await bare_hop(settings, f"{src}.in", f"{src}.out", WARMUP_MESSAGES)
            src = f"{prefix}runner-1"
            await runner_hop(settings, f"{src}.in", f"{src}.out", WARMUP_MESSAGES, answers=answers)
    await asyncio.sleep(2.0)  # let the broker's writes settle before the first timing
    runs: list[HopRun] = []
    for v, i in plan:
        src, dst = f"{prefix}{v}{i}.in", f"{prefix}{v}{i}.out"
        gc.collect()
        load = load_average()
        with console.status(f"{v} run {i + 1}/{repeats}: {n:,} records"):
            async with asyncio.timeout(timeout):
                if v == "bare":
                    seconds = await bare_hop(settings, src, dst, n)
                else:
                    seconds = await runner_hop(settings, src, dst, n, answers=answers)
        (info,) = await admin.describe_topics(settings, [dst])
        run = HopRun(v, i, n, seconds, info.messages, load)
        extra = "" if info.messages == n else f"  [red]{info.messages:,} outputs, not {n:,}[/]"
        console.print(f"  {v:<6} run {i + 1}: {run.rate:>9,.0f} msgs/s ({seconds:.2f} s){extra}")
        runs.append(run)
    return runs


def summarize_hops(runs: list[HopRun]) -> dict[str, Any]:
    rates = {v: [r.rate for r in runs if r.variant == v] for v in ("bare", "runner")}
    bare, runner = median(rates["bare"]), median(rates["runner"])
    return {
        "median_msgs_per_s": {"bare": bare, "runner": runner},
        "ratio_runner_over_bare": runner / bare,
        "target_ratio": 0.9,
    }
