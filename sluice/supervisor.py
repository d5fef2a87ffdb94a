"""``sluice scale``: run the stages as worker processes and follow the autoscaler.

Every second the supervisor reads each stage's consumer-group lag on its input topic and, for a
stage that reads it, on the batch lane (and, for a policy with a token threshold, the
``sluice_compute_pending_tokens`` its workers report on ``/metrics``), feeds the stage's
``StageScaler``, and starts workers (``sluice run <stage>``) or stops the newest ones with
SIGTERM (they finish in-flight work, commit and leave the group: scale-in loses nothing). A
worker that dies is restarted with exponential backoff; one that died without a crash report of
its own gets one from the supervisor, and a stage that keeps dying is reported as crash-looping
and backed off (``sluice.deaths``). Each worker gets a stable slot number as
``SLUICE_INSTANCE_ID`` (exactly-once stages need it), and, with ``cpu_affinity``, is pinned to
one CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from pipeline.admin import describe_topics
from pipeline.config import Settings
from pipeline.observability.http import HealthServer
from pipeline.scaling import Decision, ScalePolicy, StageScaler
from sluice.deaths import DeathWatch
from sluice.lag import GroupSelector, LagReader
from sluice.procs import StageProcess, stage_env

log = logging.getLogger(__name__)

INPUT_OF = {"preprocess": "prompts", "compute": "tokenized", "postprocess": "generated"}
BATCH_INPUT_OF = {"preprocess": "prompts_batch", "compute": "tokenized_batch"}
TOKENS_METRIC = "sluice_compute_pending_tokens"


@dataclass
class Worker:
    slot: int
    proc: StageProcess
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False
    port: int = 0  # its /metrics port, when the supervisor reads its waiting tokens


@dataclass
class StageState:
    stage: str
    topic: str
    scaler: StageScaler
    batch_topic: str | None = None  # the batch lane, for a stage that reads it
    workers: dict[int, Worker] = field(default_factory=dict)
    restarts: dict[int, int] = field(default_factory=dict)
    next_restart: dict[int, float] = field(default_factory=dict)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        policies: list[ScalePolicy],
        log_dir: Path,
        *,
        cpu_affinity: bool = False,
        interval_s: float = 1.0,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.cpu_affinity = cpu_affinity
        self.interval_s = interval_s
        self.worker_env = worker_env or {}
        self.registry = CollectorRegistry()
        self.workers_gauge = Gauge(
            "sluice_workers",
            "Worker processes per stage.",
            ["stage", "kind"],
            registry=self.registry,
        )
        self.decisions_total = Counter(
            "sluice_scale_decisions_total",
            "Scaling decisions.",
            ["stage", "direction"],
            registry=self.registry,
        )
        self.restarts_total = Counter(
            "sluice_worker_restarts_total",
            "Crashed workers restarted.",
            ["stage"],
            registry=self.registry,
        )
        if settings.engine_max_batch:  # what one compute worker holds in flight
            policies = [
                dataclasses.replace(p, in_flight_per_worker=settings.engine_max_batch)
                if p.token_threshold
                else p
                for p in policies
            ]
        topics = settings.topics
        self.stages = {
            p.stage: StageState(
                p.stage,
                getattr(topics, INPUT_OF[p.stage]),
                StageScaler(p, 0),
                getattr(topics, BATCH_INPUT_OF[p.stage], None)
                if p.batch_lag_threshold and p.stage in BATCH_INPUT_OF
                else None,
            )
            for p in policies
        }
        self.batch_lags: dict[str, int] = {}  # the batch lane's, read with ``lags``
        self._stop = asyncio.Event()
        self._last_lag: dict[str, int] = {}
        self._lag_lock = asyncio.Lock()
        self._lag_reader = LagReader(
            settings,
            GroupSelector(names=tuple(settings.group_id(p.stage) for p in policies)),
            watch_topics=[
                t for st in self.stages.values() for t in (st.topic, st.batch_topic) if t
            ],
        )
        self._last_round = 0.0
        self.deaths = DeathWatch(settings)
        self.http = HealthServer(
            self.registry, self._healthy, self._ready, settings.http_host, settings.http_port
        )

    # ---- lag -------------------------------------------------------------------------------

    async def lags(self) -> dict[str, int]:
        """Committed-vs-end lag of each stage's group on its input topic (a partition the group
        has not committed yet counts whole), over one long-lived ``LagReader``; the batch
        lane's lag of a stage that reads it goes to ``batch_lags``."""
        async with self._lag_lock:
            try:
                snapshot = await self._lag_reader.read()
            except KafkaError as exc:  # coordinator moving or the group not there yet
                log.info("lag not readable this round (%s); keeping the last reading", exc)
                return {st.stage: self._last_lag.get(st.stage, 0) for st in self.stages.values()}
        rows = snapshot.lags()
        out = {}
        for st in self.stages.values():
            group = self.settings.group_id(st.stage)

            def of(wanted: str | None, group: str = group) -> int:
                return sum(
                    rows.get((group, topic, partition), end)
                    for (topic, partition), end in snapshot.topic_ends.items()
                    if topic == wanted
                )

            out[st.stage] = of(st.topic)
            self.batch_lags[st.stage] = of(st.batch_topic) if st.batch_topic else 0
        self._last_lag = out
        return out

    async def partitions(self) -> dict[str, int]:
        infos = {
            i.name: i
            for i in await describe_topics(self.settings, [s.topic for s in self.stages.values()])
        }
        return {st.stage: infos[st.topic].partitions for st in self.stages.values()}

    # ---- workers ---------------------------------------------------------------------------

    async def waiting_tokens(self, st: StageState, session: aiohttp.ClientSession) -> int:
        """The pending tokens the stage's running workers report (0 for one not serving yet)."""
        total = 0.0
        for worker in st.workers.values():
            if worker.stopping or not worker.port:
                continue
            try:
                url = f"http://127.0.0.1:{worker.port}/metrics"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    text = await response.text()
            except (aiohttp.ClientError, TimeoutError):
                continue  # starting up or exiting: its tokens are in the lag until it serves
            for family in text_string_to_metric_families(text):
                if family.name == TOKENS_METRIC:
                    total += sum(sample.value for sample in family.samples)
        return int(total)

    def _start(self, st: StageState, slot: int) -> None:
        port = _free_port() if st.scaler.policy.token_threshold else 0
        env = stage_env(
            self.settings, SLUICE_INSTANCE_ID=str(slot), SLUICE_HTTP_PORT=str(port),
            **self.worker_env,
        )  # fmt: skip
        log_path = self.log_dir / f"{st.stage}-{slot}.log"
        cpus = None
        if self.cpu_affinity and hasattr(os, "sched_getaffinity"):
            available = sorted(os.sched_getaffinity(0))
            cpus = {available[slot % len(available)]}
        proc = StageProcess(st.stage, env, log_path).start()
        if cpus is not None and proc.proc is not None:
            os.sched_setaffinity(proc.proc.pid, cpus)
        st.workers[slot] = Worker(slot, proc, port=port)
        self.deaths.started(st.stage, slot, proc)
        log.info("started %s worker %d (pid %s)", st.stage, slot, proc.proc and proc.proc.pid)

    def _stop_worker(self, st: StageState, slot: int) -> None:
        worker = st.workers[slot]
        if worker.proc.proc is not None and worker.proc.proc.poll() is None:
            worker.proc.proc.terminate()  # SIGTERM: finish, commit, leave the group
        worker.stopping = True
        log.info("stopping %s worker %d (scale-in)", st.stage, slot)

    def running(self, stage: str) -> int:
        st = self.stages[stage]
        return sum(1 for w in st.workers.values() if not w.stopping)

    def _apply(self, st: StageState, desired: int) -> None:
        active = sorted(s for s, w in st.workers.items() if not w.stopping)
        for slot in range(desired):
            if slot not in st.workers:
                self._start(st, slot)
        for slot in active:
            if slot >= desired:
                self._stop_worker(st, slot)

    def _reap(self, st: StageState, now: float) -> None:
        for slot, worker in list(st.workers.items()):
            proc = worker.proc.proc
            if proc is None or proc.poll() is None:
                continue
            del st.workers[slot]
            if worker.stopping:
                self.deaths.stopped(st.stage, slot)
                if slot < st.scaler.current:  # scaled up again while it was stopping
                    self._start(st, slot)
                continue
            n = st.restarts.get(slot, 0)
            delay = max(min(30.0, 2.0**n), self.deaths.died(st.stage, slot, worker.proc))
            st.restarts[slot] = n + 1
            st.next_restart[slot] = now + delay
            log.warning(
                "%s worker %d exited with %s; restarting in %.0fs",
                st.stage,
                slot,
                proc.returncode,
                delay,
            )
        for slot, when in list(st.next_restart.items()):
            if now >= when and slot < st.scaler.current and slot not in st.workers:
                del st.next_restart[slot]
                self.restarts_total.labels(st.stage).inc()
                self._start(st, slot)

    # ---- the loop --------------------------------------------------------------------------

    def _healthy(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._last_round
        return (idle < 30, "ok" if idle < 30 else f"no scaling round for {idle:.0f}s")

    def _ready(self) -> tuple[bool, str]:
        return (self._last_round > 0, "ok" if self._last_round > 0 else "starting")

    async def run(self) -> None:
        """Serve /metrics (sluice_workers, decisions, restarts), then scale until stopped."""
        await self.http.start()
        await self._lag_reader.start()
        parts = await self.partitions()
        for st in self.stages.values():
            st.scaler.policy = st.scaler.policy.bounded(parts[st.stage])
            st.scaler.current = st.scaler.policy.min_workers
            self._apply(st, st.scaler.current)
        session = aiohttp.ClientSession()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                lags = await self.lags()
                for st in self.stages.values():
                    tokens = 0
                    if st.scaler.policy.token_threshold:
                        tokens = await self.waiting_tokens(st, session)
                    batch_lag = self.batch_lags.get(st.stage, 0)
                    decision = st.scaler.observe(now, lags[st.stage], tokens, batch_lag)
                    if decision is not None:
                        st.decisions.append((now, decision))
                        self.decisions_total.labels(st.stage, decision.direction).inc()
                        self._apply(st, decision.desired)
                    self._reap(st, now)
                    self.workers_gauge.labels(st.stage, "desired").set(st.scaler.current)
                    self.workers_gauge.labels(st.stage, "running").set(self.running(st.stage))
                await self.deaths.observe()
                self._last_round = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval_s)
        finally:
            await session.close()
            await self.shutdown()
            await self._lag_reader.close()
            await self.http.stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        for st in self.stages.values():
            for slot in list(st.workers):
                self._stop_worker(st, slot)
        for st in self.stages.values():
            for worker in st.workers.values():
                if worker.proc.proc is not None:
                    await asyncio.to_thread(worker.proc.stop)
            st.workers.clear()


def _free_port() -> int:
    """A loopback port free now, for a worker's /metrics (it binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
