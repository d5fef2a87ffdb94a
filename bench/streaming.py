"""Streaming through the whole pipeline: time to first token at the HTTP client, and what the
deltas cost.

On a private broker it starts the three stages and the gateway as processes (as
``bench.gateway_load`` does), then, from one aiohttp session:

* **TTFT**: at each concurrency level (default 1, 50, 200), waves of that many
  ``stream=true`` chat completions at once; a request's TTFT is request sent -> the first SSE
  ``chat.completion.chunk`` with non-empty ``delta.content`` read by the client (gateway ->
  Kafka -> preprocess -> compute -> deltas on the reply partition -> gateway -> SSE). Level 1
  sends ``--samples`` requests one after another, the others ``ceil(samples / level)`` waves.
* **engine TTFT**: the engine's own time to first token for the same requests (compute's
  ``ttft_s`` in the answer's ``sluice-timings`` header, read back from the answers topic), and
  compute's queue time, so the Kafka hops and the waiting can be told apart.
* **deltas overhead**: answers/s of a wave of ``--overhead-requests`` at once with
  ``stream=true`` vs without, alternated (A, B, A, B, ...) ``--rounds`` times each, so the
  machine's drift hits both.

The echo engine (default) makes its tokens ``--token-delay-ms`` apart
(``SLUICE_ECHO_TOKEN_DELAY_MS``) and echoes a prompt of ``--max-tokens`` words, so a generation
takes ``max_tokens x token delay`` and streams many deltas. ``--engine onnx`` runs the demo model
(``models/demo/cpu-int8``) on held-out questions, answers checked.

    python -m bench.streaming [--engine echo|onnx] [--levels 1,50,200] [--samples 40]
        [--max-tokens 48] [--token-delay-ms 10] [--overhead-requests 200] [--rounds 3]
        [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
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
from bench.gateway_load import (
    TRANSPORT_ERRORS,
    AiohttpSender,
    raise_open_files_limit,
    start_gateway,
    wait_ready,
)
from bench.topics import read_topics, timing
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
PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str | None
    status: int | None  # None: no HTTP response
    ttft_s: float | None  # first content chunk; None when none came
    total_s: float
    chunks: int = 0
    complete: bool = False  # [DONE] (stream) or a chat.completion (plain)
    correct: bool = False
    error: str | None = None  # the OpenAI error's code or type


def error_of(data: bytes) -> str:
    try:
        err = orjson.loads(data)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unparsable"
    return str(err.get("code") or err.get("type"))


def question(i: int, engine: str, words: int) -> str:
    if engine == "echo":  # echoed back a token at a time: the demo tokenizer's is one byte
        return "".join(chr(97 + (i + n) % 26) for n in range(words))
    return task.held_out(i + 1, seed=2000)[i].question


def body(text: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL.name,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def stream_one(
    session: aiohttp.ClientSession, url: str, text: str, max_tokens: int, check: bool
) -> Outcome:
    t0 = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    try:
        async with session.post(url, json=body(text, max_tokens, True)) as resp:
            rid = resp.headers.get("x-request-id")
            if resp.status != 200:
                error = error_of(await resp.read())
                return Outcome(rid, resp.status, None, time.monotonic() - t0, error=error)
            done = False
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data.startswith(b'{"error"'):
                    return Outcome(rid, 200, first, time.monotonic() - t0, error=error_of(data))
                if data == b"[DONE]":
                    done = True
                    break
                event = orjson.loads(data)
                for choice in event.get("choices", ()):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        if first is None:
                            first = time.monotonic() - t0
                        parts.append(content)
    except TRANSPORT_ERRORS:
        return Outcome(None, None, first, time.monotonic() - t0)
    content = "".join(parts)
    ok = task.check(text, content) if check else bool(content)
    return Outcome(rid, 200, first, time.monotonic() - t0, len(parts), done, ok)


async def plain_one(
    session: aiohttp.ClientSession, url: str, text: str, max_tokens: int, check: bool
) -> Outcome:
    t0 = time.monotonic()
    try:
        async with session.post(url, json=body(text, max_tokens, False)) as resp:
            rid = resp.headers.get("x-request-id")
            raw = await resp.read()
            status = resp.status
    except TRANSPORT_ERRORS:
        return Outcome(None, None, None, time.monotonic() - t0)
    total = time.monotonic() - t0
    if status != 200:
        return Outcome(rid, status, None, total, error=error_of(raw))
    content = orjson.loads(raw)["choices"][0]["message"]["content"]
    ok = task.check(text, content) if check else bool(content)
    return Outcome(rid, 200, None, total, 1, True, ok)


def pct(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": (round(percentile(values, q) * 1000, 1) if values else None) for q in (50, 99)}


def level_summary(
    outcomes: list[Outcome], engine_ttft: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    engine = [engine_ttft[o.request_id] for o in outcomes if o.request_id in engine_ttft]
    return {
        "requests": len(outcomes),
        "streamed": sum(o.complete for o in outcomes),
        "correct": sum(o.correct for o in outcomes),
        "errors": sum(o.status is not None and o.status != 200 for o in outcomes),
        "lost": sum(o.status is None for o in outcomes),
        "error_kinds": dict(Counter(o.error for o in outcomes if o.error)),
        "mean_chunks": round(sum(o.chunks for o in outcomes) / max(1, len(outcomes)), 1),
        "ttft_ms": pct(ttfts),
        "total_ms": pct([o.total_s for o in outcomes if o.status == 200]),
        "engine_ttft_ms": pct([e[0] for e in engine]),
        "compute_queue_ms": pct([e[1] for e in engine]),
    }


async def measure(
    settings: Settings, gateway: Any, args: argparse.Namespace
) -> tuple[dict[str, list[Outcome]], list[dict[str, Any]], dict[str, tuple[float, float]]]:
    base = f"http://{settings.gateway_host}:{settings.gateway_port}"
    url = base + PATH
    biggest = max(*args.levels, args.overhead_requests)
    sender = AiohttpSender(base, biggest + 16, settings.request_timeout_s + 60)
    session = sender.session
    check = args.engine == "onnx"
    words = args.max_tokens

    def text(i: int) -> str:
        return question(i, args.engine, words)

    levels: dict[str, list[Outcome]] = {}
    overhead: list[dict[str, Any]] = []
    try:
        await wait_ready(sender, gateway)
        t0 = time.monotonic()
        while (await stream_one(session, url, text(0), args.max_tokens, False)).status != 200:
            if time.monotonic() - t0 > 180:
                raise RuntimeError("no streamed answer within 180 s of start-up")
            await asyncio.sleep(0.5)
        for _ in range(3):  # warm every partition's path
            await asyncio.gather(*(stream_one(session, url, text(i), 8, False) for i in range(6)))
        console.print(f"warm after {time.monotonic() - t0:.1f}s")
        n = 0
        for level in args.levels:
            waves = args.samples if level == 1 else math.ceil(args.samples / level)
            got: list[Outcome] = []
            for _ in range(waves):
                wave = [text(n + i) for i in range(level)]
                n += level
                got += await asyncio.gather(
                    *(stream_one(session, url, q, args.max_tokens, check) for q in wave)
                )
            levels[str(level)] = got
            console.print(f"level {level}: {len(got)} streams")
        for r in range(args.rounds):
            for stream in (True, False) if r % 2 == 0 else (False, True):
                wave = [text(n + i) for i in range(args.overhead_requests)]
                n += args.overhead_requests
                one = stream_one if stream else plain_one
                w0 = time.monotonic()
                outs = await asyncio.gather(
                    *(one(session, url, q, args.max_tokens, check) for q in wave)
                )
                wall = time.monotonic() - w0
                answered = sum(o.status == 200 and o.complete for o in outs)
                kinds = Counter(o.error for o in outs if o.error)
                overhead.append(
                    {
                        "round": r,
                        "stream": stream,
                        "answered": answered,
                        "correct": sum(o.correct for o in outs),
                        "error_kinds": dict(kinds),
                        "wall_s": round(wall, 3),
                        "answers_per_s": round(answered / wall, 2),
                    }
                )
                console.print(f"overhead round {r} stream={stream}: {answered / wall:.1f}/s")
    finally:
        await sender.close()
    answers = await read_topics(settings.bootstrap_servers, [settings.topics.answers])
    engine: dict[str, tuple[float, float]] = {}
    for rec in answers:
        ttft, queue = timing(rec, "ttft_s"), timing(rec, "queue_s")
        if rec.request_id is not None and ttft is not None:
            engine[rec.request_id] = (ttft, queue or 0.0)
    return levels, overhead, engine


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
            echo_token_delay_ms=args.token_delay_ms,
        )
        run_async(admin.create_topics(settings))
        procs = [StageProcess(s, stage_env(settings), root / f"{s}.log").start() for s in STAGES]
        gateway = start_gateway(settings, root / "gateway.log")
        try:
            levels, overhead, engine = run_async(measure(settings, gateway, args))
        except RuntimeError:
            for name in (*STAGES, "gateway"):
                console.print(f"--- {name}\n{(root / f'{name}.log').read_text()[-3000:]}")
            raise
        finally:
            gateway.terminate()
            gateway.wait(timeout=60)
            for proc in procs:
                proc.stop()
    on = [o["answers_per_s"] for o in overhead if o["stream"]]
    off = [o["answers_per_s"] for o in overhead if not o["stream"]]
    return {
        "levels": {k: level_summary(v, engine) for k, v in levels.items()},
        "overhead": {
            "rounds": overhead,
            "stream_on_mean": round(sum(on) / len(on), 2) if on else None,
            "stream_off_mean": round(sum(off) / len(off), 2) if off else None,
            "ratio": round(sum(on) / sum(off), 3) if on and off and sum(off) else None,
        },
    }


def print_tables(result: dict[str, Any], engine: str) -> None:
    table = Table(title=f"time to first token at the HTTP client ({engine} engine)")
    for col in ("streams", "requests", "streamed", "chunks/req", "TTFT p50", "TTFT p99",
                "total p50", "engine TTFT p50", "compute queue p50"):  # fmt: skip
        table.add_column(col, justify="right")
    for level, s in result["levels"].items():
        table.add_row(
            level,
            str(s["requests"]),
            str(s["streamed"]),
            str(s["mean_chunks"]),
            f"{s['ttft_ms']['p50']} ms",
            f"{s['ttft_ms']['p99']} ms",
            f"{s['total_ms']['p50']} ms",
            f"{s['engine_ttft_ms']['p50']} ms",
            f"{s['compute_queue_ms']['p50']} ms",
        )
    console.print(table)
    ov = result["overhead"]
    table = Table(title="deltas overhead: answers/s, same wave with stream on vs off")
    for col in ("round", "stream", "answered", "wall", "answers/s"):
        table.add_column(col, justify="right")
    for r in ov["rounds"]:
        table.add_row(
            str(r["round"]), "on" if r["stream"] else "off", str(r["answered"]),
            f"{r['wall_s']:.2f} s", f"{r['answers_per_s']:.1f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"stream on / off: {ov['ratio']}x")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streaming",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--engine", choices=("echo", "onnx"), default="echo")
    parser.add_argument("--model", type=Path, default=MODEL, help="model folder")
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 50, 200],
        help="concurrent streams, comma-separated",
    )
    parser.add_argument("--samples", type=int, default=40, help="requests per level (at least)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--token-delay-ms", type=float, default=10.0, help="echo engine only")
    parser.add_argument("--overhead-requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs for the overhead")
    parser.add_argument("--timeout", type=float, default=120.0, help="gateway request timeout")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = dt.datetime.now(dt.UTC)
    load_start = load_average()
    raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        result = run(args, Path(tmp))
    print_tables(result, args.engine)
    report = {
        "benchmark": "streaming",
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m bench.streaming", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(),
        "load_average": {"start": load_start, "end": load_average()},
        "parameters": {**vars(args), "model": str(args.model), "out": str(args.out)},
        "result": result,
    }
    path = write_json(results_path(f"streaming-{args.engine}", args.out), report)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
