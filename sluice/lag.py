"""Consumer-group lag read from the broker, the way Kafka's own tools and kafka_exporter report it.

Lag of a group on a partition is the partition's log-end offset minus the group's committed
offset: the ``LAG`` column of ``kafka-consumer-groups --describe``. The rows are the same as that
command's: every partition the group has committed on, plus every partition assigned to one of
its members. An assigned partition with no commit yet has neither a committed offset nor a lag:
Kafka prints ``-`` for both, ``sluice lag`` too, ``--json`` gives null, and the exporter gives
-1 for both (kafka_exporter's value, so an alert can tell "no commit" from "caught up") and
leaves the partition out of ``kafka_consumergroup_lag_sum``, as kafka_exporter does.

- ``LagReader`` reads one ``LagSnapshot`` for a set of groups (``GroupSelector``).
- ``LagRates`` turns successive snapshots into a rate of change (positive: falling behind).
- ``LagCollector`` exports the latest snapshot under the kafka_exporter names
  (``kafka_consumergroup_lag{consumergroup,topic,partition}``, ``kafka_consumergroup_lag_sum``,
  ``kafka_consumergroup_current_offset``, ``kafka_consumergroup_members``,
  ``kafka_topic_partition_current_offset``) plus ``sluice_lag_rate_per_second``.
- ``LagExporter`` owns a reader, the rates and its own registry; ``sluice lag --serve`` runs its
  ``_poll_loop`` and serves ``/metrics``; ``sluice dashboard`` calls ``poll`` from its own loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric, UnknownMetricFamily

from pipeline.config import Settings
from pipeline.observability.http import HealthServer
from pipeline.observability.process import ProcessMemoryCollector

log = logging.getLogger(__name__)

DEFAULT_EXPORTER_PORT = 9308  # kafka_exporter's port: Prometheus configs expect it there
NO_OFFSET = -1  # exported for a partition without a commit (kafka_exporter's value)
Key = tuple[str, str, int]  # (group, topic, partition)
K = TypeVar("K")


@dataclass(frozen=True)
class PartitionLag:
    """One row of ``kafka-consumer-groups --describe``."""

    group: str
    topic: str
    partition: int
    committed: int | None  # None: assigned, nothing committed yet (Kafka prints "-")
    end: int  # log-end offset

    @property
    def lag(self) -> int | None:
        """Log-end minus committed; None without a commit (Kafka prints "-")."""
        return None if self.committed is None else self.end - self.committed

    @property
    def key(self) -> Key:
        return (self.group, self.topic, self.partition)


@dataclass(frozen=True)
class GroupInfo:
    group: str
    state: str  # Stable, Empty, PreparingRebalance, Dead, ...
    members: int


@dataclass(frozen=True)
class LagSnapshot:
    """Lag of every selected group at one moment, plus end offsets of the watched topics."""

    taken_at: float  # unix time
    partitions: tuple[PartitionLag, ...]
    groups: dict[str, GroupInfo]
    topic_ends: dict[tuple[str, int], int] = field(default_factory=dict)

    def topic_sums(self) -> dict[tuple[str, str], int]:
        """(group, topic) -> lag summed over the partitions with a commit
        (``kafka_consumergroup_lag_sum``); a topic with none has no sum, as in kafka_exporter."""
        sums: dict[tuple[str, str], int] = {}
        for p in self.partitions:
            if p.lag is not None:
                sums[(p.group, p.topic)] = sums.get((p.group, p.topic), 0) + p.lag
        return sums

    def group_sums(self) -> dict[str, int]:
        """group -> lag over all its topics; every selected group appears, even with no rows."""
        sums = dict.fromkeys(self.groups, 0)
        for (group, _), total in self.topic_sums().items():
            sums[group] = sums.get(group, 0) + total
        return sums

    def lags(self) -> dict[Key, int]:
        """The partitions that have a lag (a commit): the rest are absent, not zero."""
        return {p.key: p.lag for p in self.partitions if p.lag is not None}


@dataclass(frozen=True)
class GroupSelector:
    """Which consumer groups to read: named ones, those under a prefix, or every group."""

    names: tuple[str, ...] = ()
    prefix: str | None = None

    @classmethod
    def for_settings(
        cls, settings: Settings, names: Sequence[str] = (), all_groups: bool = False
    ) -> GroupSelector:
        """Named groups if any; else every group if asked; else this deployment's (``sluice-*``)."""
        if names:
            return cls(names=tuple(names))
        if all_groups:
            return cls()
        return cls(prefix=settings.group_id(""))

    def pick(self, listed: Iterable[str]) -> list[str]:
        if self.names:
            return list(self.names)
        return sorted(g for g in listed if self.prefix is None or g.startswith(self.prefix))


class LagReader:
    """Reads lag from the broker: group offsets through the admin API, ends through a consumer."""

    def __init__(
        self,
        settings: Settings,
        selector: GroupSelector | None = None,
        watch_topics: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.selector = selector or GroupSelector.for_settings(settings)
        self.watch_topics = list(watch_topics)
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        common = self.settings.kafka_common()
        admin = AIOKafkaAdminClient(**common, request_timeout_ms=15_000)
        consumer = AIOKafkaConsumer(**common, enable_auto_commit=False, request_timeout_ms=15_000)
        try:
            await admin.start()
            await consumer.start()
        except BaseException:
            await consumer.stop()
            await admin.close()
            raise
        self._admin, self._consumer = admin, consumer

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def __aenter__(self) -> LagReader:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def read(self) -> LagSnapshot:
        admin, consumer = self._admin, self._consumer
        if admin is None or consumer is None:
            raise RuntimeError("LagReader.read() before start()")
        listed = [entry[0] for entry in await admin.list_consumer_groups()]
        groups = self.selector.pick(listed)
        per_group = await asyncio.gather(*(self._group(admin, g) for g in groups))
        existing = set(await admin.list_topics())
        committed: dict[Key, int | None] = {}
        infos: dict[str, GroupInfo] = {}
        for info, offsets, assigned in per_group:
            infos[info.group] = info
            for tp in assigned:
                committed[(info.group, tp.topic, tp.partition)] = None
            for tp, offset in offsets.items():
                committed[(info.group, tp.topic, tp.partition)] = offset
        committed = {k: v for k, v in committed.items() if k[1] in existing}
        watched = await self._watched_partitions(admin, existing)
        tps = {TopicPartition(t, p) for _, t, p in committed} | watched
        ends: dict[TopicPartition, int] = await consumer.end_offsets(list(tps)) if tps else {}
        rows = tuple(
            PartitionLag(g, t, p, committed=off, end=ends[TopicPartition(t, p)])
            for (g, t, p), off in sorted(committed.items())
        )
        return LagSnapshot(
            taken_at=time.time(),
            partitions=rows,
            groups=infos,
            topic_ends={(tp.topic, tp.partition): off for tp, off in ends.items()},
        )

    async def _watched_partitions(
        self, admin: AIOKafkaAdminClient, existing: set[str]
    ) -> set[TopicPartition]:
        topics = [t for t in self.watch_topics if t in existing]
        if not topics:
            return set()
        described = await admin.describe_topics(topics)
        return {
            TopicPartition(d["topic"], part["partition"])
            for d in described
            if d["error_code"] == 0
            for part in d["partitions"]
        }

    @staticmethod
    async def _group(
        admin: AIOKafkaAdminClient, group: str
    ) -> tuple[GroupInfo, dict[TopicPartition, int], set[TopicPartition]]:
        offsets = await admin.list_consumer_group_offsets(group)
        # One group per request: aiokafka 0.14 mis-decodes a DescribeGroups answer for several.
        (response,) = await admin.describe_consumer_groups([group])
        error, _, state, protocol_type, _, members = response.groups[0][:6]
        assigned: set[TopicPartition] = set()
        if protocol_type == "consumer":
            for member in members:
                assigned.update(_assignment(member[-1]))
        info = GroupInfo(group, state if error == 0 else "Unknown", len(members))
        return info, {tp: m.offset for tp, m in offsets.items() if m.offset >= 0}, assigned


def _assignment(raw: bytes) -> list[TopicPartition]:
    if not raw:
        return []
    decoded: Any = ConsumerProtocolMemberAssignment.decode(raw)
    return list(decoded.partitions())


class LagRates:
    """Rate of change of lag (records per second) over a sliding window of snapshots."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._history: deque[tuple[float, dict[Key, int]]] = deque()

    def add(self, snapshot: LagSnapshot) -> None:
        self._history.append((snapshot.taken_at, snapshot.lags()))
        cutoff = snapshot.taken_at - self.window_s
        while len(self._history) > 2 and self._history[1][0] <= cutoff:
            self._history.popleft()

    def partition_rates(self) -> dict[Key, float]:
        """Per (group, topic, partition), from the oldest reading in the window that has it."""
        return self._rates(lambda lags: lags)

    def topic_rates(self) -> dict[tuple[str, str], float]:
        """Per (group, topic): the change of the summed lag over the window."""
        return self._rates(_sum_by_topic)

    def group_rates(self) -> dict[str, float]:
        rates: dict[str, float] = {}
        for (group, _), rate in self.topic_rates().items():
            rates[group] = rates.get(group, 0.0) + rate
        return rates

    def _rates(self, reduce: Callable[[dict[Key, int]], Mapping[K, int]]) -> dict[K, float]:
        if len(self._history) < 2:
            return {}
        t1, newest = self._history[-1][0], reduce(self._history[-1][1])
        first: dict[K, tuple[float, int]] = {}
        for t, lags in list(self._history)[:-1]:
            for key, value in reduce(lags).items():
                first.setdefault(key, (t, value))
        return {
            key: (value - first[key][1]) / (t1 - first[key][0])
            for key, value in newest.items()
            if key in first and t1 > first[key][0]
        }


def _sum_by_topic(lags: dict[Key, int]) -> dict[tuple[str, str], int]:
    sums: dict[tuple[str, str], int] = {}
    for (g, t, _), v in lags.items():
        sums[(g, t)] = sums.get((g, t), 0) + v
    return sums


class LagCollector:
    """A Prometheus collector over the latest snapshot (kafka_exporter metric names)."""

    def __init__(self, exporter: LagExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        snapshot = self._exporter.latest
        if snapshot is None:
            return
        yield from lag_metric_families(snapshot, self._exporter.rates.topic_rates())


def lag_metric_families(
    snapshot: LagSnapshot, topic_rates: dict[tuple[str, str], float]
) -> Iterator[Metric]:
    """The metric families of one snapshot (pure: the unit tests call it directly)."""
    gp = ["consumergroup", "topic", "partition"]
    current = GaugeMetricFamily(
        "kafka_consumergroup_current_offset",
        "Committed offset of a consumer group; -1 without a commit.",
        labels=gp,
    )
    lag = GaugeMetricFamily(
        "kafka_consumergroup_lag",
        "Log-end offset minus the group's committed offset (kafka-consumer-groups LAG); "
        "-1 without a commit.",
        labels=gp,
    )
    for p in snapshot.partitions:
        labels = [p.group, p.topic, str(p.partition)]
        # kafka_exporter's -1 for "no commit yet": a partition still shows, and is alertable
        current.add_metric(labels, NO_OFFSET if p.committed is None else p.committed)
        lag.add_metric(labels, NO_OFFSET if p.lag is None else p.lag)
    # kafka_exporter's name, typed "untyped": promtool's lint rejects a "_sum" suffix on a gauge
    # (it reads as a summary's part) but leaves untyped metrics alone; PromQL sees no difference.
    lag_sum = UnknownMetricFamily(
        "kafka_consumergroup_lag_sum",
        "Lag of a consumer group summed over a topic's partitions.",
        labels=["consumergroup", "topic"],
    )
    for (group, topic), total in sorted(snapshot.topic_sums().items()):
        lag_sum.add_metric([group, topic], total)
    members = GaugeMetricFamily(
        "kafka_consumergroup_members", "Members of a consumer group.", labels=["consumergroup"]
    )
    for group, info in sorted(snapshot.groups.items()):
        members.add_metric([group], info.members)
    ends = GaugeMetricFamily(
        "kafka_topic_partition_current_offset",
        "Log-end offset of a partition.",
        labels=["topic", "partition"],
    )
    for (topic, partition), end in sorted(snapshot.topic_ends.items()):
        ends.add_metric([topic, str(partition)], end)
    rate = GaugeMetricFamily(
        "sluice_lag_rate_per_second",
        "Change of a group's summed lag per second over the rate window (positive: behind).",
        labels=["consumergroup", "topic"],
    )
    for (group, topic), value in sorted(topic_rates.items()):
        rate.add_metric([group, topic], value)
    yield from (current, lag, lag_sum, members, ends, rate)


class LagExporter:
    """Polls lag on an interval and exports it from its own registry."""

    def __init__(
        self,
        settings: Settings,
        selector: GroupSelector | None = None,
        *,
        watch_topics: Sequence[str] | None = None,
        interval_s: float = 5.0,
        rate_window_s: float = 30.0,
    ) -> None:
        self.settings = settings
        topics = settings.topics.all_topics() if watch_topics is None else watch_topics
        self.reader = LagReader(settings, selector, topics)
        self.rates = LagRates(rate_window_s)
        self.interval_s = interval_s
        self.latest: LagSnapshot | None = None
        self.registry = CollectorRegistry()
        self.registry.register(LagCollector(self))
        self.registry.register(ProcessMemoryCollector())
        self._errors = Counter(
            "sluice_lag_poll_errors_total",
            "Lag polls that failed (broker unreachable, timeouts).",
            registry=self.registry,
        )
        self._last_success = Gauge(
            "sluice_lag_last_success_timestamp_seconds",
            "Unix time of the last successful lag poll.",
            registry=self.registry,
        )
        self._poll_seconds = Gauge(
            "sluice_lag_poll_duration_seconds",
            "Duration of the last lag poll.",
            registry=self.registry,
        )
        self._last_ok = 0.0
        self._task: asyncio.Task[None] | None = None
        self._http: HealthServer | None = None

    async def start(self, *, loop: bool = True) -> None:
        """Connect and take a first reading; with ``loop``, keep polling every interval."""
        await self.reader.start()
        await self.poll()
        if loop:
            self._task = asyncio.create_task(self._poll_loop(), name="lag_poll_loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._http is not None:
            await self._http.stop()
            self._http = None
        await self.reader.close()

    async def poll(self) -> LagSnapshot | None:
        """One reading; a broker error is logged and counted, and the last reading stays."""
        t0 = time.perf_counter()
        try:
            snapshot = await self.reader.read()
        except (KafkaError, TimeoutError) as exc:
            self._errors.inc()
            log.warning("lag poll failed (%s); keeping the last reading", exc)
            return None
        self._poll_seconds.set(time.perf_counter() - t0)
        self._last_success.set(snapshot.taken_at)
        self._last_ok = time.monotonic()
        self.latest = snapshot
        self.rates.add(snapshot)
        return snapshot

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll()

    async def serve(self, host: str, port: int) -> HealthServer:
        """Serve /metrics, /healthz (polls succeed) and /readyz (a first reading exists)."""
        self._http = HealthServer(self.registry, self.healthy, self.ready, host, port)
        await self._http.start()
        return self._http

    def healthy(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last_ok
        limit = max(15.0, 5 * self.interval_s)
        if age > limit:
            return False, f"no successful lag poll for {age:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        return (True, "ok") if self.latest is not None else (False, "no lag reading yet")
