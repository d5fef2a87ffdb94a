"""After an outage, expired work is not generated: stages stopped while prompts with a short
deadline pile up, then started.

On a private broker, with no stage running, it publishes ``--requests`` prompts (default
2,000) with a ``sluice-deadline`` of ``--deadline-s`` (5 s) and, mixed in, ``--live`` prompts
with a long deadline (120 s) that must still be served. After ``--outage-s`` (10 s) it starts
the three stages (echo engine, ``--token-delay-ms`` per token so a generation costs time),
waits until every prompt has an answer, stops them and reads the topics back:

* generated: records on the generated topic, split into short-deadline and live ids; a
  short-deadline record there whose ``generated_at`` is past its deadline is a violation;
* expired: ``expired`` error answers, and dead letters by topic and ``sluice-dlt-reason``
  (prompts.DLT is preprocess, tokenized.DLT is compute).

Target: no expired request is generated; every live one is.

    python -m bench.outage_backlog [--requests 2000] [--live 200] [--deadline-s 5]
        [--outage-s 10] [--token-delay-ms 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from bench.common import REPO_ROOT, kafka_broker, run_and_record
from bench.topics import Seen, read_topics, timing
from pipeline import admin
from pipeline.aio import run_async
from pipeline.config import Settings
from schemas.answers import decode_answer
from schemas.messages import ErrorAnswer
from schemas.streaming import deadline_header, deadline_in
from sluice.procs import StageProcess, stage_env

console = Console()

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
STAGES = ("preprocess", "compute", "postprocess")
PARTITIONS = 3
LIVE_DEADLINE_S = 120.0


def prompt(rid: str, i: int) -> bytes:
    text = "".join(chr(97 + (i + n) % 26) for n in range(16))
    return orjson.dumps(
        {"id": rid, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
    )


async def pile_up(settings: Settings, n: int, live: int, deadline_s: float) -> dict[str, int]:
    """Publish the short-deadline prompts with ``live`` long-deadline ones spread among them;
    returns each id's deadline (epoch ms)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5
    )
    await producer.start()
    deadlines: dict[str, int] = {}
    every = max(1, n // max(1, live)) if live else 0
    try:
        for i in range(n + live):
            is_live = bool(every) and i % (every + 1) == every and live > 0
            rid = f"{'live' if is_live else 'short'}-{i}"
            deadline = deadline_in(LIVE_DEADLINE_S if is_live else deadline_s)
            deadlines[rid] = deadline
            headers = [("sluice-request-id", rid.encode()), deadline_header(deadline)]
            await producer.send(
                settings.topics.prompts, prompt(rid, i), key=f"conv-{i % 17}".encode(),
                headers=headers,
            )  # fmt: skip
        await producer.flush()
    finally:
        await producer.stop()
    return deadlines


async def wait_answered(settings: Settings, ids: set[str], within: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        seen = await read_topics(settings.bootstrap_servers, [settings.topics.answers], 1.0)
        if ids <= {r.request_id for r in seen}:
            break
        await asyncio.sleep(2.0)
    return time.monotonic() - t0


def tally(deadlines: dict[str, int], records: list[Seen], settings: Settings) -> dict[str, Any]:
    t = settings.topics
    short = {r for r in deadlines if r.startswith("short-")}
    live = set(deadlines) - short
    generated = [r for r in records if r.topic == t.generated and r.request_id in deadlines]
    late = [
        r.request_id
        for r in generated
        if r.request_id in short
        and (at := timing(r, "generated_at")) is not None
        and at * 1000 > deadlines[r.request_id]
    ]
    answers: Counter[str] = Counter()
    answered: set[str] = set()
    for r in records:
        if r.topic == t.answers and r.request_id in deadlines:
            answered.add(r.request_id)
            answer = decode_answer(r.value)
            kind = (
                answer.error.code or answer.error.type
                if isinstance(answer, ErrorAnswer)
                else "completion"
            )
            answers[f"{'short' if r.request_id in short else 'live'}: {kind}"] += 1
    dlt = Counter(
        f"{r.topic.removeprefix(settings.topic_prefix)}: {r.headers.get('sluice-dlt-reason', '?')}"
        for r in records
        if r.topic.endswith(".DLT") and r.request_id in deadlines
    )
    return {
        "short_deadline": len(short),
        "live": len(live),
        "generated_short": sum(r.request_id in short for r in generated),
        "generated_short_past_deadline": len(late),
        "generated_live": len({r.request_id for r in generated} & live),
        "answers": dict(answers),
        "unanswered": len(set(deadlines) - answered),
        "dead_letters": dict(dlt),
    }


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    with kafka_broker(root / "kafka") as broker:
        settings = Settings(
            bootstrap_servers=broker.address,
            topic_prefix="bench.",
            partitions=PARTITIONS,
            state_dir=root / "state",
            model_path=MODEL,
            engine="echo",
            echo_token_delay_ms=args.token_delay_ms,
        )
        run_async(admin.create_topics(settings))
        t0 = time.monotonic()
        deadlines = run_async(pile_up(settings, args.requests, args.live, args.deadline_s))
        published_s = time.monotonic() - t0
        console.print(f"published {len(deadlines)} in {published_s:.1f}s; outage {args.outage_s}s")
        time.sleep(max(0.0, args.outage_s - published_s))
        procs = [StageProcess(s, stage_env(settings), root / f"{s}.log").start() for s in STAGES]
        try:
            drained = run_async(wait_answered(settings, set(deadlines), args.within))
        finally:
            for proc in procs:
                proc.stop()
        t = settings.topics
        topics = [t.generated, t.answers] + [
            f"{x}.DLT" for x in (t.prompts, t.tokenized, t.generated)
        ]
        records = run_async(read_topics(settings.bootstrap_servers, topics))
    result = tally(deadlines, records, settings)
    result["published_s"] = round(published_s, 2)
    result["stages_started_after_s"] = round(max(args.outage_s, published_s), 2)
    result["drained_s"] = round(drained, 1)
    return result


def print_table(r: dict[str, Any]) -> None:
    table = Table(title="outage backlog: short deadlines expire, live ones are served")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("short-deadline prompts", str(r["short_deadline"]))
    table.add_row("  generated", str(r["generated_short"]))
    table.add_row("  generated past their deadline", str(r["generated_short_past_deadline"]))
    table.add_row("live prompts", str(r["live"]))
    table.add_row("  generated", str(r["generated_live"]))
    for k, v in sorted(r["answers"].items()):
        table.add_row(f"answers {k}", str(v))
    for k, v in sorted(r["dead_letters"].items()):
        table.add_row(f"dead letters {k}", str(v))
    table.add_row("unanswered", str(r["unanswered"]))
    table.add_row("backlog drained in", f"{r['drained_s']} s")
    console.print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.outage_backlog",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=2000, help="short-deadline prompts")
    parser.add_argument("--live", type=int, default=200, help="long-deadline prompts")
    parser.add_argument("--deadline-s", type=float, default=5.0)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--token-delay-ms", type=float, default=5.0)
    parser.add_argument("--within", type=float, default=300.0, help="wait for the answers")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result, path = run_and_record(
        "outage_backlog",
        args.out,
        argv,
        lambda tmp: run(args, tmp),
        {**vars(args), "out": str(args.out)},
    )
    print_table(result)
    console.print(f"wrote {path}")
    ok = result["generated_short_past_deadline"] == 0 and result["unanswered"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
