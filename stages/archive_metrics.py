"""The archiver's Prometheus metrics: ``sluice_archiver_*``, one registry per archiver."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.observability.metrics import LATENCY_BUCKETS


class ArchiverMetrics:
    def __init__(self, topics: list[str]) -> None:
        self.registry = r = CollectorRegistry()
        self.consumed = Counter(
            "sluice_archiver_records_consumed_total", "Records read.", ["topic"], registry=r
        )
        self.stored = Counter(
            "sluice_archiver_records_stored_total",
            "Records in stored objects.",
            ["topic"],
            registry=r,
        )
        self.objects = Counter(
            "sluice_archiver_objects_stored_total", "Objects stored.", ["topic"], registry=r
        )
        self.bytes = Counter(
            "sluice_archiver_stored_bytes_total",
            "Object bytes (gzip) stored.",
            ["topic"],
            registry=r,
        )
        self.failures = Counter(
            "sluice_archiver_store_failures_total",
            "Failed attempts to store an object (each is retried).",
            ["topic"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "sluice_archiver_store_seconds",
            "Time to store one object.",
            ["topic"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commits = Counter("sluice_archiver_commits_total", "Offset commits.", registry=r)
        self.buffered = Gauge(
            "sluice_archiver_buffered_records", "Consumed, not yet stored.", registry=r
        )
        self.lag = Gauge(
            "sluice_archiver_lag_records",
            "End offset minus committed offset over the assigned partitions.",
            ["topic"],
            registry=r,
        )
        self.stalled = Gauge(
            "sluice_archiver_stalled", "1 while storing objects fails (retrying).", registry=r
        )
        self.paused = Gauge(
            "sluice_archiver_paused_partitions",
            "Partitions paused because their objects are not stored yet.",
            registry=r,
        )
        self.last_store = Gauge(
            "sluice_archiver_last_store_timestamp_seconds",
            "Unix time an object was last stored.",
            registry=r,
        )
        self.progress = Gauge(
            "sluice_archiver_loop_progress_timestamp_seconds",
            "Unix time the fetch loop last polled.",
            registry=r,
        )
        for topic in topics:  # every series exists from the start, at zero
            for metric in (self.consumed, self.stored, self.objects, self.bytes, self.failures):
                metric.labels(topic)
            self.store_seconds.labels(topic)
            self.lag.labels(topic)
