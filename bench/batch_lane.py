"""The batch lane: does a batch backlog slow chat, and how fast does a batch go?

On a private broker it starts preprocess, compute (the echo engine, ``--delay-ms`` a request)
and postprocess as processes (``sluice run``), all with ``SLUICE_MAX_IN_FLIGHT=--in-flight``.
The echo engine has no slot limit, so that bound is what makes compute the bottleneck: it
stands for an engine whose batch is half of it (compute holds twice its engine's batch), and
the batch lane may fill that half. Then, in order:

1. **interactive alone**: chat prompts at ``--rate`` a second for ``--seconds``, each through
   ``SluiceClient.request`` (publish -> answer back on its reply partition); p50/p99 latency;
2. **interactive with a batch**: ``--lines`` prompts published at once to
   ``<prefix>prompts.batch`` (as the batcher would), then the same chat load; p50/p99 latency,
   and how long the batch took to be answered in full (it keeps going after the chat load);
3. **batch alone**: ``--lines`` more on the batch lane, nothing else: lines a second;
4. **sluice infer**: the same lines through ``sluice infer --file`` (the interactive lane, the
   client's own window): lines a second.

    .venv/bin/python -m bench.batch_lane [--lines 10000] [--rate 10] [--seconds 30]
        [--delay-ms 100] [--in-flight 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from bench.common import (
    REPO_ROOT,
    kafka_broker,
    load_average,
    machine,
    percentile,
    results_path,
    write_json,
)
from pipeline import admin
from pipeline.aio import run_async
from pipeline.client import SluiceClient
from pipeline.config import Settings
from schemas.headers import SLUICE_REQUEST_ID, header_value
from sluice.procs import StageProcess, stage_env

console = Console()
STAGES = ("preprocess", "compute", "postprocess")


def question(i: int) -> str:
    return f"line {i}: what is {i % 97} + {i % 89}?"


async def chat_load(settings: Settings, rate: float, seconds: float) -> list[float]:
    """Open loop: one chat prompt every 1/rate s for ``seconds``; each one's latency (s)."""
    latencies: list[float] = []
    async with SluiceClient(settings, source="bench") as client:

        async def one(i: int) -> None:
            reply = await client.request(f"chat {i}: what is {i} + 1?", timeout_s=120)
            if reply.ok:
                latencies.append(reply.latency_s)

        tasks = []
        t0 = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return latencies


async def publish_batch(settings: Settings, tag: str, lines: int) -> float:
    """``lines`` prompts on the batch lane, ids ``<tag>-<i>``; returns when they were sent."""
    producer = AIOKafkaProducer(**settings.kafka_common(), acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for i in range(lines):
            rid = f"{tag}-{i}"
            value = orjson.dumps(
                {"id": rid, "messages": [{"role": "user", "content": question(i)}]}
            )
            futures.append(
                await producer.send(
                    settings.topics.prompts_batch,
                    value,
                    key=rid.encode(),
                    headers=[(SLUICE_REQUEST_ID, rid.encode())],
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.monotonic()


async def wait_answers(settings: Settings, tag: str, lines: int, timeout_s: float) -> float:
    """When the last of ``<tag>-*`` was answered (answers topic, from its start)."""
    consumer = AIOKafkaConsumer(
        settings.topics.answers,
        **settings.kafka_common(),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < lines and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    rid = header_value(r.headers, SLUICE_REQUEST_ID) or ""
                    if rid.startswith(f"{tag}-"):
                        seen.add(rid)
    finally:
        await consumer.stop()
    if len(seen) < lines:
        raise RuntimeError(f"only {len(seen)} of {lines} batch lines answered in {timeout_s}s")
    return time.monotonic()


async def with_batch(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    sent = await publish_batch(settings, "mixed", args.lines)
    done = asyncio.create_task(wait_answers(settings, "mixed", args.lines, args.batch_timeout))
    latencies = await chat_load(settings, args.rate, args.seconds)
    chat_over = time.monotonic()
    finished = await done
    return {
        "chat": summary(latencies),
        "batch_publish_s": round(sent - t0, 2),
        "batch_done_s": round(finished - t0, 2),
        "batch_done_after_chat_s": round(finished - chat_over, 2),
    }


async def batch_alone(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    await publish_batch(settings, "alone", args.lines)
    finished = await wait_answers(settings, "alone", args.lines, args.batch_timeout)
    return {
        "seconds": round(finished - t0, 2),
        "lines_per_s": round(args.lines / (finished - t0), 1),
    }


def infer_run(settings: Settings, folder: Path, lines: int) -> dict[str, Any]:
    prompts = folder / "infer.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps(question(i)) + b"\n" for i in range(lines)))
    out = folder / "infer-out.jsonl"
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sluice.cli.client", "infer", "--file", str(prompts), "--out",
         str(out), "--timeout", "600"],
        env=stage_env(settings), cwd=REPO_ROOT, capture_output=True, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"sluice infer failed:\n{done.stderr.decode()[-2000:]}")
    answered = out.read_bytes().count(b"\n")
    return {"seconds": round(elapsed, 2), "lines_per_s": round(answered / elapsed, 1)}


def summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "answered": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
    }


async def warm_up(settings: Settings) -> None:
    async with SluiceClient(settings, source="bench") as client:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if (await client.request("warm up", timeout_s=10)).ok:
                return
        raise RuntimeError("no answer within 180 s of start-up")


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="sluice-bench-lane-"))
    with kafka_broker(folder / "kafka") as broker:
        settings = Settings(
            bootstrap_servers=broker.address,
            topic_prefix=f"b{uuid.uuid4().hex[:8]}.",
            state_dir=folder / "state",
            partitions=3,
            engine="echo",
            echo_delay_ms=args.delay_ms,
            max_in_flight=args.in_flight,
        )
        run_async(admin.create_topics(settings))
        procs = [StageProcess(s, stage_env(settings), folder / f"{s}.log").start() for s in STAGES]
        try:
            run_async(warm_up(settings))
            result: dict[str, Any] = {"load_before": load_average()}
            result["alone"] = summary(run_async(chat_load(settings, args.rate, args.seconds)))
            result["with_batch"] = run_async(with_batch(settings, args))
            result["load_during"] = load_average()
            result["batch_alone"] = run_async(batch_alone(settings, args))
            result["sluice_infer"] = infer_run(settings, folder, args.lines)
            result["load_after"] = load_average()
        finally:
            for proc in procs:
                proc.stop()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=10.0, help="chat prompts a second")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each chat load")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="echo engine delay")
    parser.add_argument("--in-flight", type=int, default=32, help="SLUICE_MAX_IN_FLIGHT")
    parser.add_argument("--batch-timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result = run(args)
    data = {
        "benchmark": "batch_lane",
        "started": started,
        "machine": machine(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **result,
    }
    path = write_json(results_path("batch-lane", args.out), data)
    table = Table(title=f"batch lane: {args.lines} lines, chat {args.rate}/s for {args.seconds}s")
    for column in ("run", "chat p50 ms", "chat p99 ms", "batch"):
        table.add_column(column)
    alone, mixed = result["alone"], result["with_batch"]
    table.add_row("chat alone", str(alone["p50_ms"]), str(alone["p99_ms"]), "")
    table.add_row("chat + batch", str(mixed["chat"]["p50_ms"]), str(mixed["chat"]["p99_ms"]),
                  f"done in {mixed['batch_done_s']} s")  # fmt: skip
    table.add_row("batch alone", "", "", f"{result['batch_alone']['lines_per_s']} lines/s")
    table.add_row("sluice infer", "", "", f"{result['sluice_infer']['lines_per_s']} lines/s")
    console.print(table)
    console.print(f"load average before/during/after: {result['load_before']} "
                  f"{result['load_during']} {result['load_after']}; wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
