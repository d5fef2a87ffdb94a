"""What every benchmark shares: a private broker, the machine it ran on, percentiles, results.

Benchmarks are not tests: they print a table and write JSON under ``bench/results/``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from infra.kafka.broker import DEFAULT_KAFKA_VERSION, BrokerConfig, start_broker, stop_broker
from infra.process import ServiceHandle

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo ("unknown" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def event_loop_name() -> str:
    try:
        return f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        return "asyncio"


def machine() -> dict[str, Any]:
    """Where a benchmark ran: host, CPUs, Python, Kafka, event loop."""
    return {
        "node": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kafka_version": DEFAULT_KAFKA_VERSION,
        "event_loop": event_loop_name(),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


@contextmanager
def kafka_broker(data_dir: Path) -> Iterator[ServiceHandle]:
    """A single-node broker of our own for the length of the ``with``; stopped on the way out.

    Call it outside any running event loop (start-up probes the broker with ``asyncio.run``).
    """
    handle = start_broker(BrokerConfig(data_dir=data_dir))
    try:
        yield handle
    finally:
        stop_broker(handle)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def results_path(name: str, out: Path | None = None) -> Path:
    """``out`` when given, else ``bench/results/<name>-<YYYY-MM-DD>.json``."""
    if out is not None:
        return out
    return RESULTS_DIR / f"{name}-{dt.date.today().isoformat()}.json"


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return path


def run_and_record(
    name: str,
    out: Path | None,
    argv: Sequence[str] | None,
    run: Callable[[Path], dict[str, Any]],
    parameters: dict[str, Any],
) -> tuple[dict[str, Any], Path]:
    """Run a benchmark in a temporary folder and write its JSON report: when it started, the
    command, the machine, the load averages before and after, the parameters and the result.
    ``name`` is the module under bench/ (``outage_backlog``); returns (result, report path)."""
    started = dt.datetime.now(dt.UTC)
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        result = run(Path(tmp))
    report = {
        "benchmark": name,
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([f"python -m bench.{name}", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "load_average": {"start": load_start, "end": load_average()},
        "parameters": parameters,
        "result": result,
    }
    return result, write_json(results_path(name.replace("_", "-"), out), report)
