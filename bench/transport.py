"""Transport benchmark: what the stage loop costs over bare aiokafka, and end-to-end latency.

Part 1 (transport overhead): 1 KB records through a consume -> produce -> commit hop, on a
private broker, two ways in the same run, alternating:

* ``bare``: an aiokafka loop (``getmany``, send every record with ``acks=all`` on the
  idempotent producer, await the acks, commit);
* ``runner``: ``pipeline.runtime.runner.StageRunner`` with an identity handler.

Each reads a full backlog (the input topic is filled before any consumer starts) and is timed
from the first record consumed to the N-th output acknowledged.

Part 2 (end-to-end latency): the three stages (echo engine) as ``sluice run`` subprocesses;
prompts offered at a fixed rate; latency is prompt sent -> answer received, per request id.

    .venv/bin/python -m bench.transport [--messages 50000] [--repeats 3]
        [--rate 200] [--seconds 20] [--skip-latency] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from bench.common import (
    REPO_ROOT,
    kafka_broker,
    load_average,
    machine,
    median,
    percentile,
    results_path,
    write_json,
)
from infra.process import free_port
from pipeline import admin
from pipeline.aio import run_async
from pipeline.config import Settings, Topics
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.runner import StageRunner
from pipeline.runtime.stage import StageSpec
from schemas.headers import SLUICE_REQUEST_ID, SLUICE_TIMINGS, header_value, make_headers
from sluice.procs import StageProcess, stage_env
from stages.registry import STAGES

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
MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"


# ---- part 1: transport overhead ------------------------------------------------------------


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


# ---- part 2: end-to-end latency ------------------------------------------------------------


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


# ---- output --------------------------------------------------------------------------------


def print_tables(runs: list[HopRun], hops: dict[str, Any], lat: dict[str, Any] | None) -> None:
    table = Table(title=f"transport overhead: 1 KB records, {PARTITIONS} partitions")
    for col in ("variant", "runs (msgs/s)", "median msgs/s", "ratio"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    medians = hops["median_msgs_per_s"]
    for v, label in (("bare", "bare aiokafka"), ("runner", "StageRunner")):
        each = ", ".join(f"{r.rate:,.0f}" for r in runs if r.variant == v)
        ratio = "1.00" if v == "bare" else f"{hops['ratio_runner_over_bare']:.2f}"
        table.add_row(label, each, f"{medians[v]:,.0f}", ratio)
    console.print(table)
    if lat is None:
        return
    table = Table(title="end-to-end latency: 3 stage processes, echo engine")
    for col in ("offered/s", "sent", "answered", "lost", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    ms = lat["latency_ms"]
    table.add_row(
        f"{lat['offered_rate']:g}",
        str(lat["sent"]),
        str(lat["answered"]),
        str(lat["lost"]),
        *(f"{ms[k]:.1f}" for k in ("p50", "p90", "p99", "max")),
    )
    table.caption = (
        f"achieved {lat['achieved_rate']:.1f}/s for {lat['seconds']:g} s; "
        f"error answers {lat['error_answers']}, duplicates {lat['duplicate_answers']}"
    )
    console.print(table)
    table = Table(title="where the time went (stage stamps in sluice-timings)")
    table.add_column("hop")
    for col in ("p50 ms", "p90 ms", "p99 ms"):
        table.add_column(col, justify="right")
    for hop, qs in lat["breakdown_ms"].items():
        table.add_row(hop, *(f"{qs[k]:.1f}" for k in ("p50", "p90", "p99")))
    console.print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transport",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=50_000, help="records per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant")
    parser.add_argument("--rate", type=float, default=200.0, help="prompts offered per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to offer them")
    parser.add_argument("--skip-latency", action="store_true", help="part 1 only")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = dt.datetime.now(dt.UTC)
    load_start = load_average()
    lat: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        root = Path(tmp)
        console.print("starting a Kafka broker of our own")
        with kafka_broker(root / "kafka") as broker:
            runs = run_async(
                transport_overhead(broker.address, args.messages, args.repeats, root / "hop")
            )
            if not args.skip_latency:
                (root / "e2e").mkdir()
                lat = run_async(end_to_end(broker.address, args.rate, args.seconds, root / "e2e"))
    hops = summarize_hops(runs)
    print_tables(runs, hops, lat)
    report = {
        "benchmark": "transport",
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m bench.transport", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(),
        "load_average": {"start": load_start, "end": load_average()},
        "parameters": {**vars(args), "out": str(args.out) if args.out else None},
        "transport": {
            "message_bytes": MESSAGE_BYTES,
            "partitions": PARTITIONS,
            "batch_max_records": BATCH_RECORDS,
            "batch_max_wait_ms": BATCH_WAIT_MS,
            "watch_interval_s": WATCH_INTERVAL_S,
            "producer": PRODUCER_KWARGS,
            "runs": [{**asdict(r), "msgs_per_s": r.rate} for r in runs],
            **hops,
        },
        "latency": lat,
    }
    path = write_json(results_path("transport", args.out), report)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
