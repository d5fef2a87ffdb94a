"""The Grafana dashboard and the Prometheus rules refer only to metrics Sluice really exports,
and every alert points at a section of the operations runbook that exists."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from infra.grafana.dashboard import render
from pipeline.config import Settings
from pipeline.observability.gpu import GpuCollector
from pipeline.observability.metrics import StageMetrics
from pipeline.observability.process import ProcessMemoryCollector
from sluice.lag import GroupInfo, LagExporter, LagSnapshot, PartitionLag
from stages.engines.onnx import OnnxEngine
from tests.paths import REPO_ROOT
from tests.unit.pipeline.observability.test_resource_metrics import FakeNvml

GRAFANA = REPO_ROOT / "infra" / "grafana"
PROMETHEUS = REPO_ROOT / "infra" / "prometheus"
PROMETHEUS_BUILTINS = {"up"}
NAME = re.compile(r"\b(?:sluice|kafka)_[a-zA-Z0-9_]*")
# Metrics of services whose constructors are still moving: their names are read from the
# quoted declarations in the source (a rename there still fails this test).
DECLARED_IN = [REPO_ROOT / "stages" / "archive_metrics.py", REPO_ROOT / "sluice" / "supervisor.py"]


def _yaml(path: Path) -> Any:
    """PyYAML (it comes with huggingface_hub), imported untyped: mypy needs no stubs for it."""
    return importlib.import_module("yaml").safe_load(path.read_text())


def _names(collectors: list[Any]) -> set[str]:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return {s.name for family in registry.collect() for s in family.samples}


def known_metric_names() -> set[str]:
    """Every sample name the Sluice services expose (histogram parts and _total included)."""
    stage = StageMetrics("compute")
    stage.consumed.labels("compute", "t")
    stage.produced.labels("compute", "t")
    stage.dead_letters.labels("compute", "r")
    stage.error_answers.labels("compute", "r")
    stage.batch_size.labels("compute")
    stage.processing.labels("compute")
    stage.latency.labels("compute")
    stage.retries.labels("compute")
    stage.commits.labels("compute")
    stage.cache_answers.labels("compute")
    stage.breaker_transitions.labels("compute", "open")
    names = {s.name for family in stage.registry.collect() for s in family.samples}
    names |= _names(OnnxEngine(Path("unused")).collectors())
    exporter = LagExporter(Settings())
    exporter.latest = LagSnapshot(
        1.0, (PartitionLag("g", "t", 0, 1, 2),), {"g": GroupInfo("g", "Stable", 1)}, {("t", 0): 2}
    )
    exporter.rates.add(exporter.latest)
    exporter.rates.add(LagSnapshot(2.0, exporter.latest.partitions, exporter.latest.groups))
    names |= {s.name for family in exporter.registry.collect() for s in family.samples}
    names |= _names([GpuCollector(FakeNvml()), ProcessMemoryCollector()])
    for source in DECLARED_IN:
        for declared in re.findall(r'"((?:sluice)_[a-z0-9_]+)"', source.read_text()):
            names.add(declared)
            names |= {declared + suffix for suffix in ("_total", "_bucket", "_sum", "_count")}
    return names


def _metrics_in(expr: str) -> set[str]:
    return set(NAME.findall(re.sub(r'"[^"]*"', '""', expr)))


def _grafana_exprs() -> list[str]:
    board = json.loads((GRAFANA / "dashboards" / "sluice.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"]]
    return exprs


def _rules() -> list[dict[str, Any]]:
    doc = _yaml(PROMETHEUS / "rules.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_committed_dashboard_is_what_the_code_renders() -> None:
    committed = (GRAFANA / "dashboards" / "sluice.json").read_text()
    assert committed == render(), (
        "regenerate: python -m infra.grafana.dashboard > infra/grafana/dashboards/sluice.json"
    )


def test_dashboard_panels_fit_the_grid_and_use_the_provisioned_datasource() -> None:
    board = json.loads((GRAFANA / "dashboards" / "sluice.json").read_text())
    datasource = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    uid = datasource["datasources"][0]["uid"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in board["panels"]}
    for wanted in [
        "Lag per consumer group",
        "Lag per partition ($group)",
        "Throughput",
        "Record latency (input timestamp to outputs acked)",
        "Time to first token",
        "Tokens per second",
        "Circuit breakers",
        "Dead letters",
        "Workers",
        "GPU utilization",
        "Process memory / limit",
        "Archiver lag",
    ]:
        assert wanted in titles
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid
    provider = _yaml(GRAFANA / "provisioning" / "dashboards" / "sluice.yml")
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_dashboard_and_rule_expression_uses_metrics_that_exist() -> None:
    known = known_metric_names()
    exprs = _grafana_exprs() + [rule["expr"] for rule in _rules()]
    assert len(exprs) > 30
    for expr in exprs:
        used = _metrics_in(expr)
        assert used or "up{" in expr, f"no Sluice metric in: {expr}"
        unknown = used - known - PROMETHEUS_BUILTINS
        assert not unknown, f"{expr}\n  refers to {sorted(unknown)}, which nothing exports"


def _anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s+", "-", re.sub(r"[^a-z0-9 -]", "", title)))
    return anchors


def test_alerts_carry_severity_summary_and_a_runbook_section_that_exists() -> None:
    anchors = _anchors((REPO_ROOT / "docs" / "OPERATIONS.md").read_text())
    alerts = [r for r in _rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "SluiceConsumerLagHigh",
        "SluiceGpuSaturated",
        "SluiceProcessMemoryHigh",
        "SluiceBreakerOpen",
        "SluiceDeadLettersGrowing",
        "SluiceArchiverFallingBehind",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"]
        page, _, anchor = alert["annotations"]["runbook"].partition("#")
        assert page == "docs/OPERATIONS.md" and anchor in anchors, alert["alert"]
