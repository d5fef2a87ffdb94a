"""The whole pipeline on a GPU host: broker, preprocess, compute, postprocess as processes.

A closed-loop load generator keeps ``c`` prompts in flight (a new one as each answer lands) at
each concurrency level, and reports tokens/s of answers, time to first token and end-to-end
latency (p50/p99); the same loop over ``OnnxEngine`` alone, in this process, gives the
engine-only figure of the same lease for the ratio.

    python -m bench.gpu_pipeline --model /tmp/gpu/fp16-sluice --label today --out run.json
    python -m bench.gpu_pipeline --model M --engine-only      # the engine alone

Prompts are rendered by the model's chat template and padded to ``--prompt`` tokens; every
request asks for ``--new`` tokens. Time to first token end to end is read off each answer's
``sluice-timings`` header: the first token's wall-clock moment (generated_at - compute_s -
queue_s + ttft_s, all stamped by compute) minus the moment the prompt was sent; every clock is
this host's. docs/BENCHMARKS.md says how to get here (bench/gpu/pack.sh, install.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import kafka_broker, machine, percentile, write_json
from pipeline import admin
from pipeline.config import Settings
from schemas.headers import SLUICE_REQUEST_ID, SLUICE_TIMINGS, header_value, make_headers
from sluice.procs import StageProcess, stage_env

LEVELS = (1, 16, 64, 128, 256, 512)
STAGES = ("preprocess", "compute", "postprocess")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def profiled(out: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``sluice run compute`` under cProfile (the event-loop thread), written at exit."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "sluice.cli.main"]
    with log_path.open("ab") as log:
        return subprocess.Popen([*cmd, "run", "compute"], env=env, stdout=log, stderr=log)


def prompt_text(model: Path, tokens: int) -> tuple[str, list[int]]:
    """A user message whose chat-template rendering is exactly ``tokens`` ids (or just over)."""
    from stages.text import TextModel

    text = TextModel.load(model)
    words: list[str] = []
    ids: list[int] = []
    i = 0
    while len(ids) < tokens:
        words.append(f"w{i % 50}")
        i += 1
        rendered = text.render([{"role": "user", "content": " ".join(words)}])
        ids = text.encode(rendered)
    return " ".join(words), ids


@dataclass
class Level:
    """What one concurrency level measured."""

    concurrency: int
    window_s: float
    answers: int = 0
    tokens: int = 0
    errors: int = 0
    lost: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "window_s": round(self.window_s, 3),
            "answers": self.answers,
            "tokens": self.tokens,
            "tok_s": round(self.tokens / self.window_s, 1) if self.window_s else 0.0,
            "errors": self.errors,
            "lost": self.lost,
            "ttft_ms": {f"p{q}": round(percentile(self.ttft_ms, q), 1) for q in (50, 99)},
            "e2e_ms": {f"p{q}": round(percentile(self.e2e_ms, q), 1) for q in (50, 99)},
        }


Sender = Callable[[str], Awaitable[None]]


class ClosedLoop:
    """Keeps ``concurrency`` requests in flight; counts what finishes inside the window."""

    def __init__(self, send: Sender, concurrency: int, warmup_s: float, window_s: float) -> None:
        self.send = send
        self.concurrency = concurrency
        self.warmup_s = warmup_s
        self.window_s = window_s
        self.sent: dict[str, tuple[float, float]] = {}  # id -> (perf_counter, unix time)
        self.done: set[str] = set()
        self.level = Level(concurrency, window_s)
        self._n = 0
        self._tag = uuid.uuid4().hex[:6]
        self._start = 0.0
        self._stop_sending = False
        self._drained = asyncio.Event()

    async def _next(self) -> None:
        if self._stop_sending:
            if len(self.done) >= len(self.sent):
                self._drained.set()
            return
        rid = f"c{self.concurrency}-{self._tag}-{self._n}"
        self._n += 1
        self.sent[rid] = (time.perf_counter(), time.time())
        await self.send(rid)

    async def finished(
        self, rid: str, tokens: int, first_token_at: float | None, err: bool
    ) -> None:
        if rid not in self.sent or rid in self.done:
            return
        self.done.add(rid)
        now = time.perf_counter()
        sent_perf, sent_wall = self.sent[rid]
        in_window = (
            self._start + self.warmup_s <= now <= self._start + self.warmup_s + self.window_s
        )
        if in_window:
            self.level.answers += 1
            self.level.tokens += tokens
            self.level.errors += int(err)
            self.level.e2e_ms.append((now - sent_perf) * 1000)
            if first_token_at is not None:
                self.level.ttft_ms.append((first_token_at - sent_wall) * 1000)
        await self._next()

    async def run(self, drain_s: float = 120.0) -> Level:
        self._start = time.perf_counter()
        for _ in range(self.concurrency):
            await self._next()
        await asyncio.sleep(self.warmup_s + self.window_s)
        self._stop_sending = True
        if len(self.done) < len(self.sent):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await self._drained.wait()
        self.level.lost = len(self.sent) - len(self.done)
        return self.level


# ---- through Kafka -------------------------------------------------------------------------


def first_token_at(timings: str | None) -> float | None:
    if not timings:
        return None
    t = orjson.loads(timings)
    try:
        return (
            float(t["generated_at"])
            - float(t["compute_s"])
            - float(t["queue_s"])
            + float(t["ttft_s"])
        )
    except (KeyError, TypeError, ValueError):
        return None


async def wait_ready(procs: Sequence[tuple[StageProcess, int]], within: float = 600.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        for proc, port in procs:
            while True:
                if proc.proc is not None and proc.proc.poll() is not None:
                    raise RuntimeError(f"{proc.stage} exited during start-up:\n{proc.log()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{proc.stage} not ready in {within:.0f}s:\n{proc.log()}")
                await asyncio.sleep(0.5)


async def pipeline_levels(
    args: argparse.Namespace, bootstrap: str, state: Path
) -> list[dict[str, Any]]:
    settings = Settings(
        bootstrap_servers=bootstrap,
        topic_prefix=f"gpu-{uuid.uuid4().hex[:6]}.",
        model_path=args.model,
        engine="onnx",
        partitions=args.partitions,
        state_dir=state,
        max_in_flight=max(2048, 2 * max(args.levels)),
        engine_stall_s=120.0,
        batch_max_wait_ms=args.batch_wait_ms,
    )
    await admin.create_topics(settings)
    text, ids = prompt_text(args.model, args.prompt)
    log(f"prompt: {len(ids)} tokens after the chat template")
    procs: list[tuple[StageProcess, int]] = []
    counts = {"preprocess": args.cpu_workers, "compute": args.workers, "postprocess": 1}
    for stage in STAGES:
        for i in range(counts[stage]):
            port = free_port()
            env = stage_env(settings, SLUICE_HTTP_PORT=str(port), SLUICE_INSTANCE_ID=str(i))
            log_path = state / f"{stage}-{i}.log"
            proc = StageProcess(stage, env, log_path)
            if args.profile is not None and stage == "compute" and i == 0:
                proc.proc = profiled(args.profile / "compute.prof", env, log_path)
            else:
                proc.start()
            procs.append((proc, port))
    consumer = AIOKafkaConsumer(
        settings.topics.answers,
        **settings.kafka_common(),
        group_id=None,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        fetch_max_wait_ms=5,
    )
    producer = AIOKafkaProducer(**settings.kafka_common(), acks="all", linger_ms=1)
    await consumer.start()
    await producer.start()
    loop: ClosedLoop | None = None

    async def send(rid: str) -> None:
        body: dict[str, Any] = {"id": rid, "messages": [{"role": "user", "content": text}]}
        body |= {"max_tokens": args.new, "temperature": 0}
        await producer.send(
            settings.topics.prompts,
            orjson.dumps(body),
            key=rid.encode(),
            headers=make_headers("sluice.prompt", "bench", rid),
        )

    async def collect() -> None:
        while True:
            data = await consumer.getmany(timeout_ms=20)
            for messages in data.values():
                for m in messages:
                    headers = list(m.headers or ())
                    rid = header_value(headers, SLUICE_REQUEST_ID) or ""
                    err = (header_value(headers, "ce_type") or "").endswith(".error")
                    tokens = 0
                    if not err:
                        tokens = int(orjson.loads(m.value)["usage"]["completion_tokens"])
                    first = first_token_at(header_value(headers, SLUICE_TIMINGS))
                    if loop is not None:
                        await loop.finished(rid, tokens, first, err)

    collector = asyncio.create_task(collect())
    rows: list[dict[str, Any]] = []
    try:
        log(f"starting {len(procs)} stage processes")
        await wait_ready(procs)
        await asyncio.sleep(2.0)  # the answers consumer has its assignment by now
        for c in args.levels:
            loop = ClosedLoop(send, c, args.warmup, args.seconds)
            level = await loop.run()
            rows.append(level.summary() | {"path": "pipeline"})
            log(f"pipeline c={c}: {rows[-1]}")
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        await producer.stop()
        await consumer.stop()
        for proc, _ in procs:
            await asyncio.to_thread(proc.stop)
    return rows


# ---- the engine alone ----------------------------------------------------------------------


async def engine_levels(args: argparse.Namespace) -> list[dict[str, Any]]:
    from schemas.messages import SamplingParams
    from stages.engines.base import GenerationRequest
    from stages.engines.onnx import OnnxEngine

    _, ids = prompt_text(args.model, args.prompt)
    engine = OnnxEngine(args.model, stall_s=120.0)
    await engine.start()
    loop: ClosedLoop | None = None
    tasks: set[asyncio.Task[None]] = set()

    async def one(rid: str) -> None:
        sent = time.time()
        gen = await engine.generate(
            GenerationRequest(rid, ids, SamplingParams(max_tokens=args.new, temperature=0))
        )
        assert loop is not None
        await loop.finished(rid, len(gen.output_ids), sent + gen.ttft_s, False)

    async def send(rid: str) -> None:
        task = asyncio.create_task(one(rid))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    rows: list[dict[str, Any]] = []
    try:
        for c in args.levels:
            loop = ClosedLoop(send, c, args.warmup, args.seconds)
            rows.append((await loop.run()).summary() | {"path": "engine"})
            log(f"engine c={c}: {rows[-1]}")
    finally:
        await engine.close()
    return rows


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", type=Path, required=True, help="built model folder")
    p.add_argument("--label", default="", help="a name for this build / setting in the JSON")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per request")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the window")
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    p.add_argument("--workers", type=int, default=1, help="compute processes")
    p.add_argument("--cpu-workers", type=int, default=2, help="preprocess processes")
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--batch-wait-ms", type=int, default=20, help="SLUICE_BATCH_MAX_WAIT_MS")
    p.add_argument("--engine-only", action="store_true", help="the engine alone, no Kafka")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile", type=Path, default=None, help="cProfile compute into DIR")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in str(args.levels).split(",") if x]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.is_dir():
        print(f"error: no model folder at {args.model}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"machine": machine(), "label": args.label, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}  # fmt: skip
    if args.engine_only:
        result["levels"] = asyncio.run(engine_levels(args))
    else:
        with tempfile.TemporaryDirectory(prefix="sluice-gpu-") as tmp:
            state = Path(tmp)
            with kafka_broker(state / "kafka") as broker:
                result["levels"] = asyncio.run(pipeline_levels(args, broker.address, state))
    if args.out is not None:
        write_json(args.out, result)
    for row in result["levels"]:
        print(
            f"{row['path']:8} c={row['concurrency']:4}  {row['tok_s']:>9,.0f} tok/s  "
            f"ttft p50 {row['ttft_ms']['p50']:>7} p99 {row['ttft_ms']['p99']:>7} ms  "
            f"e2e p50 {row['e2e_ms']['p50']:>7} p99 {row['e2e_ms']['p99']:>7} ms  "
            f"errors {row['errors']} lost {row['lost']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
