"""The Grafana dashboard, written as code: ``python -m infra.grafana.dashboard`` prints the JSON
that ``infra/grafana/dashboards/sluice.json`` holds (a test keeps the two the same).

Panels: lag per group and partition over time, lag rate, workers, throughput, latency
percentiles, batch sizes, TTFT, tokens/s, engine queue, breaker state, dead letters, GPU,
memory against its limit, and the archiver. Every expression uses metric names that Sluice
exports (tests/unit/test_monitoring_config.py checks them against the live registries).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources
WIDTH = 24


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    width: int = 12
    height: int = 8
    kind: str = "timeseries"
    description: str = ""
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self, pid: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {"unit": self.unit}
        if self.threshold is not None:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [
                    {"color": "green", "value": None},
                    {"color": "red", "value": self.threshold},
                ],
            }
            defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
        panel: dict[str, Any] = {
            "id": pid,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {
                "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "targets": [
                {
                    "datasource": DATASOURCE,
                    "expr": expr,
                    "legendFormat": legend,
                    "refId": chr(ord("A") + i),
                }
                for i, (expr, legend) in enumerate(self.exprs)
            ],
        }
        _merge(panel, self.extra)
        return panel


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _quantiles(
    metric: str, by: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> list[tuple[str, str]]:
    label = f"{{{{{by}}}}} " if by else ""
    group = f"{by}, le" if by else "le"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[5m])))",
            f"{label}p{round(q * 100)}",
        )
        for q in qs
    ]


BREAKER_MAPPINGS = {
    "fieldConfig": {
        "defaults": {
            "mappings": [
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "closed", "color": "green", "index": 0},
                        "1": {"text": "half-open", "color": "yellow", "index": 1},
                        "2": {"text": "open", "color": "red", "index": 2},
                    },
                }
            ],
            "color": {"mode": "thresholds"},
            "thresholds": {
                "mode": "absolute",
                "steps": [
                    {"color": "green", "value": None},
                    {"color": "yellow", "value": 1},
                    {"color": "red", "value": 2},
                ],
            },
        }
    },
    "options": {"showValue": "auto", "mergeValues": True, "rowHeight": 0.8},
}

ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Lag and scaling",
        [
            Panel(
                "Lag per consumer group",
                [("sum by (consumergroup) (kafka_consumergroup_lag_sum)", "{{consumergroup}}")],
                description="Log-end minus committed offset, summed over partitions. "
                "Above 50 for a minute: scale out.",
                threshold=50,
            ),
            Panel(
                "Lag per partition ($group)",
                [
                    (
                        'kafka_consumergroup_lag{consumergroup=~"$group"}',
                        "{{consumergroup}} {{topic}}[{{partition}}]",
                    )
                ],
                description="What kafka-consumer-groups --describe prints, over time.",
            ),
            Panel(
                "Lag rate of change",
                [("sum by (consumergroup) (sluice_lag_rate_per_second)", "{{consumergroup}}")],
                unit="short",
                description="Records per second; positive: falling behind.",
            ),
            Panel(
                "Workers",
                [
                    ("max by (consumergroup) (kafka_consumergroup_members)", "{{consumergroup}}"),
                    ("sum by (stage, kind) (sluice_workers)", "{{stage}} {{kind}}"),
                ],
                description="Consumer-group members, and the supervisor's desired/running.",
            ),
        ],
    ),
    (
        "Throughput and latency",
        [
            Panel(
                "Throughput",
                [
                    (
                        "sum by (stage) (rate(sluice_records_consumed_total[1m]))",
                        "{{stage}} consumed",
                    ),
                    (
                        "sum by (stage) (rate(sluice_records_produced_total[1m]))",
                        "{{stage}} produced",
                    ),
                ],
                unit="reqps",
            ),
            Panel(
                "Record latency (input timestamp to outputs acked)",
                _quantiles("sluice_record_latency_seconds", "stage"),
                unit="s",
            ),
            Panel(
                "Handler time per call",
                _quantiles("sluice_processing_seconds", "stage", (0.5, 0.95)),
                unit="s",
            ),
            Panel(
                "Batch size",
                _quantiles("sluice_batch_size_records", "stage", (0.5, 0.95)),
            ),
        ],
    ),
    (
        "Generation",
        [
            Panel("Time to first token", _quantiles("sluice_engine_ttft_seconds", ""), unit="s"),
            Panel(
                "Tokens per second",
                [("sum(rate(sluice_engine_generated_tokens_total[1m]))", "tokens/s")],
            ),
            Panel(
                "Engine batch",
                [
                    ("sum(sluice_engine_running_requests)", "running"),
                    ("sum(sluice_engine_waiting_requests)", "waiting"),
                ],
            ),
            Panel(
                "Engine queue time",
                _quantiles("sluice_engine_queue_seconds", "", (0.5, 0.95)),
                unit="s",
            ),
        ],
    ),
    (
        "Faults",
        [
            Panel(
                "Circuit breakers",
                [("max by (stage) (sluice_breaker_state)", "{{stage}}")],
                kind="state-timeline",
                extra=BREAKER_MAPPINGS,
            ),
            Panel(
                "Dead letters",
                [
                    (
                        "sum by (stage, reason) (rate(sluice_dead_letters_total[5m]))",
                        "{{stage}} {{reason}}",
                    ),
                    (
                        "sum by (topic) (deriv(kafka_topic_partition_current_offset"
                        '{topic=~".+[.]DLT"}[5m]))',
                        "{{topic}} (broker)",
                    ),
                ],
                unit="reqps",
            ),
            Panel(
                "Error and degraded answers",
                [
                    (
                        "sum by (stage, reason) (rate(sluice_error_answers_total[5m]))",
                        "{{stage}} error {{reason}}",
                    ),
                    (
                        "sum by (stage) (rate(sluice_cache_answers_total[5m]))",
                        "{{stage}} from cache",
                    ),
                ],
                unit="reqps",
            ),
            Panel(
                "In flight and paused",
                [
                    ("sum by (stage) (sluice_in_flight_records)", "{{stage}} in flight"),
                    ("sum by (stage) (sluice_paused_partitions)", "{{stage}} paused partitions"),
                ],
            ),
        ],
    ),
    (
        "Resources",
        [
            Panel(
                "GPU utilization",
                [
                    (
                        "max by (instance, gpu) (sluice_gpu_utilization_ratio)",
                        "{{instance}} gpu{{gpu}}",
                    )
                ],
                unit="percentunit",
                threshold=0.9,
                description="Above 90% for 5 minutes: consider the INT8 model.",
            ),
            Panel(
                "GPU memory",
                [
                    (
                        "max by (instance, gpu) (sluice_gpu_memory_used_bytes)",
                        "{{instance}} gpu{{gpu}} used",
                    ),
                    (
                        "max by (instance, gpu) (sluice_gpu_memory_total_bytes)",
                        "{{instance}} gpu{{gpu}} total",
                    ),
                ],
                unit="bytes",
            ),
            Panel(
                "Process memory / limit",
                [
                    (
                        "sluice_process_memory_bytes / sluice_process_memory_limit_bytes",
                        "{{job}} {{instance}}",
                    )
                ],
                unit="percentunit",
                threshold=0.85,
            ),
            Panel(
                "Process memory",
                [("sluice_process_memory_bytes", "{{job}} {{instance}}")],
                unit="bytes",
            ),
        ],
    ),
    (
        "Archive",
        [
            Panel(
                "Archiver lag",
                [
                    (
                        "sum by (consumergroup) "
                        '(kafka_consumergroup_lag_sum{consumergroup=~".+-archiver"})',
                        "{{consumergroup}}",
                    ),
                    ("sum by (topic) (sluice_archiver_lag_records)", "{{topic}} (archiver)"),
                ],
            ),
            Panel(
                "Archived records",
                [
                    (
                        "sum by (topic) (rate(sluice_archiver_records_stored_total[1m]))",
                        "{{topic}} stored",
                    ),
                    ("max(sluice_archiver_stalled)", "stalled"),
                ],
                unit="reqps",
            ),
        ],
    ),
]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    pid = 1
    for title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row:
            if x + panel.width > WIDTH:
                x, y = 0, y + row_height
                row_height = 0
            panels.append(panel.render(pid, x, y))
            pid += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": "sluice",
        "title": "Sluice",
        "description": "LLM serving over Kafka: lag, throughput, latency, faults, resources.",
        "tags": ["sluice", "kafka", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "group",
                    "label": "consumer group",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": "label_values(kafka_consumergroup_lag, consumergroup)",
                        "refId": "group",
                    },
                    "definition": "label_values(kafka_consumergroup_lag, consumergroup)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    print(render(), end="")
