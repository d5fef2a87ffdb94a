"""A broker outage under a steady load through ``SluiceClient``: publishers wait it out.

On a private broker it starts the three stages (echo engine) and one ``SluiceClient`` in this
process, sends ``--rate`` requests a second for ``--load-s`` seconds, each with a
``--timeout`` (120 s) request timeout, and stops the broker (SIGTERM) ``--down-at`` seconds in
for ``--outage-s`` (60 s), then starts it again on the same ports and data. Every request ends
as one of: answered (a completion), an error answer (by code), or an exception from the client
(``PublishError`` / ``PublishTimeout`` / other), counted by type. Target: 0 publish errors;
every request answered. A stage that loses the broker for long exits (a fatal error, by
design); the stages here are kept alive as a supervisor would (the chaos suite's rig: restarted
1 s after they exit), and their restarts are reported.

    python -m bench.broker_outage [--rate 20] [--load-s 100] [--down-at 15] [--outage-s 60]
        [--timeout 120] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import (
    REPO_ROOT,
    percentile,
    run_and_record,
)
from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from infra.process import ServiceHandle
from pipeline import admin
from pipeline.client import SluiceClient
from pipeline.config import Settings
from tests.chaos.scenarios import Rig

console = Console()

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"


@dataclass(frozen=True, slots=True)
class Outcome:
    sent_at: float  # seconds since the load began
    kind: str  # "completion", "error: <code>", "exception: <type>"
    latency_s: float


async def one(client: SluiceClient, i: int, t0: float, timeout_s: float) -> Outcome:
    sent = time.monotonic()
    text = "".join(chr(97 + (i + n) % 26) for n in range(12))
    try:
        reply = await client.request(
            {"messages": [{"role": "user", "content": text}], "max_tokens": 12},
            timeout_s=timeout_s,
        )
    except Exception as exc:  # noqa: BLE001 -- counted by type: the number this bench reports
        cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        kind = f"exception: {type(exc).__name__}{cause}"
        return Outcome(sent - t0, kind, time.monotonic() - sent)
    kind = "completion" if reply.ok else f"error: {reply.answer.error.code or reply.status}"  # type: ignore[union-attr]
    return Outcome(sent - t0, kind, time.monotonic() - sent)


async def load(
    settings: Settings,
    args: argparse.Namespace,
    data_dir: Path,
    box: dict[str, ServiceHandle],
    logs: Path,
) -> tuple[list[Outcome], dict[str, float]]:
    marks: dict[str, float] = {}
    async with (
        Rig(settings, logs) as rig,
        SluiceClient(settings, source="bench", timeout_s=args.timeout) as client,
    ):
        warm0 = time.monotonic()
        while not (await client.request("warm up", timeout_s=30)).ok:
            if time.monotonic() - warm0 > 120:
                raise RuntimeError("no answer within 120 s of start-up")
        console.print(f"warm after {time.monotonic() - warm0:.1f}s")
        t0 = time.monotonic()

        async def outage() -> None:
            await asyncio.sleep(args.down_at)
            handle = box["broker"]
            await asyncio.to_thread(stop_broker, handle)
            marks["broker_down_at_s"] = time.monotonic() - t0
            console.print(f"broker stopped at {marks['broker_down_at_s']:.1f}s")
            await asyncio.sleep(args.outage_s)
            cfg = BrokerConfig(
                port=handle.port, controller_port=handle.extra_port, data_dir=data_dir
            )
            box["broker"] = await asyncio.to_thread(start_broker, cfg)
            marks["broker_up_at_s"] = time.monotonic() - t0
            console.print(f"broker started again at {marks['broker_up_at_s']:.1f}s")

        fault = asyncio.create_task(outage(), name="outage")
        tasks = []
        for i in range(int(args.rate * args.load_s)):
            tasks.append(asyncio.create_task(one(client, i, t0, args.timeout)))
            await asyncio.sleep(max(0.0, t0 + (i + 1) / args.rate - time.monotonic()))
        await fault
        outcomes = list(await asyncio.gather(*tasks))
        marks["publish_retries"] = client.publish_retries
        marks["producer_replacements"] = client.producer_replacements
        marks["stage_restarts"] = rig.restarts
    return outcomes, marks


def summarize(outcomes: list[Outcome], marks: dict[str, float]) -> dict[str, Any]:
    down, up = marks.get("broker_down_at_s", 0.0), marks.get("broker_up_at_s", 0.0)
    during = [o for o in outcomes if down <= o.sent_at < up]
    kinds = Counter(o.kind for o in outcomes)
    return {
        "requests": len(outcomes),
        "outcomes": dict(kinds),
        "publish_errors": sum(v for k, v in kinds.items() if k.startswith("exception")),
        "answered": kinds.get("completion", 0),
        "sent_during_outage": len(during),
        "answered_of_those": sum(o.kind == "completion" for o in during),
        "latency_during_outage_s": {
            f"p{q}": round(percentile([o.latency_s for o in during], q), 2) for q in (50, 99)
        },
        "latency_outside_s": {
            f"p{q}": round(percentile([o.latency_s for o in outcomes if o not in during], q), 3)
            for q in (50, 99)
        },
        **{k: round(v, 1) for k, v in marks.items()},
    }


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    data_dir = root / "kafka"
    box = {"broker": start_broker(BrokerConfig(data_dir=data_dir))}
    try:
        settings = Settings(
            bootstrap_servers=box["broker"].address,
            topic_prefix="bench.",
            partitions=3,
            state_dir=root / "state",
            model_path=MODEL,
            engine="echo",
            request_timeout_s=args.timeout,
        )
        asyncio.run(admin.create_topics(settings))
        outcomes, marks = asyncio.run(load(settings, args, data_dir, box, root / "logs"))
    finally:
        stop_broker(box["broker"])
    return summarize(outcomes, marks)


def print_table(r: dict[str, Any]) -> None:
    table = Table(title="broker outage under a steady load (SluiceClient, 120 s timeouts)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("requests", str(r["requests"]))
    for k, v in sorted(r["outcomes"].items()):
        table.add_row(f"  {k}", str(v))
    table.add_row("publish errors", str(r["publish_errors"]))
    table.add_row("broker down", f"{r.get('broker_down_at_s')} s -> {r.get('broker_up_at_s')} s")
    table.add_row("sent while it was down", str(r["sent_during_outage"]))
    table.add_row("  answered", str(r["answered_of_those"]))
    table.add_row(
        "  latency p50 / p99", " / ".join(f"{v} s" for v in r["latency_during_outage_s"].values())
    )
    table.add_row(
        "latency otherwise p50 / p99", " / ".join(f"{v} s" for v in r["latency_outside_s"].values())
    )
    table.add_row("client publish retries", str(r.get("publish_retries")))
    table.add_row("producers replaced", str(r.get("producer_replacements")))
    table.add_row("stage restarts (kept alive)", str(r.get("stage_restarts")))
    console.print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.broker_outage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--load-s", type=float, default=100.0)
    parser.add_argument("--down-at", type=float, default=15.0)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="request timeout")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    result, path = run_and_record(
        "broker_outage",
        args.out,
        argv,
        lambda tmp: run(args, tmp),
        {**vars(args), "out": str(args.out)},
    )
    print_table(result)
    console.print(f"wrote {path}")
    return 0 if result["publish_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
