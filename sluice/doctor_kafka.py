"""The broker side of ``sluice doctor``: reachability and protocol, the topics of the flow and
their ``.DLT`` twins (partitions, retention, ``min.insync.replicas``), consumer groups (members,
lag, stuck partitions over a few samples) and the last hour's dead letters by stage and reason."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import ApiVersionRequest

from pipeline.admin import admin_client
from pipeline.config import Settings, Topics
from schemas.dlt import parse_dlt_headers
from sluice.doctor import Check, DoctorReport, Verdict
from sluice.lag import GroupSelector, LagReader, LagSnapshot

STAGE_INPUT = {"preprocess": "prompts", "compute": "tokenized", "postprocess": "generated"}
PRODUCE_API, FETCH_API = 0, 1
DAY_MS = 86_400_000
DLT_WINDOW_S = 3600
DLT_SCAN_LIMIT = 20_000  # per topic; counts say "at least" beyond it
LAG_WARN = 1000


async def kafka_checks(
    settings: Settings,
    report: DoctorReport,
    *,
    workers: int = 1,
    samples: int = 3,
    interval_s: float = 2.0,
    timeout_s: float = 10.0,
) -> None:
    admin = admin_client(settings)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        versions = await asyncio.wait_for(_api_versions(admin), timeout_s)
    except (KafkaError, TimeoutError, OSError) as exc:
        await admin.close()
        report.add(
            Check(
                "broker",
                "reachable",
                "red",
                f"{settings.bootstrap_servers} unreachable ({type(exc).__name__})",
                "start it (sluice up) or set SLUICE_BOOTSTRAP_SERVERS; local checks ran anyway",
            )
        )
        return
    try:
        report.add(_broker_check(settings, versions))
        partitions = await _topic_checks(settings, admin, report, workers)
    finally:
        await admin.close()
    await _group_checks(settings, report, partitions, samples, interval_s)
    await _dead_letter_checks(settings, report, partitions)


async def _api_versions(admin: AIOKafkaAdminClient) -> dict[int, int]:
    response = await admin._send_request(ApiVersionRequest())
    return {key: high for key, _, high in response.api_versions}


def _broker_check(settings: Settings, versions: dict[int, int]) -> Check:
    produce, fetch = versions.get(PRODUCE_API, -1), versions.get(FETCH_API, -1)
    seen = f"{settings.bootstrap_servers}: Produce v{produce}, Fetch v{fetch}, {len(versions)} APIs"
    if produce < 3:  # record headers and the idempotent producer need Kafka 0.11 (Produce v3)
        return Check("broker", "reachable", "red", seen, "Sluice needs Kafka 0.11 or newer")
    return Check("broker", "reachable", "ok", seen)


async def _topic_checks(
    settings: Settings, admin: AIOKafkaAdminClient, report: DoctorReport, workers: int
) -> dict[str, int]:
    wanted = settings.topics.all_topics()
    existing = set(await admin.list_topics())
    missing = [t for t in wanted if t not in existing]
    present = [t for t in wanted if t in existing]
    if missing:
        report.add(
            Check(
                "topics",
                "exist",
                "red",
                f"missing: {', '.join(missing)}",
                "sluice topics create",
            )
        )
    else:
        report.add(Check("topics", "exist", "ok", f"all {len(wanted)} topics and .DLT twins"))
    if not present:
        return {}
    described = await admin.describe_topics(present)
    partitions = {d["topic"]: len(d["partitions"]) for d in described}
    replicas = {d["topic"]: min(len(p["replicas"]) for p in d["partitions"]) for d in described}
    configs = await _topic_configs(admin, present)
    for topic in settings.topics.main_topics():
        if topic in partitions:
            check = _topic_check(
                settings,
                topic,
                partitions=partitions[topic],
                rf=replicas[topic],
                config=configs.get(topic, {}),
                workers=workers,
            )
            report.add(check)
    return partitions


async def _topic_configs(
    admin: AIOKafkaAdminClient, topics: list[str]
) -> dict[str, dict[str, str]]:
    resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
    out: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            out[name] = {e[0]: e[1] for e in entries}
    return out


def _topic_check(
    settings: Settings,
    topic: str,
    *,
    partitions: int,
    rf: int,
    config: dict[str, str],
    workers: int,
) -> Check:
    problems: list[tuple[Verdict, str, str]] = []  # (verdict, what, fix)
    if partitions < workers:
        problems.append(
            (
                "warn",
                f"{partitions} partitions < {workers} planned workers",
                "add partitions: only that many workers of a stage can consume",
            )
        )
    retention = int(config.get("retention.ms", "-1") or -1)
    window_ms = int(settings.archive_max_age_s * 1000)
    if 0 <= retention < 2 * window_ms:
        problems.append(
            (
                "red",
                f"retention {retention} ms is shorter than 2x the archive window",
                "raise retention.ms: records would be deleted before they are archived",
            )
        )
    elif 0 <= retention < DAY_MS:
        problems.append(
            (
                "warn",
                f"retention {retention / 3_600_000:.1f} h",
                "keep 24 h or more so an archiver outage loses nothing",
            )
        )
    isr = int(config.get("min.insync.replicas", "1") or 1)
    if isr > rf:
        problems.append(
            (
                "red",
                f"min.insync.replicas {isr} > replication {rf}",
                "every acks=all write fails: lower min.insync.replicas",
            )
        )
    elif rf == 1:
        problems.append(
            (
                "warn",
                "replication factor 1",
                "fine on one machine; use 3 with min.insync.replicas 2 in production",
            )
        )
    elif isr >= rf:
        problems.append(
            (
                "warn",
                f"min.insync.replicas {isr} = replication {rf}",
                "no broker can be lost without stopping writes: use rf - 1",
            )
        )
    base = f"{partitions} partitions, rf {rf}, min.insync {isr}"
    if not problems:
        return Check("topics", topic, "ok", base)
    worst = max(problems, key=lambda p: p[0] == "red")
    return Check(
        "topics", topic, worst[0], f"{base}: " + "; ".join(p[1] for p in problems), worst[2]
    )


async def _group_checks(
    settings: Settings,
    report: DoctorReport,
    partitions: dict[str, int],
    samples: int,
    interval_s: float,
) -> None:
    topics = settings.topics
    inputs = [getattr(topics, name) for name in STAGE_INPUT.values()]
    snapshots: list[LagSnapshot] = []
    async with LagReader(settings, GroupSelector.for_settings(settings), inputs) as reader:
        for i in range(max(1, samples)):
            if i:
                await asyncio.sleep(interval_s)
            snapshots.append(await reader.read())
    last = snapshots[-1]
    for snap in snapshots:
        for group, lag in snap.group_sums().items():
            report.lag_series.setdefault(group, []).append((snap.taken_at, lag))
    for stage, input_name in STAGE_INPUT.items():
        group = settings.group_id(stage)
        topic = getattr(topics, input_name)
        waiting = sum(end for (t, _), end in last.topic_ends.items() if t == topic)
        report.add(_group_check(stage, group, topic, waiting, snapshots))


def _group_check(
    stage: str, group: str, topic: str, written: int, snapshots: list[LagSnapshot]
) -> Check:
    last = snapshots[-1]
    info = last.groups.get(group)
    if info is None or (
        info.state == "Dead" and not any(p.group == group for p in last.partitions)
    ):
        verdict: Verdict = "red" if written else "warn"
        return Check(
            "groups",
            stage,
            verdict,
            f"group {group} does not exist: {stage} never ran",
            f"start it: sluice run {stage} (or sluice scale)",
        )
    lag = last.group_sums().get(group, 0)
    if info.members == 0:
        return Check(
            "groups",
            stage,
            "red",
            f"{stage} is stopped: {group} has no members, lag {lag}",
            f"start it: sluice run {stage} (or sluice scale)",
        )
    stuck = _stuck(group, snapshots)
    if stuck:
        return Check(
            "groups",
            stage,
            "red",
            f"{len(stuck)} partition(s) not moving with lag: {', '.join(stuck[:4])}",
            "a poison record or a stalled worker: sluice doctor shows its crash reports",
        )
    busy: Verdict = "warn" if lag > LAG_WARN else "ok"
    return Check(
        "groups",
        stage,
        busy,
        f"{info.members} member(s), lag {lag}",
        "add workers (sluice scale) or partitions" if busy == "warn" else "",
    )


def _stuck(group: str, snapshots: list[LagSnapshot]) -> list[str]:
    """Partitions with lag whose committed offset did not move across the samples."""
    if len(snapshots) < 2:
        return []
    first = {
        (p.topic, p.partition): p.committed for p in snapshots[0].partitions if p.group == group
    }
    return [
        f"{p.topic}[{p.partition}]"
        for p in snapshots[-1].partitions
        if p.group == group
        and (p.lag or 0) > 0
        and first.get((p.topic, p.partition), -1) == p.committed
    ]


async def _dead_letter_checks(
    settings: Settings, report: DoctorReport, partitions: dict[str, int]
) -> None:
    dlts = [Topics.dlt(t) for t in settings.topics.main_topics() if Topics.dlt(t) in partitions]
    consumer = AIOKafkaConsumer(**settings.kafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        since_ms = int((time.time() - DLT_WINDOW_S) * 1000)
        counts: Counter[tuple[str, str, str]] = Counter()
        for dlt in dlts:
            tps = [TopicPartition(dlt, p) for p in range(partitions[dlt])]
            counts.update(await _scan(consumer, settings, tps, since_ms))
    finally:
        await consumer.stop()
    if not counts:
        report.add(Check("dead letters", "last hour", "ok", "no dead letters in the last hour"))
        return
    for (dlt, stage, reason), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        report.dead_letters[f"{stage} / {reason}"] = n
        report.add(
            Check(
                "dead letters",
                f"{stage}: {reason}",
                "red",
                f"{n} dead letter(s) in {dlt} in the last hour",
                f"once fixed: sluice replay dlq {dlt} --reason {reason}",
            )
        )


async def _scan(
    consumer: AIOKafkaConsumer, settings: Settings, tps: list[TopicPartition], since_ms: int
) -> Counter[tuple[str, str, str]]:
    found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
    ends = await consumer.end_offsets(tps)
    starts = {tp: found[tp].offset for tp in tps if found.get(tp) is not None}
    todo = {tp: ends[tp] for tp in starts if starts[tp] < ends[tp]}
    counts: Counter[tuple[str, str, str]] = Counter()
    if not todo:
        return counts
    consumer.assign(list(todo))
    for tp in todo:
        consumer.seek(tp, starts[tp])
    prefix = settings.group_id("")
    seen = 0
    while todo and seen < DLT_SCAN_LIMIT:
        batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
        if not batch:
            break
        for tp, records in batch.items():
            for record in records:
                seen += 1
                counts[_reason(tp.topic, record.headers, prefix)] += 1
            if records and records[-1].offset + 1 >= todo.get(tp, 0):
                todo.pop(tp, None)
    return counts


def _reason(dlt: str, headers: Any, prefix: str) -> tuple[str, str, str]:
    info = parse_dlt_headers(headers)
    group = (info.group if info else None) or ""
    stage = group.removeprefix(prefix) if group.startswith(prefix) else (group or "?")
    reason = (info.reason if info else None) or "unknown"
    return dlt, stage, reason
