"""``sluice demo``: the whole pipeline on one machine, on embedded defaults.

Starts its own Kafka broker, creates the topics, runs preprocess, compute and postprocess as
separate processes (as in production), publishes a handful of the demo task's questions, prints
their answers as a table with a check of each, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from pipeline import admin
from pipeline.config import PACKAGE_ROOT, Settings
from pipeline.errors import SluiceError
from schemas.headers import SLUICE_REQUEST_ID, header_value, make_headers
from schemas.messages import ChatCompletion, decode_answer
from sluice.procs import StageProcess, stage_env

SAMPLES = (
    "What is 37 + 58?",
    "Reverse: planet",
    "Uppercase: kafka",
    "Spell 405 in Zorbish",
    "What is 9 + 90?",
    "Reverse: sluice",
)
STAGES = ("preprocess", "compute", "postprocess")


class DemoError(SluiceError):
    """The demo cannot run, or a stage it started died; the message says which and why."""

    fatal = True
    reason = "demo"


def check_model(settings: Settings) -> None:
    """Refuse to start anything when the model folder cannot serve."""
    needed = ["tokenizer.json", "tokenizer_config.json"]
    if settings.engine == "onnx":
        needed.append("genai_config.json")
    missing = [name for name in needed if not (settings.model_path / name).is_file()]
    if missing:
        raise DemoError(
            f"model folder {settings.model_path} lacks {', '.join(missing)} "
            "(SLUICE_MODEL_PATH; unset, it is the demo model that ships with Sluice)"
        )


def check_stages(procs: list[StageProcess]) -> None:
    """Raise DemoError when a stage process has exited: its answers would never come."""
    for proc in procs:
        code = proc.proc.poll() if proc.proc is not None else None
        if code is not None:
            lines = proc.log_path.read_text(errors="replace").strip().splitlines()
            last = f": {lines[-1]}" if lines else ""
            raise DemoError(
                f"the {proc.stage} stage exited with code {code}{last} (log: {proc.log_path})"
            )


def _checker() -> Callable[[str, str], bool]:
    """The demo task's own answer checker (models/demo/task.py)."""
    path = PACKAGE_ROOT / "models" / "demo" / "task.py"
    spec = importlib.util.spec_from_file_location("sluice_demo_task", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    check: Callable[[str, str], bool] = module.check
    return check


async def _publish(
    settings: Settings, questions: list[str], prefix: str = "demo"
) -> dict[str, tuple[str, float]]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    sent: dict[str, tuple[str, float]] = {}
    try:
        for i, q in enumerate(questions):
            rid = f"{prefix}-{i}"
            body = {"id": rid, "messages": [{"role": "user", "content": q}], "max_tokens": 32}
            sent[rid] = (q, time.monotonic())
            await producer.send_and_wait(
                settings.topics.prompts,
                orjson.dumps(body),
                key=f"conv-{i}".encode(),
                headers=make_headers("sluice.prompt", "demo", rid),
            )
    finally:
        await producer.stop()
    return sent


async def _answers(
    settings: Settings,
    n: int,
    within: float,
    prefix: str = "",
    procs: list[StageProcess] | None = None,
) -> dict[str, tuple[bytes, float]]:
    consumer = AIOKafkaConsumer(
        settings.topics.answers,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: dict[str, tuple[bytes, float]] = {}
    deadline = time.monotonic() + within
    try:
        while len(got) < n and time.monotonic() < deadline:
            check_stages(procs or [])
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    rid = header_value(list(rec.headers), SLUICE_REQUEST_ID)
                    if rid and rid.startswith(prefix) and rid not in got and rec.value is not None:
                        got[rid] = (rec.value, time.monotonic())
    finally:
        await consumer.stop()
    return got


def run_demo(console: Console, base: Settings) -> int:
    """Returns the number of wrong or missing answers (0 means the demo passed)."""
    check_model(base)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-demo-"))
    with console.status("starting a local Kafka broker (KRaft)"):
        broker = start_broker(BrokerConfig(data_dir=workdir / "kafka"))
    procs: list[StageProcess] = []
    try:
        settings = base.model_copy(
            update={"bootstrap_servers": broker.address, "state_dir": workdir / "state"}
        )
        settings.model_fields_set.update({"bootstrap_servers", "state_dir"})
        console.print(
            f"broker  [green]{broker.address}[/]   engine  [cyan]{settings.engine}[/]"
            f"   model  {settings.model_path}",
            soft_wrap=True,
        )
        asyncio.run(admin.create_topics(settings))
        groups = [settings.group_id(stage) for stage in STAGES]
        asyncio.run(admin.wait_for_coordinator(settings, groups))
        for stage in STAGES:
            log = workdir / f"{stage}.log"
            procs.append(StageProcess(stage, stage_env(settings), log).start())
        console.print(f"stages  {', '.join(STAGES)} (logs in {workdir})")
        with console.status("warming up: one request through every stage"):
            warm = asyncio.run(_publish(settings, ["Reverse: abc"], prefix="warmup"))
            asyncio.run(_answers(settings, len(warm), within=90, prefix="warmup-", procs=procs))
        sent = asyncio.run(_publish(settings, list(SAMPLES)))
        with console.status(f"waiting for {len(sent)} answers"):
            got = asyncio.run(_answers(settings, len(sent), within=90, prefix="demo-", procs=procs))
        return _report(console, settings, sent, got)
    finally:
        for proc in procs:
            proc.stop()
        stop_broker(broker)
        console.print("stopped the stages and the broker")


def _report(
    console: Console,
    settings: Settings,
    sent: dict[str, tuple[str, float]],
    got: dict[str, tuple[bytes, float]],
) -> int:
    check = _checker()
    echo = settings.engine == "echo"
    table = Table(title="Sluice demo: prompts in, answers out, over Kafka")
    for col in ("request", "prompt", "answer", "ok", "latency"):
        table.add_column(col)
    bad = 0
    for rid, (question, t_sent) in sent.items():
        if rid not in got:
            table.add_row(rid, question, "[red]no answer[/]", "✗", "-")
            bad += 1
            continue
        value, t_got = got[rid]
        answer = decode_answer(value)
        if isinstance(answer, ChatCompletion):
            text = answer.content
            ok = text == question if echo else check(question, text)
        else:
            text, ok = f"error: {answer.error.message}", False
        bad += 0 if ok else 1
        table.add_row(
            rid,
            question,
            text,
            "[green]✓[/]" if ok else "[red]✗[/]",
            f"{(t_got - t_sent) * 1000:.0f} ms",
        )
    console.print(table)
    if echo:
        console.print("(echo engine: each answer repeats its prompt; ✓ checks exactly that)")
    return bad
