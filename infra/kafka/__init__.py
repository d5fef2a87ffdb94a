"""A single-node Apache Kafka (KRaft: combined broker + controller) for local use and tests."""

from infra.kafka.broker import (
    DEFAULT_KAFKA_VERSION,
    BrokerConfig,
    ensure_kafka,
    run_kafka_tool,
    start_broker,
    stop_broker,
)

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "BrokerConfig",
    "ensure_kafka",
    "run_kafka_tool",
    "start_broker",
    "stop_broker",
]
