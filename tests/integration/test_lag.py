"""`sluice lag` against Kafka's own kafka-consumer-groups, and promtool on everything we serve:
the /metrics of each stage, of the lag exporter and of the dashboard, the alert rules, the
Prometheus config and every Grafana expression."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.kafka.broker import run_kafka_tool
from infra.process import free_port
from pipeline import admin
from pipeline.config import Settings
from sluice.lag import GroupSelector, LagReader, LagSnapshot, lag_metric_families
from sluice.procs import stage_env
from tests.integration.kafka_io import Item, collect, produce, prompt
from tests.integration.ops_helpers import (
    MODEL,
    STAGES,
    Fleet,
    http_get,
    promtool,
    promtool_check_metrics,
    wait_ready,
)
from tests.paths import REPO_ROOT

CONSUMER_GROUP_COMMAND = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
Row = tuple[str, str, int]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    started = Fleet(tmp_path)
    yield started
    started.stop()


async def _fill(settings: Settings, topic: str, counts: list[int]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for partition, n in enumerate(counts):
            for i in range(n):
                await producer.send(topic, f"{i}".encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def _commit(settings: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit offsets for a group with no member (a manual, assign-mode commit)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


def kafka_describe(
    bootstrap: str, groups: list[str]
) -> dict[Row, tuple[int | None, int, int | None]]:
    """Rows of ``kafka-consumer-groups --describe``: (group, topic, partition) -> (current
    offset, log-end offset, lag), None where the tool prints "-"."""
    args = ["--bootstrap-server", bootstrap, "--describe"]
    for group in groups:
        args += ["--group", group]
    result = run_kafka_tool(CONSUMER_GROUP_COMMAND, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows: dict[Row, tuple[int | None, int, int | None]] = {}
    for line in result.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[0] in groups and cols[2].isdigit():
            current = None if cols[3] == "-" else int(cols[3])
            lag = None if cols[5] == "-" else int(cols[5])
            rows[(cols[0], cols[1], int(cols[2]))] = (current, int(cols[4]), lag)
    assert rows, f"no rows parsed from:\n{result.stdout[-3000:]}"
    return rows


def _exported_lag(snapshot: LagSnapshot) -> dict[Row, tuple[float, float]]:
    """(group, topic, partition) -> (current offset, lag) as the exporter serves them."""
    families = {f.name: f for f in lag_metric_families(snapshot, {})}

    def values(name: str) -> dict[Row, float]:
        return {
            (s.labels["consumergroup"], s.labels["topic"], int(s.labels["partition"])): s.value
            for s in families[name].samples
        }

    current, lag = values("kafka_consumergroup_current_offset"), values("kafka_consumergroup_lag")
    return {key: (current[key], lag[key]) for key in lag}


def sluice_lag_json(settings: Settings, *args: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "sluice.cli.ops", "lag", "--json", *args],
        env=stage_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return orjson.loads(result.stdout)


async def test_sluice_lag_agrees_with_kafka_consumer_groups_describe(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    orders, events = f"{settings.topic_prefix}orders", f"{settings.topic_prefix}events"
    await admin.create_topics(settings, [orders], partitions=3)
    await admin.create_topics(settings, [events], partitions=2)
    await _fill(settings, orders, [10, 7, 0])
    await _fill(settings, events, [5, 12])
    alpha, beta, gamma = (settings.group_id(g) for g in ("alpha", "beta", "gamma"))

    def tp(topic: str, p: int) -> TopicPartition:
        return TopicPartition(topic, p)

    await _commit(
        settings, alpha, {tp(orders, 0): 4, tp(orders, 1): 7, tp(orders, 2): 0, tp(events, 0): 5}
    )
    await _commit(settings, beta, {tp(orders, 0): 10})
    await _commit(settings, gamma, {tp(orders, 1): 3})
    # gamma also has a live member holding both partitions of `events`, one of them uncommitted
    member = AIOKafkaConsumer(
        events,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=gamma,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await member.start()
    try:
        for _ in range(60):
            if member.assignment():
                break
            await member.getmany(timeout_ms=500)
        assert len(member.assignment()) == 2
        await member.commit({tp(events, 0): 2})

        ours = await asyncio.to_thread(sluice_lag_json, settings)
        theirs = await asyncio.to_thread(
            kafka_describe, settings.bootstrap_servers, [alpha, beta, gamma]
        )
        async with LagReader(settings, GroupSelector.for_settings(settings)) as reader:
            exported = _exported_lag(await reader.read())
    finally:
        await member.stop()

    rows = {(r["group"], r["topic"], r["partition"]): r for r in ours["partitions"]}
    assert set(rows) == set(theirs), f"sluice: {sorted(rows)}\nkafka:  {sorted(theirs)}"
    for key, (current, end, lag) in theirs.items():
        row = rows[key]
        assert (row["committed"], row["end"]) == (current, end), key
        assert row["lag"] == lag, key  # both null where Kafka prints "-"
        # the exporter: kafka_exporter's -1 where Kafka prints "-"
        assert exported[key] == (-1 if current is None else current, -1 if lag is None else lag)
    # and the numbers are the ones we set up
    assert rows[(alpha, orders, 0)]["lag"] == 6
    assert rows[(alpha, orders, 2)]["lag"] == 0
    assert rows[(alpha, events, 0)]["lag"] == 0
    assert rows[(beta, orders, 0)]["lag"] == 0
    assert rows[(gamma, orders, 1)]["lag"] == 4
    assert rows[(gamma, events, 0)]["lag"] == 3
    assert rows[(gamma, events, 1)]["committed"] is None
    groups = {g["group"]: g for g in ours["groups"]}
    assert groups[alpha]["lag"] == 6 + 0 + 0 + 0
    assert groups[gamma]["lag"] == 4 + 3  # the partition without a commit adds nothing
    assert groups[gamma]["members"] == 1
    assert set(groups) == {alpha, beta, gamma}  # the default: this deployment's groups only


async def test_promtool_accepts_the_metrics_of_every_stage_the_lag_exporter_and_the_dashboard(
    settings_factory: Callable[..., Settings], fleet: Fleet
) -> None:
    promtool()
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=3)
    await admin.create_topics(settings)
    for stage in STAGES:
        fleet.stage(stage, settings)
    for url in fleet.metrics_urls():
        await wait_ready(url.replace("/metrics", "/readyz"), fleet)
    items: list[Item] = [
        (f"c{i}".encode(), prompt(f"metrics {i}", id=f"m-{i}"), []) for i in range(20)
    ]
    items.append((b"bad", b"{not json", []))
    await produce(settings, settings.topics.prompts, items)
    answers = await collect(settings, settings.topics.answers, until=21, within=60)
    assert len(answers.by_request()) == 21, fleet.logs()

    exporter_port, dashboard_port = free_port(), free_port()
    fleet.command(settings, "lag", "--serve", "--port", str(exporter_port), "--interval", "0.5")
    scrape = [arg for url in fleet.metrics_urls() for arg in ("--scrape", url)]
    fleet.command(settings, "dashboard", "--port", str(dashboard_port), *scrape)
    exporter = f"http://127.0.0.1:{exporter_port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    await wait_ready(f"{exporter}/readyz", fleet)
    await wait_ready(f"{dashboard}/readyz", fleet)
    await asyncio.sleep(1.5)  # two samples: rates exist

    services = {stage: f"http://127.0.0.1:{port}" for stage, (_, port) in fleet.stages.items()}
    services |= {"lag-exporter": exporter, "dashboard": dashboard}
    scraped = {}
    for name, base in services.items():
        status, text = await http_get(f"{base}/metrics")
        assert status == 200, name
        checked = promtool_check_metrics(text)
        assert checked.returncode == 0, f"{name}: promtool says\n{checked.stdout}{checked.stderr}"
        scraped[name] = text

    for stage in STAGES:
        text = scraped[stage]
        for name in (
            "sluice_records_consumed_total",
            "sluice_batch_size_records_bucket",
            "sluice_processing_seconds_bucket",
            "sluice_record_latency_seconds_bucket",
            "sluice_breaker_state",
            "sluice_in_flight_records",
            "sluice_process_memory_bytes",  # observability/process.py, registered by the runner
            "sluice_process_memory_limit_bytes",
        ):
            assert f"\n{name}" in text, f"{stage} does not export {name}"
    assert (
        'sluice_dead_letters_total{reason="bad-json",stage="preprocess"} 1.0'
        in scraped["preprocess"]
    )
    for name in ("lag-exporter", "dashboard"):
        text = scraped[name]
        for stage in STAGES:
            group = settings.group_id(stage)
            assert f'kafka_consumergroup_lag_sum{{consumergroup="{group}"' in text, name
            assert f'kafka_consumergroup_members{{consumergroup="{group}"}} 1.0' in text, name
        assert "sluice_lag_rate_per_second{" in text
        assert "sluice_process_memory_bytes" in text

    async with LagReader(settings, GroupSelector.for_settings(settings)) as reader:
        snapshot = await reader.read()
    assert snapshot.group_sums() == {settings.group_id(s): 0 for s in STAGES}
    status, body = await http_get(f"{dashboard}/api/state")
    state = json.loads(body)
    assert {s["stage"]: s["up"] for s in state["stages"]} == dict.fromkeys(STAGES, 1)
    assert state["dlt"][f"{settings.topics.prompts}.DLT"] == 1


def test_promtool_checks_the_rules_their_unit_tests_the_config_and_the_grafana_queries(
    tmp_path: Path,
) -> None:
    tool = promtool()
    folder = REPO_ROOT / "infra" / "prometheus"

    def run(*args: str, cwd: Path = folder) -> None:
        result = subprocess.run(
            [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"

    run("check", "rules", "--lint=all", "--lint-fatal", "rules.yml")
    run("test", "rules", "rules_test.yml")
    run("check", "config", "prometheus.yml")
    # every Grafana query parses as PromQL: as recording rules, with $group filled in
    board = json.loads((REPO_ROOT / "infra" / "grafana" / "dashboards" / "sluice.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    rules = [
        {"record": f"grafana:query_{i}", "expr": e.replace("$group", ".*")}
        for i, e in enumerate(exprs)
    ]
    queries = tmp_path / "grafana_queries.yml"
    queries.write_text(json.dumps({"groups": [{"name": "grafana", "rules": rules}]}))
    run("check", "rules", str(queries), cwd=tmp_path)
