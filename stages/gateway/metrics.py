"""The gateway's Prometheus metrics (``sluice_gateway_*``), in a registry of its own.

HTTP side, counted by ``MetricsMiddleware`` for every request: requests by endpoint and status,
latency by endpoint, requests in flight. Kafka side, read from the ``SluiceClient`` when
scraped: prompts published, answer records by outcome, timeouts, and readiness.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.client import SluiceClient
from pipeline.observability.metrics import LATENCY_BUCKETS

# The endpoint label's values: these paths as they are, "/v1/models/{model}", else "other".
OPERATIONS = ("/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics")


class GatewayMetrics:
    def __init__(self, client: SluiceClient, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluice_gateway_requests_total",
            "HTTP requests answered.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sluice_gateway_request_seconds",
            "HTTP request to response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "sluice_gateway_in_flight_requests", "HTTP requests being served.", registry=r
        )
        ready = Gauge("sluice_gateway_ready", "1 when producer and reply consumer run.", registry=r)
        ready.set_function(lambda: 1.0 if client.ready else 0.0)
        r.register(ClientCollector(client))

    @staticmethod
    def endpoint(path: str) -> str:
        """A fixed label set: an unknown URL must not mint a new time series."""
        if path in OPERATIONS:
            return path
        return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class ClientCollector(Collector):
    """The reply side's counters, read from the client when scraped."""

    def __init__(self, client: SluiceClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        stats = self.client.router.stats
        published = CounterMetricFamily("sluice_gateway_published", "Prompts published to Kafka.")
        published.add_metric([], self.client.published)
        yield published
        answers = CounterMetricFamily(
            "sluice_gateway_answers",
            "Answer records read, by what became of them.",
            labels=["outcome"],
        )
        for outcome, value in (
            ("delivered", stats.delivered),
            ("duplicate", stats.duplicates),
            ("late", stats.late),
            ("foreign", stats.foreign),
            ("undecodable", stats.undecodable),
        ):
            answers.add_metric([outcome], value)
        yield answers
        timeouts = CounterMetricFamily(
            "sluice_gateway_timeouts", "Requests with no answer within the timeout."
        )
        timeouts.add_metric([], stats.timeouts)
        yield timeouts


class MetricsMiddleware:
    """Counts and times every HTTP request by endpoint (a fixed label set) and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        endpoint = self.metrics.endpoint(scope["path"])
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(endpoint, str(status)).inc()
