"""aiokafka's repeats while a broker is away: one line per interval per cause, with a count."""

from __future__ import annotations

import logging

import pytest

from pipeline.logs import (
    KAFKA_LOGGER,
    KafkaLogSummary,
    cause_of,
    install_kafka_log_summary,
    remove_kafka_log_summary,
)

NODE = "Unable connect to node with id %s: %s"
REFUSED = "[Errno 111] Connect call failed ('127.0.0.1', 9092)"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str, *args: object, name: str = "aiokafka.client") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, "client.py", 1, msg, args, None)


@pytest.fixture
def written() -> list[logging.LogRecord]:
    return []


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def summary(written: list[logging.LogRecord], clock: Clock) -> KafkaLogSummary:
    logging.getLogger(KAFKA_LOGGER).setLevel(logging.WARNING)
    return KafkaLogSummary(30.0, clock=clock, forward=written.append)


def _lines(records: list[logging.LogRecord], level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


def test_the_cause_is_the_broker_address_else_the_node_else_the_template() -> None:
    assert cause_of(_record(NODE, 1, OSError(REFUSED))) == ("unreachable", "127.0.0.1:9092")
    assert cause_of(_record(NODE, 1, TimeoutError())) == ("unreachable", "node 1")
    bootstrap = _record('Unable connect to "%s:%s": %s', "kafka", 9093, "refused")
    assert cause_of(bootstrap) == ("unreachable", "kafka:9093")
    other = _record("Failed fetch messages from %s: %s", 1, "x", name="aiokafka.consumer.fetcher")
    assert cause_of(other) == ("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s")


def test_a_minute_of_reconnects_is_three_lines_with_the_count(
    summary: KafkaLogSummary, written: list[logging.LogRecord], clock: Clock
) -> None:
    for _ in range(1200):  # 20 a second for 60 s
        summary.handle(_record(NODE, 1, OSError(REFUSED)))
        clock.now += 0.05
    lines = _lines(written)
    assert lines[0] == f"Unable connect to node with id 1: {REFUSED}"  # the first, in full
    assert lines[1:] == ["broker 127.0.0.1:9092 unreachable for 30 s (601 attempts)"]
    # the rest is held until the next interval's record, the cause going quiet, or a flush
    summary.flush()
    assert _lines(written)[2:] == ["broker 127.0.0.1:9092 unreachable for 60 s (1,200 attempts)"]
    summary.flush()
    assert len(_lines(written)) == 3  # nothing is pending twice


def test_repeats_reach_the_log_at_debug_only_when_debug_is_on(
    written: list[logging.LogRecord], clock: Clock
) -> None:
    kafka = logging.getLogger(KAFKA_LOGGER)
    kafka.setLevel(logging.DEBUG)
    try:
        summary = KafkaLogSummary(30.0, clock=clock, forward=written.append)
        for _ in range(5):
            summary.handle(_record(NODE, 1, OSError(REFUSED)))
    finally:
        kafka.setLevel(logging.WARNING)
    assert [r.levelno for r in written] == [logging.ERROR] + [logging.DEBUG] * 4
    assert {r.getMessage() for r in written} == {f"Unable connect to node with id 1: {REFUSED}"}


def test_causes_are_counted_apart_and_a_quiet_cause_starts_over(
    summary: KafkaLogSummary, written: list[logging.LogRecord], clock: Clock
) -> None:
    fetch = "Failed fetch messages from %s: %s"
    for i in range(10):
        summary.handle(_record(NODE, 1, OSError(REFUSED)))
        summary.handle(_record(NODE, 2, OSError(REFUSED.replace("9092", "9094"))))
        summary.handle(_record(fetch, 1, f"error {i}", name="aiokafka.consumer.fetcher"))
        clock.now += 1
    assert len(_lines(written)) == 3
    clock.now += 60  # the broker is back: nothing for two intervals
    summary.handle(_record(NODE, 1, OSError(REFUSED)))  # gone again: logged in full at once
    lines = _lines(written)
    assert sorted(lines[3:6]) == [
        "broker 127.0.0.1:9092 unreachable for 9 s (10 attempts)",
        "broker 127.0.0.1:9094 unreachable for 9 s (10 attempts)",
        "repeated 10 times in 9 s: Failed fetch messages from 1: error 9",
    ]
    assert lines[6] == f"Unable connect to node with id 1: {REFUSED}"
    assert written[3].name in {"aiokafka.client", "aiokafka.consumer.fetcher"}


def test_records_below_warning_pass_untouched(
    summary: KafkaLogSummary, written: list[logging.LogRecord]
) -> None:
    info = logging.LogRecord("aiokafka.consumer", logging.INFO, "c.py", 1, "joined", (), None)
    summary.handle(info)
    summary.handle(info)
    assert written == [info, info]


def test_installed_it_stands_between_aiokafka_and_the_root_handlers() -> None:
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root, kafka = logging.getLogger(), logging.getLogger(KAFKA_LOGGER)
    collect = Collect(logging.DEBUG)
    root.addHandler(collect)
    kafka.setLevel(logging.WARNING)
    install_kafka_log_summary(3600)
    install_kafka_log_summary(3600)  # idempotent: one summary handler
    try:
        assert kafka.propagate is False
        assert sum(isinstance(h, KafkaLogSummary) for h in kafka.handlers) == 1
        client = logging.getLogger("aiokafka.client")
        for _ in range(100):
            client.error(NODE, 1, OSError(REFUSED))
        assert len(seen) == 1
    finally:
        remove_kafka_log_summary()  # writes the pending count
        root.removeHandler(collect)
    assert kafka.propagate is True and not kafka.handlers
    assert seen[-1].getMessage().endswith("(100 attempts)")
