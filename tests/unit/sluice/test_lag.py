"""Lag arithmetic, rates, the kafka_exporter-named metric families and the `sluice lag` table."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from pipeline.config import Settings
from sluice.cli.ops import lag_json, lag_table
from sluice.lag import (
    GroupInfo,
    GroupSelector,
    LagCollector,
    LagExporter,
    LagRates,
    LagSnapshot,
    PartitionLag,
    lag_metric_families,
)


def _snapshot(t: float, lags: dict[tuple[str, str, int], tuple[int | None, int]]) -> LagSnapshot:
    rows = tuple(
        PartitionLag(g, topic, p, committed, end)
        for (g, topic, p), (committed, end) in sorted(lags.items())
    )
    groups = {g: GroupInfo(g, "Stable", 1) for g, _, _ in lags}
    ends = {(topic, p): end for (_, topic, p), (_, end) in lags.items()}
    return LagSnapshot(t, rows, groups, ends)


def test_lag_is_end_minus_committed_and_none_without_a_commit() -> None:
    assert PartitionLag("g", "t", 0, committed=40, end=100).lag == 60
    assert PartitionLag("g", "t", 0, committed=100, end=100).lag == 0
    assert PartitionLag("g", "t", 0, committed=None, end=100).lag is None


def test_sums_per_topic_and_per_group_include_groups_without_rows() -> None:
    snap = _snapshot(
        1.0,
        {
            ("a", "t1", 0): (5, 10),
            ("a", "t1", 1): (0, 7),
            ("a", "t2", 0): (None, 4),
            ("a", "t2", 1): (1, 3),
            ("a", "t3", 0): (None, 9),
            ("b", "t1", 0): (10, 10),
        },
    )
    snap.groups["empty"] = GroupInfo("empty", "Empty", 0)
    # partitions without a commit count in no sum; a topic with only those has none
    assert snap.topic_sums() == {("a", "t1"): 12, ("a", "t2"): 2, ("b", "t1"): 0}
    assert snap.group_sums() == {"a": 14, "b": 0, "empty": 0}
    assert ("a", "t2", 0) not in snap.lags() and snap.lags()[("a", "t2", 1)] == 2


def test_group_selector_names_prefix_or_everything() -> None:
    settings = Settings(topic_prefix="shop.")
    listed = ["shop-compute", "shop-preprocess", "other", "shopping"]
    assert GroupSelector.for_settings(settings).pick(listed) == ["shop-compute", "shop-preprocess"]
    assert GroupSelector.for_settings(settings, all_groups=True).pick(listed) == sorted(listed)
    named = GroupSelector.for_settings(settings, ["x", "other"])
    assert named.pick(listed) == ["x", "other"]


def test_rates_over_the_window_and_for_partitions_that_appear_later() -> None:
    rates = LagRates(window_s=10)
    assert rates.partition_rates() == {}
    rates.add(_snapshot(100.0, {("g", "t", 0): (0, 100)}))
    rates.add(_snapshot(102.0, {("g", "t", 0): (20, 100), ("g", "t", 1): (0, 50)}))
    rates.add(_snapshot(104.0, {("g", "t", 0): (40, 100), ("g", "t", 1): (0, 70)}))
    assert rates.partition_rates() == {("g", "t", 0): -10.0, ("g", "t", 1): 10.0}
    # per topic: the oldest reading that has the topic (t=100, lag 100) against the newest (130)
    assert rates.topic_rates() == {("g", "t"): 7.5}
    assert rates.group_rates() == {"g": 7.5}
    rates.add(_snapshot(120.0, {("g", "t", 0): (100, 100), ("g", "t", 1): (70, 70)}))
    # readings older than the window are dropped: now 104 -> 120
    assert rates.partition_rates() == {("g", "t", 0): -60 / 16, ("g", "t", 1): -70 / 16}


def test_metric_families_have_the_kafka_exporter_names_and_labels() -> None:
    snap = _snapshot(
        1.0,
        {
            ("sluice-compute", "sluice.tokenized", 0): (3, 10),
            ("sluice-compute", "s.t", 1): (None, 6),
        },
    )
    snap.topic_ends[("sluice.prompts.DLT", 0)] = 4
    families = {f.name: f for f in lag_metric_families(snap, {("sluice-compute", "s.t"): -2.5})}
    assert set(families) == {
        "kafka_consumergroup_current_offset",
        "kafka_consumergroup_lag",
        "kafka_consumergroup_lag_sum",
        "kafka_consumergroup_members",
        "kafka_topic_partition_current_offset",
        "sluice_lag_rate_per_second",
    }

    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}

    assert samples("kafka_consumergroup_lag") == {
        (("consumergroup", "sluice-compute"), ("partition", "0"), ("topic", "sluice.tokenized")): 7,
        (("consumergroup", "sluice-compute"), ("partition", "1"), ("topic", "s.t")): -1,
    }
    # no commit: kafka_exporter's -1 for the current offset and the lag, and no sum
    assert samples("kafka_consumergroup_current_offset") == {
        (("consumergroup", "sluice-compute"), ("partition", "0"), ("topic", "sluice.tokenized")): 3,
        (("consumergroup", "sluice-compute"), ("partition", "1"), ("topic", "s.t")): -1,
    }
    assert samples("kafka_consumergroup_lag_sum") == {
        (("consumergroup", "sluice-compute"), ("topic", "sluice.tokenized")): 7,
    }
    assert samples("kafka_consumergroup_members") == {(("consumergroup", "sluice-compute"),): 1}
    assert samples("sluice_lag_rate_per_second") == {
        (("consumergroup", "sluice-compute"), ("topic", "s.t")): -2.5
    }
    assert (("partition", "0"), ("topic", "sluice.prompts.DLT")) in samples(
        "kafka_topic_partition_current_offset"
    )


def test_the_exporter_registry_exposes_the_latest_snapshot_and_nothing_before_it() -> None:
    exporter = LagExporter(Settings(), interval_s=1.0)
    text = generate_latest(exporter.registry).decode()
    assert "kafka_consumergroup_lag" not in text
    assert "sluice_lag_poll_errors_total 0.0" in text
    exporter.latest = _snapshot(5.0, {("g", "t", 0): (1, 9)})
    exporter.rates.add(exporter.latest)
    parsed = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(exporter.registry).decode())
    }
    assert parsed["kafka_consumergroup_lag"].samples[0].value == 8
    assert parsed["kafka_consumergroup_lag_sum"].samples[0].value == 8
    assert "sluice_process_memory_bytes" in parsed


def test_a_collector_on_an_empty_exporter_yields_nothing() -> None:
    exporter = LagExporter(Settings())
    registry = CollectorRegistry()
    registry.register(LagCollector(exporter))
    assert generate_latest(registry) == b""


def test_the_table_and_json_show_every_row_with_totals() -> None:
    snap = _snapshot(
        1.0, {("sluice-compute", "tok", 0): (3, 10), ("sluice-compute", "tok", 1): (None, 6)}
    )
    snap.groups["sluice-idle"] = GroupInfo("sluice-idle", "Empty", 0)
    rates = LagRates()
    rates.add(snap)
    console = Console(record=True, width=120)
    console.print(lag_table(snap, rates))
    text = console.export_text()
    assert "sluice-compute" in text and "sluice-idle" in text and "no offsets" in text
    rows = [line for line in text.splitlines() if "tok" in line]
    assert len(rows) == 3  # two partitions and the total
    assert rows[1].split("│")[4].strip() == "-"  # nothing committed on partition 1
    assert rows[1].split("│")[6].strip() == "-"  # so no lag either, as Kafka prints it
    assert rows[2].split("│")[6].strip() == "7"  # the partition with a commit
    data = lag_json(snap)
    assert data["groups"][0] == {
        "group": "sluice-compute",
        "state": "Stable",
        "members": 1,
        "lag": 7,
    }
    assert data["partitions"][1]["committed"] is None
    assert data["partitions"][1]["lag"] is None
