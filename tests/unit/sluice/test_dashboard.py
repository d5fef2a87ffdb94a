"""The dashboard page's data: the breaker summary agrees with the stage rows and the chart."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pipeline.config import Settings
from sluice.dashboard import STATIC, Dashboard, parse_stage_metrics
from sluice.lag import GroupInfo, LagExporter, LagSnapshot, PartitionLag


def _metrics(stage: str, breaker: int) -> str:
    return (
        "# TYPE sluice_breaker_state gauge\n"
        f'sluice_breaker_state{{stage="{stage}"}} {breaker}\n'
        "# TYPE sluice_records_consumed_total counter\n"
        f'sluice_records_consumed_total{{stage="{stage}"}} 10\n'
    )


def _dashboard(readings: Mapping[str, tuple[str, int] | None]) -> Dashboard:
    """A dashboard whose scraped targets said ``(stage, breaker state)``, or failed (None)."""
    dashboard = Dashboard(Settings(), LagExporter(Settings()), scrape=list(readings))
    for target, reading in zip(dashboard.targets, readings.values(), strict=True):
        if reading is None:
            target.values = parse_stage_metrics(_metrics("postprocess", 2))
            target.failed("connection refused")
        else:
            target.update(parse_stage_metrics(_metrics(*reading)), 100.0)
    return dashboard


def test_three_closed_breakers_are_summed_as_three_closed() -> None:
    dashboard = _dashboard(
        {"http://a/metrics": ("preprocess", 0), "http://b/metrics": ("compute", 0)}
        | {"http://c/metrics": ("postprocess", 0)}
    )
    state = dashboard.state()
    assert state["breakers"] == {"closed": 3, "half-open": 0, "open": 0}
    assert [s["breaker_state"] for s in state["stages"]] == ["closed"] * 3
    values = dashboard._values()
    assert {k: v for k, v in values.items() if k.startswith("breaker/")} == {
        "breaker/compute": 0.0,
        "breaker/postprocess": 0.0,
        "breaker/preprocess": 0.0,
    }


def test_the_summary_counts_stages_by_their_worst_process_and_skips_unreachable_ones() -> None:
    dashboard = _dashboard(
        {
            "http://a/metrics": ("compute", 0),
            "http://b/metrics": ("compute", 1),  # one compute process half-open: compute is
            "http://c/metrics": ("preprocess", 2),
            "http://d/metrics": None,  # postprocess: its only process did not answer
        }
    )
    state = dashboard.state()
    rows = {s["stage"]: s["breaker_state"] for s in state["stages"]}
    assert rows == {"compute": "half-open", "preprocess": "open", "postprocess": None}
    assert state["breakers"] == {"closed": 0, "half-open": 1, "open": 1}
    assert "breaker/postprocess" not in dashboard._values()  # no reading, no point on the chart


def test_the_page_fills_the_summary_from_the_data_instead_of_printing_axis_labels() -> None:
    html = (STATIC / "dashboard.html").read_text()
    span = re.search(r'<span[^>]*id="breaker-summary"[^>]*>(.*?)</span>', html)
    assert span is not None and span.group(1) == ""
    script = (STATIC / "dashboard.js").read_text()
    assert "state.breakers[name]" in script and "s.breaker_state" in script


def test_a_partition_without_a_commit_has_no_lag_to_plot() -> None:
    dashboard = _dashboard({})
    dashboard.exporter.latest = LagSnapshot(
        1.0,
        (
            PartitionLag("sluice-compute", "t", 0, committed=4, end=10),
            PartitionLag("sluice-compute", "t", 1, committed=None, end=7),
        ),
        {"sluice-compute": GroupInfo("sluice-compute", "Stable", 1)},
    )
    values = dashboard._values()
    assert values["plag/sluice-compute/t/0"] == 6
    assert "plag/sluice-compute/t/1" not in values
    assert values["lag/sluice-compute"] == 6
    (group,) = dashboard.state()["groups"]
    assert [p["lag"] for p in group["partitions"]] == [6, None]


def test_the_lanes_of_a_group_that_reads_the_batch_lane_are_plotted_apart() -> None:
    dashboard = _dashboard({})
    dashboard.exporter.latest = LagSnapshot(
        1.0,
        (
            PartitionLag("sluice-compute", "sluice.tokenized", 0, committed=4, end=10),
            PartitionLag("sluice-compute", "sluice.tokenized.batch", 0, committed=0, end=900),
            PartitionLag("sluice-compute", "sluice.tokenized.batch", 1, committed=0, end=100),
            PartitionLag("sluice-postprocess", "sluice.generated", 0, committed=1, end=3),
        ),
        {"sluice-compute": GroupInfo("sluice-compute", "Stable", 1)},
    )
    values = dashboard._values()
    lanes = {k: v for k, v in values.items() if k.startswith("lane/")}
    assert lanes == {"lane/sluice-compute/interactive": 6, "lane/sluice-compute/batch": 1000}
    assert values["lag/sluice-compute"] == 1006
    page = (STATIC / "dashboard.html").read_text()
    assert 'id="chart-lanes"' in page and "lane/" in (STATIC / "dashboard.js").read_text()
