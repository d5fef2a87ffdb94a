"""Gateway load: N concurrent chat completions through gateway -> Kafka -> stages -> gateway.

On a private broker it starts the three stages (``sluice run``, the demo model by default) and
the gateway (``python -m stages.gateway``) as processes, warms the path up with a few requests,
then sends all N requests at once from one HTTP client session (one connection each) and
waits for every response. The client is aiohttp by default: ``httpx.AsyncClient`` (``--client
httpx``) spends most of the time in its own connection pool at this concurrency (1,000
requests to a no-op uvicorn endpoint: 21 s with httpx, 1.2 s with aiohttp on the 2-core
machine), which would be measured as gateway latency. A request is:

* answered: HTTP 200 with a ``chat.completion`` (its content checked with the demo task);
* an error: any other HTTP status with an OpenAI error body (504 if the gateway's
  ``SLUICE_REQUEST_TIMEOUT_S`` ran out, 503 for an open breaker, ...);
* lost: no HTTP response at all (connection error, or the client's own timeout, which is the
  gateway's timeout plus a minute).

Latency is request sent -> response received, over answered and error responses. The gateway's
own mean (handler start -> response, from its ``/metrics``) and each process's CPU seconds
during the load are recorded too: on a small machine most of the latency is waiting for a CPU.

    .venv/bin/python -m bench.gateway_load [--requests 1000] [--max-tokens 24]
        [--timeout 300] [--engine onnx|echo] [--client aiohttp|httpx] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
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
from infra.process import free_port
from models.demo import task
from pipeline import admin
from pipeline.aio import run_async
from pipeline.config import Settings
from sluice.procs import StageProcess, stage_env

console = Console()

MODEL = REPO_ROOT / "models" / "demo" / "cpu-int8"
STAGES = ("preprocess", "compute", "postprocess")
PARTITIONS = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | None  # None: lost (no HTTP response)
    latency_s: float
    correct: bool = False
    error: str | None = None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_open_files_limit() -> int:
    """One socket per request on both sides: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_gateway(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stages.gateway"],
            env=stage_env(settings),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


class Sender(Protocol):
    """POST a JSON body, or GET; returns (status, parsed JSON or text)."""

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]: ...

    async def get(self, path: str) -> tuple[int, str]: ...

    async def close(self) -> None: ...


class AiohttpSender:
    def __init__(self, base_url: str, connections: int, timeout_s: float) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        async with self.session.post(self.base_url + path, json=payload) as response:
            return response.status, await response.json(content_type=None)

    async def get(self, path: str) -> tuple[int, str]:
        async with self.session.get(self.base_url + path) as response:
            return response.status, await response.text()

    async def close(self) -> None:
        await self.session.close()


class HttpxSender:
    def __init__(self, base_url: str, connections: int, timeout_s: float) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        timeout = httpx.Timeout(timeout_s, connect=60.0, pool=timeout_s)
        self.client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        response = await self.client.post(path, json=payload)
        return response.status_code, response.json()

    async def get(self, path: str) -> tuple[int, str]:
        response = await self.client.get(path)
        return response.status_code, response.text

    async def close(self) -> None:
        await self.client.aclose()


SENDERS: dict[str, type[AiohttpSender] | type[HttpxSender]] = {
    "aiohttp": AiohttpSender,
    "httpx": HttpxSender,
}
TRANSPORT_ERRORS = (aiohttp.ClientError, httpx.HTTPError, TimeoutError, OSError)


async def wait_ready(sender: Sender, gateway: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise RuntimeError(f"the gateway exited with {gateway.returncode}")
        try:
            if (await sender.get("/readyz"))[0] == 200:
                return
        except TRANSPORT_ERRORS:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the gateway was not ready within 90 s")


async def warm_up(sender: Sender, max_tokens: int) -> float:
    """Requests one at a time until one is answered (stages joined their groups, warm)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        status, _ = await sender.post("/v1/chat/completions", body("What is 1 + 1?", max_tokens))
        if status == 200:
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    raise RuntimeError("no request was answered within 120 s of start-up")


def body(question: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL.name,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
    }


async def one(sender: Sender, question: str, max_tokens: int) -> Outcome:
    t0 = time.monotonic()
    try:
        status, data = await sender.post("/v1/chat/completions", body(question, max_tokens))
    except TRANSPORT_ERRORS as exc:
        return Outcome(None, time.monotonic() - t0, error=type(exc).__name__)
    latency = time.monotonic() - t0
    if status != 200:
        return Outcome(status, latency, error=data["error"]["type"])
    content = data["choices"][0]["message"]["content"]
    return Outcome(200, latency, correct=task.check(question, content))


async def load(
    settings: Settings,
    gateway: subprocess.Popen[bytes],
    args: argparse.Namespace,
    pids: dict[str, int],
) -> tuple[list[Outcome], float, float, str, dict[str, float]]:
    base_url = f"http://{settings.gateway_host}:{settings.gateway_port}"
    n = args.requests
    questions = [ex.question for ex in task.held_out(n, seed=1000)]
    sender = SENDERS[args.client](base_url, n + 16, args.timeout + 60)
    try:
        await wait_ready(sender, gateway)
        warm = await warm_up(sender, args.max_tokens)
        console.print(f"warm after {warm:.1f}s; sending {n} requests at once ({args.client})")
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(one(sender, q, args.max_tokens) for q in questions))
        wall = time.monotonic() - t0
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        metrics = (await sender.get("/metrics"))[1]
    finally:
        await sender.close()
    cpu = {
        name: round(after - before, 2)
        for name, after in cpu_after.items()
        if after is not None and (before := cpu_before[name]) is not None
    }
    return list(outcomes), wall, warm, metrics, cpu


def gateway_counters(metrics: str) -> dict[str, float]:
    """The gateway's own counters of its reply side, from its /metrics text."""
    wanted = (
        "sluice_gateway_answers_total",
        "sluice_gateway_timeouts_total",
        'sluice_gateway_request_seconds_sum{endpoint="/v1/chat/completions"}',
        'sluice_gateway_request_seconds_count{endpoint="/v1/chat/completions"}',
    )
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def summarize(outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    answered = [o for o in outcomes if o.status == 200]
    errors = [o for o in outcomes if o.status is not None and o.status != 200]
    lost = [o for o in outcomes if o.status is None]
    latencies = [o.latency_s for o in outcomes if o.status is not None]
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "errors": len(errors),
        "lost": len(lost),
        "correct": sum(o.correct for o in answered),
        "error_statuses": dict(Counter(str(o.status) for o in errors)),
        "lost_reasons": dict(Counter(o.error or "?" for o in lost)),
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(outcomes) / wall, 2) if wall > 0 else None,
        "latency_s": {f"p{q}": round(percentile(latencies, q), 4) for q in (50, 90, 99)}
        | {"max": round(max(latencies, default=float("nan")), 4)},
    }


def print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"gateway load: {result['requests']} concurrent requests")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("answered (200)", str(result["answered"]))
    table.add_row("  of which correct", str(result["correct"]))
    errors = ", ".join(f"{k}: {v}" for k, v in result["error_statuses"].items()) or "-"
    table.add_row("errors (OpenAI error)", f"{result['errors']} ({errors})")
    table.add_row("lost (no response)", str(result["lost"]))
    for key, value in result["latency_s"].items():
        table.add_row(f"latency {key}", f"{value * 1000:,.0f} ms")
    table.add_row("wall time", f"{result['wall_s']:.1f} s")
    table.add_row("throughput", f"{result['throughput_rps']:.1f} req/s")
    if "gateway_side_mean_s" in result:
        table.add_row("gateway-side mean", f"{result['gateway_side_mean_s'] * 1000:,.0f} ms")
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in result["cpu_s_during_load"].items())
    table.add_row("CPU s during the load", cpu)
    console.print(table)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    with kafka_broker(root / "kafka") as broker:
        settings = Settings(
            bootstrap_servers=broker.address,
            topic_prefix="bench.",
            partitions=PARTITIONS,
            state_dir=root / "state",
            model_path=args.model,
            engine=args.engine,
            gateway_port=free_port(),
            request_timeout_s=args.timeout,
        )
        run_async(admin.create_topics(settings))
        procs = [StageProcess(s, stage_env(settings), root / f"{s}.log").start() for s in STAGES]
        gateway = start_gateway(settings, root / "gateway.log")
        pids = {
            "bench client": os.getpid(),
            "gateway": gateway.pid,
            "kafka": broker.pid,
            **{p.stage: p.proc.pid for p in procs if p.proc is not None},
        }
        try:
            outcomes, wall, warm, metrics, cpu = run_async(load(settings, gateway, args, pids))
        except RuntimeError:
            for name in (*STAGES, "gateway"):
                console.print(f"--- {name}\n{(root / f'{name}.log').read_text()[-3000:]}")
            raise
        finally:
            gateway.terminate()
            gateway.wait(timeout=60)
            for proc in procs:
                proc.stop()
    result = summarize(outcomes, wall)
    result["warm_up_s"] = round(warm, 2)
    counters = gateway_counters(metrics)
    result["gateway_counters"] = counters
    served = counters.get('sluice_gateway_request_seconds_count{endpoint="/v1/chat/completions"}')
    if served:
        total = counters['sluice_gateway_request_seconds_sum{endpoint="/v1/chat/completions"}']
        result["gateway_side_mean_s"] = round(total / served, 4)
    result["cpu_s_during_load"] = cpu
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=1000, help="concurrent requests")
    parser.add_argument("--max-tokens", type=int, default=24, help="per request")
    parser.add_argument("--timeout", type=float, default=300.0, help="gateway request timeout")
    parser.add_argument("--model", type=Path, default=MODEL, help="model folder")
    parser.add_argument("--engine", choices=("onnx", "echo"), default="onnx")
    parser.add_argument(
        "--client", choices=tuple(SENDERS), default="aiohttp", help="HTTP client library"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = dt.datetime.now(dt.UTC)
    load_start = load_average()
    open_files = raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        console.print("starting a Kafka broker of our own, the three stages and the gateway")
        result = run(args, Path(tmp))
    print_table(result)
    report = {
        "benchmark": "gateway_load",
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m bench.gateway_load", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(),
        "load_average": {"start": load_start, "end": load_average()},
        "open_files_limit": open_files,
        "parameters": {
            **vars(args),
            "model": str(args.model),
            "out": str(args.out) if args.out else None,
            "partitions": PARTITIONS,
        },
        "result": result,
    }
    path = write_json(results_path("gateway", args.out), report)
    console.print(f"wrote {path}")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
