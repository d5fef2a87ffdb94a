"""Memory follows the byte bound, not the payload: a flood of ~900 KB prompts through preprocess.

On a private broker it starts preprocess alone, lets it settle and records its resident memory
(the baseline), stops it, publishes ``--requests`` prompts (default 2,000) of ``--size-kb``
(900 KB) onto the prompts topic, then starts preprocess again on that backlog, so it fetches as
fast as it can, and samples its RSS every 100 ms (plus the kernel's high-water mark, VmHWM)
until it has finished every record. With the default ``SLUICE_MAX_PROMPT_BYTES`` (256 KiB)
each prompt is refused as ``oversized`` (an error answer and a dead letter carrying the
original bytes), so the records themselves are what it holds; ``--max-in-flight-bytes``
defaults to the setting's default (256 MiB). Target: peak RSS under baseline + the bound.

    python -m bench.preprocess_memory [--requests 2000] [--size-kb 900]
        [--max-in-flight-bytes N] [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from bench.common import REPO_ROOT, kafka_broker, run_and_record
from pipeline import admin
from pipeline.aio import run_async
from pipeline.config import Settings
from sluice.procs import StageProcess, stage_env

console = Console()

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
MIB = 1 << 20


def status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def publish(settings: Settings, n: int, size: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", max_request_size=2 * MIB
    )
    await producer.start()
    try:
        for i in range(n):
            text = "x" * (size - 64)
            value = orjson.dumps(
                {"id": f"big-{i}", "messages": [{"role": "user", "content": text}]}
            )
            await producer.send(
                settings.topics.prompts, value, key=f"conv-{i % 17}".encode(),
                headers=[("sluice-request-id", f"big-{i}".encode())],
            )  # fmt: skip
        await producer.flush()
    finally:
        await producer.stop()


async def dead_letters(settings: Settings) -> int:
    """Records on the prompts topic's dead-letter topic (end offsets; nothing is read)."""
    topic = f"{settings.topics.prompts}.DLT"
    count = await admin.partition_count(settings, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(count)])
        return sum(ends.values())
    finally:
        await consumer.stop()


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    with kafka_broker(root / "kafka") as broker:
        extra: dict[str, Any] = {}
        if args.max_in_flight_bytes is not None:
            extra["max_in_flight_bytes"] = args.max_in_flight_bytes
        settings = Settings(
            bootstrap_servers=broker.address,
            topic_prefix="bench.",
            partitions=3,
            state_dir=root / "state",
            model_path=MODEL,
            engine="echo",
            **extra,
        )
        run_async(admin.create_topics(settings))
        env = stage_env(settings)
        first = StageProcess("preprocess", env, root / "preprocess.log").start()
        assert first.proc is not None
        time.sleep(args.settle_s)
        baseline_kb = status_kb(first.proc.pid, "VmRSS") or 0
        first.stop()
        t0 = time.monotonic()
        run_async(publish(settings, args.requests, args.size_kb * 1024))
        published_s = time.monotonic() - t0
        console.print(f"baseline {baseline_kb / 1024:.0f} MiB; published in {published_s:.0f}s")
        proc = StageProcess("preprocess", env, root / "preprocess.log").start()
        assert proc.proc is not None
        pid = proc.proc.pid
        samples: list[tuple[float, int]] = []
        t1 = time.monotonic()
        done = 0
        hwm_kb = 0
        try:
            while time.monotonic() - t1 < args.within:
                for _ in range(20):
                    rss = status_kb(pid, "VmRSS")
                    if rss is not None:
                        samples.append((round(time.monotonic() - t1, 1), rss))
                    time.sleep(0.1)
                hwm_kb = status_kb(pid, "VmHWM") or hwm_kb
                done = run_async(dead_letters(settings))
                if done >= args.requests:
                    break
            drained_s = time.monotonic() - t1
            settled_kb = status_kb(pid, "VmRSS") or 0
        finally:
            proc.stop()
    bound = settings.max_in_flight_bytes
    peak_kb = max([hwm_kb, *(kb for _, kb in samples)])
    return {
        "requests": args.requests,
        "size_kb": args.size_kb,
        "payload_mib": round(args.requests * args.size_kb / 1024, 1),
        "max_in_flight_bytes_mib": round(bound / MIB, 1),
        "baseline_rss_mib": round(baseline_kb / 1024, 1),
        "peak_rss_mib": round(peak_kb / 1024, 1),
        "peak_over_baseline_mib": round((peak_kb - baseline_kb) / 1024, 1),
        "within_bound": peak_kb * 1024 <= baseline_kb * 1024 + bound,
        "rss_after_drain_mib": round(settled_kb / 1024, 1),
        "dead_lettered": done,
        "published_s": round(published_s, 1),
        "drained_s": round(drained_s, 1),
        "samples": samples[:: max(1, len(samples) // 200)],
    }


def print_table(r: dict[str, Any]) -> None:
    table = Table(title=f"preprocess RSS: {r['requests']} prompts of {r['size_kb']} KB")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("payload_mib", "max_in_flight_bytes_mib", "baseline_rss_mib", "peak_rss_mib",
                "peak_over_baseline_mib", "within_bound", "rss_after_drain_mib", "dead_lettered",
                "published_s", "drained_s"):  # fmt: skip
        table.add_row(key, str(r[key]))
    console.print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.preprocess_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--size-kb", type=int, default=900)
    parser.add_argument("--max-in-flight-bytes", type=int, default=None)
    parser.add_argument("--settle-s", type=float, default=10.0, help="before the baseline")
    parser.add_argument("--within", type=float, default=480.0)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result, path = run_and_record(
        "preprocess_memory",
        args.out,
        argv,
        lambda tmp: run(args, tmp),
        {**vars(args), "out": str(args.out)},
    )
    print_table(result)
    console.print(f"wrote {path}")
    return 0 if result["within_bound"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
