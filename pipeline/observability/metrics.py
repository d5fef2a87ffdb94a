"""Prometheus metrics of one stage process: ``sluice_<thing>_<unit>``, fixed label sets.

Each runner owns its registry (so several runners can share one test process); the HTTP
endpoint serves it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class StageMetrics:
    def __init__(self, stage: str, registry: CollectorRegistry | None = None) -> None:
        self.stage = stage
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "sluice_records_consumed_total", "Records consumed.", ["stage", "topic"], registry=r
        )
        self.produced = Counter(
            "sluice_records_produced_total",
            "Records produced (acked).",
            ["stage", "topic"],
            registry=r,
        )
        self.batch_size = Histogram(
            "sluice_batch_size_records",
            "Records per handler call.",
            ["stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.processing = Histogram(
            "sluice_processing_seconds",
            "Handler time per call (batch or record).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "sluice_record_latency_seconds",
            "From the input record's timestamp to its outputs being acked.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "sluice_dead_letters_total", "Records dead-lettered.", ["stage", "reason"], registry=r
        )
        self.error_answers = Counter(
            "sluice_error_answers_total", "Error answers sent.", ["stage", "reason"], registry=r
        )
        self.expired = Counter(
            "sluice_expired_total",
            "Records not worked on because their sluice-deadline had passed.",
            ["stage"],
            registry=r,
        )
        self.retries = Counter(
            "sluice_handler_retries_total", "Retries of retriable failures.", ["stage"], registry=r
        )
        self.cache_answers = Counter(
            "sluice_cache_answers_total",
            "Degraded answers served from the response cache.",
            ["stage"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "sluice_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["stage"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "sluice_breaker_transitions_total",
            "Breaker state changes.",
            ["stage", "state"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sluice_in_flight_records", "Consumed, not yet finished.", ["stage"], registry=r
        )
        self.paused = Gauge(
            "sluice_paused_partitions", "Partitions paused for backpressure.", ["stage"], registry=r
        )
        self.batch_lane_paused = Gauge(
            "sluice_batch_lane_paused_partitions",
            "Batch-lane partitions paused (interactive work waiting, the batch lane's share "
            "of in-flight work used, or the in-flight bound).",
            ["stage"],
            registry=r,
        )
        self.commits = Counter("sluice_commits_total", "Offset commits.", ["stage"], registry=r)
        self.progress = Gauge(
            "sluice_loop_progress_timestamp_seconds",
            "Unix time the loop last made progress.",
            ["stage"],
            registry=r,
        )
        self.ready = Gauge(
            "sluice_ready",
            "1 when warmed up, assigned and breaker not open.",
            ["stage"],
            registry=r,
        )
        for metric in (self.breaker_state, self.in_flight, self.paused, self.progress, self.ready):
            metric.labels(stage)
