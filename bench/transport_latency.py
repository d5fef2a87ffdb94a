"""Transport benchmark, part 2: end-to-end latency through the three stages.

The three stages (echo engine) run as ``sluice run`` subprocesses on a private broker; prompts
are offered at a fixed rate; latency is prompt sent -> answer received, per request id, and
each answer's ``sluice-timings`` stamps say where the time went. Run by ``bench.transport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import REPO_ROOT, load_average, percentile
from bench.transport_overhead import PARTITIONS, console, wait_leaders
from infra.process import free_port
from pipeline import admin
from pipeline.config import Settings
from schemas.headers import SLUICE_REQUEST_ID, SLUICE_TIMINGS, header_value
from sluice.procs import StageProcess, stage_env
from stages.registry import STAGES

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"


@dataclass
class Answers:
    """Arrival time of the first answer per request id, and what else came."""

    first: dict[str, float] = field(default_factory=dict)  # perf_counter at arrival
    stamps: dict[str, dict[str, float]] = field(default_factory=dict)  # unix s, per stage
    errors: int = 0
    duplicates: int = 0
    _waiting: set[str] = field(default_factory=set)
    _all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def arrived(
        self, rid: str, at: float, *, error: bool, stamps: dict[str, float] | None = None
    ) -> None:
        if rid in self.first:
            self.duplicates += 1
            return
        self.first[rid] = at
        if stamps is not None:
            self.stamps[rid] = stamps
        if error:
            self.errors += 1
        self._waiting.discard(rid)
        if not self._waiting:
            self._all_in.set()

    async def wait_for(self, ids: Sequence[str], within: float) -> None:
        """Until every one of ``ids`` has an answer, or ``within`` seconds passed."""
        self._waiting = {i for i in ids if i not in self.first}
        self._all_in = asyncio.Event()
        if self._waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._all_in.wait()


async def collect_answers(consumer: AIOKafkaConsumer, into: Answers) -> None:
    while True:
        data = await consumer.getmany(timeout_ms=50)
        now, wall = time.perf_counter(), time.time()
        for messages in data.values():
            for m in messages:
                headers = list(m.headers or ())
                rid = header_value(headers, SLUICE_REQUEST_ID) or "?"
                ce_type = header_value(headers, "ce_type") or ""
                stamps = _stamps(header_value(headers, SLUICE_TIMINGS), wall)
                into.arrived(rid, now, error=ce_type.endswith(".error"), stamps=stamps)


def _stamps(timings: str | None, arrived: float) -> dict[str, float] | None:
    """The per-stage wall-clock stamps of an answer's ``sluice-timings`` header, plus arrival."""
    if not timings:
        return None
    body = orjson.loads(timings)
    keys = ("preprocessed_at", "generated_at", "answered_at")
    if not isinstance(body, dict) or not all(isinstance(body.get(k), float) for k in keys):
        return None
    return {**{k: float(body[k]) for k in keys}, "arrived_at": arrived}


# (segment, from stamp, to stamp): where an answer's time went, all on this host's clock
SEGMENTS = (
    ("sent -> preprocessed", "sent_at", "preprocessed_at"),
    ("preprocessed -> generated", "preprocessed_at", "generated_at"),
    ("generated -> answered", "generated_at", "answered_at"),
    ("answered -> received", "answered_at", "arrived_at"),
)


def breakdown(sent_wall: dict[str, float], answers: Answers) -> dict[str, dict[str, float]]:
    """p50/p90/p99 in ms of each hop of SEGMENTS over the answered requests."""
    out: dict[str, dict[str, float]] = {}
    for name, start, end in SEGMENTS:
        spans = [
            (stamps[end] - (sent_wall[rid] if start == "sent_at" else stamps[start])) * 1000
            for rid, stamps in answers.stamps.items()
            if rid in sent_wall
        ]
        out[name] = {f"p{q}": percentile(spans, q) for q in (50, 90, 99)}
    return out


@dataclass
class Offered:
    sent: dict[str, float]  # perf_counter at send, per request id
    sent_wall: dict[str, float]  # the same moment in unix seconds
    seconds: float


async def offer(
    producer: AIOKafkaProducer, topic: str, tag: str, rate: float, count: int
) -> Offered:
    """``count`` prompts at ``rate``/s on a fixed schedule, send times recorded."""
    sent: dict[str, float] = {}
    sent_wall: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rid = f"{tag}-{i}"
        body = {"id": rid, "messages": [{"role": "user", "content": f"repeat after me: {i}"}]}
        sent[rid], sent_wall[rid] = time.perf_counter(), time.time()
        await producer.send(topic, orjson.dumps(body), key=f"conv-{i % 97}".encode())
    await producer.flush()
    return Offered(sent, sent_wall, time.perf_counter() - start)


async def wait_ready(procs: dict[str, tuple[StageProcess, int]], within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        for stage, (proc, port) in procs.items():
            while True:
                if proc.proc is not None and proc.proc.poll() is not None:
                    raise RuntimeError(f"stage {stage} exited during start-up:\n{proc.log()}")
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass  # not listening yet; polled again below
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage {stage} not ready in {within:.0f}s:\n{proc.log()}")
                await asyncio.sleep(0.2)


async def end_to_end(bootstrap: str, rate: float, seconds: float, state: Path) -> dict[str, Any]:
    settings = Settings(
        bootstrap_servers=bootstrap,
        topic_prefix=f"lat-{uuid.uuid4().hex[:8]}.",
        model_path=MODEL,
        engine="echo",
        echo_delay_ms=0,
        partitions=PARTITIONS,
        state_dir=state,
    )
    topics = settings.topics
    await admin.create_topics(settings)
    await wait_leaders(settings, topics.all_topics())
    procs: dict[str, tuple[StageProcess, int]] = {}
    for stage in STAGES:
        port = free_port()
        env = stage_env(settings, SLUICE_HTTP_PORT=str(port))
        procs[stage] = (StageProcess(stage, env, state / f"{stage}.log").start(), port)
    consumer = AIOKafkaConsumer(
        topics.answers,
        **settings.kafka_common(),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=5,
    )
    producer = AIOKafkaProducer(**settings.kafka_common(), acks="all", enable_idempotence=True)
    answers = Answers()
    await consumer.start()
    await producer.start()
    collector = asyncio.create_task(collect_answers(consumer, answers))
    try:
        with console.status("starting the three stages (sluice run ...)"):
            await wait_ready(procs)
        with console.status("warming up: 50 prompts"):
            warm = await offer(producer, topics.prompts, "warm", 50.0, 50)
            await answers.wait_for(list(warm.sent), 30.0)
        count = round(rate * seconds)
        load = load_average()
        with console.status(f"offering {count:,} prompts at {rate:g}/s"):
            offered = await offer(producer, topics.prompts, "lat", rate, count)
            await answers.wait_for(list(offered.sent), max(30.0, seconds))
        load_after = load_average()
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        await producer.stop()
        await consumer.stop()
        for proc, _ in procs.values():
            await asyncio.to_thread(proc.stop)
    sent = offered.sent
    latencies = [(answers.first[r] - t) * 1000 for r, t in sent.items() if r in answers.first]
    answered = len(latencies)
    return {
        "offered_rate": rate,
        "achieved_rate": count / offered.seconds,
        "seconds": seconds,
        "sent": count,
        "answered": answered,
        "lost": count - answered,
        "error_answers": answers.errors,
        "duplicate_answers": answers.duplicates,
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
        },
        "breakdown_ms": breakdown(offered.sent_wall, answers),
        "load_before": load,
        "load_after": load_after,
        "stages": "subprocesses: python -m sluice.cli.main run <stage>, engine=echo, delay 0 ms",
    }
