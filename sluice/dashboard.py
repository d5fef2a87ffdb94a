"""``sluice dashboard``: the live picture of a running pipeline on one local web page.

For when no Grafana is at hand. One aiohttp app serves a single HTML page (plots drawn on
``<canvas>`` by ``static/dashboard.js``, no third-party code and no network) and a JSON endpoint
the page polls every second. ``_sample_loop`` takes one sample per interval: lag per group and
partition from ``sluice.lag`` (the broker's numbers), and, for every ``--scrape`` URL, a stage's
``/metrics`` (throughput, dead letters, breaker state, in-flight work, tokens, memory). Samples
are kept for ``history_s`` seconds; the page asks only for those newer than its last one.

Endpoints: ``/`` (the page), ``/api/state?since=T`` (current values + history after T),
``/metrics`` (the lag exporter's metrics), ``/healthz``, ``/readyz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.runtime.lanes import is_batch_lane
from sluice.lag import LagExporter, LagSnapshot

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_DASHBOARD_PORT = 9410

# Counter sample name -> the key it is summed under in StageValues.counters
COUNTERS = {
    "sluice_records_consumed_total": "consumed",
    "sluice_records_produced_total": "produced",
    "sluice_dead_letters_total": "dead_letters",
    "sluice_error_answers_total": "error_answers",
    "sluice_cache_answers_total": "cache_answers",
    "sluice_engine_generated_tokens_total": "tokens",
}
GAUGES = {
    "sluice_breaker_state": "breaker",
    "sluice_in_flight_records": "in_flight",
    "sluice_paused_partitions": "paused",
    "sluice_batch_lane_paused_partitions": "batch_paused",
    "sluice_ready": "ready",
    "sluice_process_memory_bytes": "memory",
    "sluice_process_memory_limit_bytes": "memory_limit",
    "sluice_gpu_utilization_ratio": "gpu_utilization",
}
MAX_GAUGES = {"breaker", "gpu_utilization"}  # several series: the worst one counts, not the sum
BREAKER_STATES = ("closed", "half-open", "open")  # sluice_breaker_state's values 0, 1, 2


@dataclass
class StageValues:
    """What one stage process's /metrics says, reduced to the numbers the page shows."""

    stage: str | None = None
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)


def parse_stage_metrics(text: str) -> StageValues:
    """Reduce a Prometheus text exposition of a stage to ``StageValues`` (pure)."""
    values = StageValues()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            stage = sample.labels.get("stage")
            if stage and values.stage is None:
                values.stage = stage
            counter = COUNTERS.get(sample.name)
            if counter is not None:
                values.counters[counter] = values.counters.get(counter, 0.0) + sample.value
                continue
            gauge = GAUGES.get(sample.name)
            if gauge is None:
                continue
            if gauge in MAX_GAUGES:
                values.gauges[gauge] = max(values.gauges.get(gauge, sample.value), sample.value)
            else:
                values.gauges[gauge] = values.gauges.get(gauge, 0.0) + sample.value
    return values


@dataclass
class Target:
    """One scraped stage endpoint and its last two readings (for rates)."""

    url: str
    up: bool = False
    error: str | None = None
    values: StageValues | None = None
    at: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)

    def update(self, values: StageValues, at: float) -> None:
        if self.values is not None and at > self.at:
            dt = at - self.at
            self.rates = {
                name: max(0.0, value - self.values.counters.get(name, 0.0)) / dt
                for name, value in values.counters.items()
            }
        self.values, self.at, self.up, self.error = values, at, True, None

    def failed(self, error: str) -> None:
        self.up, self.error, self.rates = False, error, {}


@dataclass(frozen=True)
class Sample:
    t: float
    values: dict[str, float]


class Dashboard:
    """The web app and its sampling loop."""

    def __init__(
        self,
        settings: Settings,
        exporter: LagExporter,
        scrape: Sequence[str] = (),
        *,
        interval_s: float = 1.0,
        history_s: float = 600.0,
    ) -> None:
        self.settings = settings
        self.exporter = exporter
        self.targets = [Target(url) for url in scrape]
        self.interval_s = interval_s
        self.history: deque[Sample] = deque(maxlen=max(2, int(history_s / interval_s)))
        self._task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = DEFAULT_DASHBOARD_PORT) -> None:
        await self.exporter.start(loop=False)
        try:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
            await self._sample()
            self._task = asyncio.create_task(self._sample_loop(), name="dashboard_sample_loop")
            self._runner = web.AppRunner(self.app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, host, port)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self.host, self.port = host, port
        sockets = getattr(site._server, "sockets", None) or []
        if port == 0 and sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("dashboard on http://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.exporter.stop()

    # ---- sampling --------------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._sample()

    async def _sample(self) -> None:
        await asyncio.gather(self.exporter.poll(), *(self._scrape(t) for t in self.targets))
        now = time.time()
        self.history.append(Sample(now, self._values()))

    async def _scrape(self, target: Target) -> None:
        session = self._session
        assert session is not None
        try:
            async with session.get(target.url) as response:
                response.raise_for_status()
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if target.up or target.error is None:
                log.warning("scraping %s failed: %s", target.url, exc)
            target.failed(str(exc) or type(exc).__name__)
            return
        try:
            values = parse_stage_metrics(text)
        except ValueError as exc:  # not a Prometheus exposition: the URL is wrong
            target.failed(f"unparseable /metrics: {exc}")
            return
        target.update(values, time.time())

    def _values(self) -> dict[str, float]:
        """The numbers of one sample, under the series keys the page plots."""
        values: dict[str, float] = {}
        snapshot = self.exporter.latest
        if snapshot is not None:
            for group, total in snapshot.group_sums().items():
                values[f"lag/{group}"] = total
            for p in snapshot.partitions:
                if p.lag is not None:  # no commit yet: no lag to plot (Kafka prints "-")
                    values[f"plag/{p.group}/{p.topic}/{p.partition}"] = p.lag
            values.update(lane_lags(snapshot))
            for group, info in snapshot.groups.items():
                values[f"members/{group}"] = info.members
            for topic, count in _dlt_counts(snapshot).items():
                values[f"dlt/{topic}"] = count
        for stage, row in self._stages().items():
            values[f"throughput/{stage}"] = row["throughput"]
            values[f"dlq/{stage}"] = row["dlq_rate"]
            if row["breaker_state"] is not None:
                values[f"breaker/{stage}"] = row["breaker"]
            if row["tokens_rate"] is not None:
                values[f"tokens/{stage}"] = row["tokens_rate"]
        return values

    def _stages(self) -> dict[str, dict[str, Any]]:
        """Per stage, the scraped targets summed (throughput) or worst-of (breaker)."""
        stages: dict[str, dict[str, Any]] = {}
        for target in self.targets:
            if target.values is None or target.values.stage is None:
                continue
            row = stages.setdefault(
                target.values.stage,
                {
                    "stage": target.values.stage,
                    "targets": 0,
                    "up": 0,
                    "throughput": 0.0,
                    "produced_rate": 0.0,
                    "dlq_rate": 0.0,
                    "dlq_total": 0.0,
                    "tokens_rate": None,
                    "breaker": 0.0,
                    "breaker_state": None,  # until a target of the stage answers
                    "in_flight": 0.0,
                    "ready": 0.0,
                    "memory": None,
                    "memory_limit": None,
                },
            )
            row["targets"] += 1
            if not target.up:
                continue
            counters, gauges, rates = target.values.counters, target.values.gauges, target.rates
            row["up"] += 1
            row["throughput"] += rates.get("consumed", 0.0)
            row["produced_rate"] += rates.get("produced", 0.0)
            row["dlq_rate"] += rates.get("dead_letters", 0.0)
            row["dlq_total"] += counters.get("dead_letters", 0.0)
            if "tokens" in counters:
                row["tokens_rate"] = (row["tokens_rate"] or 0.0) + rates.get("tokens", 0.0)
            row["breaker"] = max(row["breaker"], gauges.get("breaker", 0.0))
            row["breaker_state"] = breaker_state(row["breaker"])
            row["in_flight"] += gauges.get("in_flight", 0.0)
            row["ready"] += gauges.get("ready", 0.0)
            if "memory" in gauges:
                row["memory"] = max(row["memory"] or 0.0, gauges["memory"])
                row["memory_limit"] = gauges.get("memory_limit")
        return stages

    # ---- HTTP ------------------------------------------------------------------------------

    async def _page(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "dashboard.html")

    async def _static(self, request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _state(self, request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "0"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text="since: a unix time") from exc
        return web.json_response(self.state(since))

    def state(self, since: float = 0.0) -> dict[str, Any]:
        """Current values and the history after ``since`` (columns: t and one list per key)."""
        snapshot = self.exporter.latest
        samples = [s for s in self.history if s.t > since]
        keys = sorted({k for s in samples for k in s.values})
        stages = sorted(self._stages().values(), key=lambda r: str(r["stage"]))
        return {
            "now": time.time(),
            "bootstrap": self.settings.bootstrap_servers,
            "topic_prefix": self.settings.topic_prefix,
            "group_prefix": self.settings.group_id(""),
            "interval_s": self.interval_s,
            "window_s": self.history.maxlen * self.interval_s if self.history.maxlen else 0,
            "groups": _groups(snapshot, self.exporter) if snapshot is not None else [],
            "dlt": _dlt_counts(snapshot) if snapshot is not None else {},
            "stages": stages,
            "breakers": breaker_summary(stages),
            "targets": [
                {
                    "url": t.url,
                    "up": t.up,
                    "error": t.error,
                    "stage": t.values.stage if t.values else None,
                }
                for t in self.targets
            ],
            "history": {
                "t": [s.t for s in samples],
                "series": {k: [s.values.get(k) for s in samples] for k in keys},
            },
        }

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.exporter.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        ok, why = self.healthy()
        return web.json_response({"ok": ok, "detail": why}, status=200 if ok else 503)

    def healthy(self) -> tuple[bool, str]:
        """The sampling loop runs and lag polls succeed."""
        age = time.time() - self.history[-1].t if self.history else float("inf")
        if age > max(10.0, 5 * self.interval_s):
            return False, f"no sample taken for {age:.0f}s"
        return self.exporter.healthy()

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, why = self.exporter.ready()
        return web.json_response({"ok": ok, "detail": why}, status=200 if ok else 503)


def lane_lags(snapshot: LagSnapshot) -> dict[str, float]:
    """``lane/<group>/<lane>``: the lag of each group that reads the batch lane, split into
    its interactive and batch lanes (the batch row of the page)."""
    lanes = {p.group for p in snapshot.partitions if is_batch_lane(p.topic)}
    out: dict[str, float] = {}
    for p in snapshot.partitions:
        if p.group in lanes and p.lag is not None:
            key = f"lane/{p.group}/{'batch' if is_batch_lane(p.topic) else 'interactive'}"
            out[key] = out.get(key, 0) + p.lag
    return out


def breaker_state(value: float) -> str:
    """The name of a ``sluice_breaker_state`` value (the worst over a stage's processes)."""
    return BREAKER_STATES[min(max(round(value), 0), len(BREAKER_STATES) - 1)]


def breaker_summary(stages: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many stages are in each breaker state: the counts above the breaker chart, taken
    from the same rows as the stage table (stages no target answered for are left out)."""
    counts = dict.fromkeys(BREAKER_STATES, 0)
    for row in stages:
        if row["breaker_state"] is not None:
            counts[row["breaker_state"]] += 1
    return counts


def _groups(snapshot: LagSnapshot, exporter: LagExporter) -> list[dict[str, Any]]:
    rates = exporter.rates.partition_rates()
    group_rates = exporter.rates.group_rates()
    sums = snapshot.group_sums()
    out = []
    for group, info in sorted(snapshot.groups.items()):
        out.append(
            {
                "group": group,
                "state": info.state,
                "members": info.members,
                "lag": sums.get(group, 0),
                "rate": group_rates.get(group),
                "partitions": [
                    {
                        "topic": p.topic,
                        "partition": p.partition,
                        "committed": p.committed,
                        "end": p.end,
                        "lag": p.lag,
                        "rate": rates.get(p.key),
                    }
                    for p in snapshot.partitions
                    if p.group == group
                ],
            }
        )
    return out


def _dlt_counts(snapshot: LagSnapshot) -> dict[str, int]:
    """Records ever written to each dead-letter topic (end offsets summed)."""
    counts: dict[str, int] = {}
    for (topic, _), end in snapshot.topic_ends.items():
        if topic.endswith(".DLT"):
            counts[topic] = counts.get(topic, 0) + end
    return dict(sorted(counts.items()))
