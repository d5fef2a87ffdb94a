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

Part 1 is ``bench/transport_overhead.py``, part 2 ``bench/transport_latency.py``; this module
runs them, prints the tables and writes the JSON report.

    .venv/bin/python -m bench.transport [--messages 50000] [--repeats 3]
        [--rate 200] [--seconds 20] [--skip-latency] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.common import kafka_broker, load_average, machine, results_path, write_json
from bench.transport_latency import end_to_end
from bench.transport_overhead import (
    BATCH_RECORDS,
    BATCH_WAIT_MS,
    MESSAGE_BYTES,
    PARTITIONS,
    PRODUCER_KWARGS,
    WATCH_INTERVAL_S,
    HopRun,
    console,
    summarize_hops,
    transport_overhead,
)
from pipeline.aio import run_async


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
