"""Scenario drivers: the three stages as processes kept alive like a supervisor would, a load,
faults injected from outside, and the checker's verdict as one row of the results table."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from infra.process import ServiceHandle
from pipeline import admin
from pipeline.config import Settings
from sluice.procs import StageProcess, stage_env
from tests.chaos.checker import Verdict, check
from tests.chaos.hostile import Hostile, canary, hostile_records
from tests.chaos.raw import send_raw_batch

STAGES = ("preprocess", "compute", "postprocess")
RESTART_BACKOFF_S = 1.0
SUPERVISOR_RESTART = re.compile(r"worker \d+ exited with")


@dataclass
class Row:
    scenario: str
    sent: int
    answered: int
    duplicates: int
    dead_lettered: int
    lost: int
    canaries_lost: int
    restarts: int
    recovery_s: float

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.canaries_lost == 0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}


class Rig:
    """The stages as processes; a stage that exits is restarted after a short backoff.

    A stage named in ``supervised`` runs under ``sluice scale --stage <stage> --max-workers 1``
    instead (one worker, restarted by the supervisor with its own backoff), as an operator
    would run it; ``supervisor_restarts`` counts the restarts that supervisor logged."""

    def __init__(
        self, settings: Settings, logs: Path, *, supervised: tuple[str, ...] = (), **env: str
    ) -> None:
        self.settings = settings
        self.logs = logs
        self.env = env
        self.supervised = supervised
        self.procs: dict[str, StageProcess] = {}
        self.supervisors: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = 0
        self._keeper: asyncio.Task[None] | None = None

    def start(self, stage: str) -> None:
        log = self.logs / f"{stage}.log"
        self.procs[stage] = StageProcess(stage, stage_env(self.settings, **self.env), log).start()

    def supervise(self, stage: str) -> None:
        argv = ["-m", "sluice.cli.main", "scale", "--stage", stage, "--max-workers", "1"]
        with (self.logs / f"scale-{stage}.log").open("ab") as log:
            self.supervisors[stage] = subprocess.Popen(
                [sys.executable, *argv],
                env=stage_env(self.settings, **self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def supervisor_restarts(self) -> int:
        """Worker exits the supervisors logged ("<stage> worker N exited with ...")."""
        return sum(
            len(SUPERVISOR_RESTART.findall((self.logs / f"scale-{s}.log").read_text()))
            for s in self.supervisors
        )

    async def __aenter__(self) -> Rig:
        self.logs.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            if stage in self.supervised:
                self.supervise(stage)
            else:
                self.start(stage)
        self._keeper = asyncio.create_task(self._keep_loop(), name="chaos_keep_loop")
        return self

    async def _keep_loop(self) -> None:
        while True:
            await asyncio.sleep(RESTART_BACKOFF_S)
            for stage, proc in list(self.procs.items()):
                if proc.proc is not None and proc.proc.poll() is not None:
                    self.restarts += 1
                    self.start(stage)

    def kill(self, stage: str) -> None:
        proc = self.procs[stage].proc
        if proc is not None:
            proc.kill()

    async def __aexit__(self, *exc: object) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        for proc in self.procs.values():
            await asyncio.to_thread(proc.stop)
        for sup in self.supervisors.values():  # SIGTERM: it stops its workers cleanly
            sup.terminate()
            await asyncio.to_thread(sup.wait, 60)


async def send_prompts(settings: Settings, items: list[Hostile], canaries_each: int) -> list[str]:
    """Each item onto the prompts topic with a raw producer, then ``canaries_each`` canaries on
    the same partition; returns the canary ids."""
    topic = settings.topics.prompts
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", max_request_size=4 << 20
    )
    await producer.start()
    ids: list[str] = []
    try:
        for n, item in enumerate(items):
            partition = n % settings.partitions
            await send_raw_batch(producer, topic, partition, [(item.key, item.value, item.headers)])
            for c in range(canaries_each):
                cid = f"canary-{n * canaries_each + c}"
                await producer.send_and_wait(
                    topic, canary(n * canaries_each + c), key=b"canary", partition=partition,
                    headers=[("sluice-request-id", cid.encode())],
                )  # fmt: skip
                ids.append(cid)
    finally:
        await producer.stop()
    return ids


async def _settle(settings: Settings, expect: list[str], within: float) -> tuple[Verdict, float]:
    t0 = time.monotonic()
    while True:
        verdict = await check(settings, expect)
        if not verdict.lost or time.monotonic() - t0 > within:
            return verdict, time.monotonic() - t0
        await asyncio.sleep(2.0)


def _row(
    name: str, sent: list[str], canaries: list[str], v: Verdict, *, rig: Rig, rec: float
) -> Row:
    return Row(
        name,
        len(sent),
        v.answered,
        v.duplicates,
        len(v.dead_lettered),
        len(v.lost),
        len(v.lost & set(canaries)),
        rig.restarts + rig.supervisor_restarts,
        round(rec, 1),
    )


async def hostile(
    settings: Settings, logs: Path, *, name: str, kinds: tuple[str, ...], count: int, within: float
) -> Row:
    """``count`` hostile records of ``kinds``, each followed by two canaries."""
    items = list(hostile_records(kinds, count, max_prompt_bytes=settings.max_prompt_bytes))
    async with Rig(settings, logs) as rig:
        canaries = await send_prompts(settings, items, canaries_each=2)
        sent = [i.id for i in items] + canaries
        verdict, took = await _settle(settings, sent, within)
    return _row(name, sent, canaries, verdict, rig=rig, rec=took)


async def _load(settings: Settings, n: int, prefix: str, rate: float) -> list[str]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    ids = []
    try:
        for i in range(n):
            rid = f"{prefix}-{i}"
            await producer.send(
                settings.topics.prompts, canary(i).replace(b"canary-", f"{prefix}-".encode()),
                key=f"conv-{i % 13}".encode(), headers=[("sluice-request-id", rid.encode())],
            )  # fmt: skip
            ids.append(rid)
            if rate:
                await asyncio.sleep(1 / rate)
        await producer.flush()
    finally:
        await producer.stop()
    return ids


async def under_load(
    settings: Settings,
    logs: Path,
    *,
    name: str,
    n: int,
    rate: float,
    fault: Callable[[Rig], Awaitable[None]],
    within: float,
    supervised: tuple[str, ...] = (),
    **env: str,
) -> Row:
    """``n`` prompts at ``rate``/s while ``fault`` runs against the rig."""
    async with Rig(settings, logs, supervised=supervised, **env) as rig:
        load = asyncio.create_task(_load(settings, n, name, rate))
        await fault(rig)
        sent = await load
        verdict, took = await _settle(settings, sent, within)
    return _row(name, sent, sent, verdict, rig=rig, rec=took)


def kill_stages(times: int, every_s: float) -> Callable[[Rig], Awaitable[None]]:
    async def fault(rig: Rig) -> None:
        for i in range(times):
            await asyncio.sleep(every_s)
            rig.kill(STAGES[i % len(STAGES)])

    return fault


def engine_crash(
    fault_file: Path, after_s: float, for_s: float
) -> Callable[[Rig], Awaitable[None]]:
    """The echo engine fails every generation while ``fault_file`` exists."""

    async def fault(rig: Rig) -> None:
        await asyncio.sleep(after_s)
        await asyncio.to_thread(fault_file.write_text, "crash")
        await asyncio.sleep(for_s)
        await asyncio.to_thread(fault_file.unlink)

    return fault


async def first_answer(settings: Settings, within: float = 120.0) -> None:
    """Wait until the answers topic holds an answer: every stage is serving."""
    consumer = AIOKafkaConsumer(
        settings.topics.answers,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        t0 = time.monotonic()
        while not any((await consumer.getmany(timeout_ms=500)).values()):
            if time.monotonic() - t0 > within:
                raise RuntimeError(f"no answer within {within:.0f}s: the stages did not start")
    finally:
        await consumer.stop()


def engine_stall(
    stall_file: Path, after_s: float, for_s: float
) -> Callable[[Rig], Awaitable[None]]:
    """The echo engine makes no progress while ``stall_file`` exists; one generation that waits
    ``engine_stall_s`` is a stall: compute writes a crash report and exits."""

    async def fault(rig: Rig) -> None:
        await first_answer(rig.settings)  # compute is up (a supervisor starts it later)
        await asyncio.sleep(after_s)
        await asyncio.to_thread(stall_file.write_text, "stall")
        await asyncio.sleep(for_s)
        await asyncio.to_thread(stall_file.unlink)

    return fault


async def broker_restart(
    handle: ServiceHandle, data_dir: Path, settings: Settings, logs: Path, *, name: str,
    n: int, rate: float, hard: bool, within: float,
) -> tuple[Row, ServiceHandle]:  # fmt: skip
    """Kill (SIGKILL when ``hard``, else SIGTERM) the broker mid-stream and start it again on
    the same ports and data."""
    box = {"handle": handle}

    async def fault(rig: Rig) -> None:
        import os
        import signal

        await asyncio.sleep(3.0)
        os.kill(box["handle"].pid, signal.SIGKILL if hard else signal.SIGTERM)
        await asyncio.sleep(2.0)
        cfg = BrokerConfig(port=handle.port, controller_port=handle.extra_port, data_dir=data_dir)
        box["handle"] = await asyncio.to_thread(start_broker, cfg)

    row = await under_load(settings, logs, name=name, n=n, rate=rate, fault=fault, within=within)
    return row, box["handle"]


async def fresh_topics(settings: Settings) -> Settings:
    await admin.create_topics(settings)
    return settings


__all__ = [
    "Rig",
    "Row",
    "broker_restart",
    "engine_crash",
    "engine_stall",
    "fresh_topics",
    "hostile",
    "kill_stages",
    "stop_broker",
    "under_load",
]
