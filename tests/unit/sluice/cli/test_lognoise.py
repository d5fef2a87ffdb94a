"""aiokafka's expected start-up retries are dropped for a while; nothing else, and not after."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from sluice.cli.lognoise import EXPECTED_AT_START, quiet_startup_noise

NOT_LEADER = (
    "Got error produce response on topic-partition TopicPartition(topic='sluice.prompts', "
    "partition=5), retrying. Error: <class 'aiokafka.errors.NotLeaderForPartitionError'>"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    remove = quiet_startup_noise(window_s=60, clock=clock)
    yield clock
    remove()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")]


def test_expected_start_up_noise_is_dropped_in_the_window(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiokafka"):
        logging.getLogger("aiokafka.producer.sender").warning(NOT_LEADER)
        logging.getLogger("aiokafka.consumer.group_coordinator").error(
            "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"
        )
        logging.getLogger("aiokafka.consumer.group_coordinator").warning(
            "Marking the coordinator dead (node %s)for group %s.", 1, "sluice-preprocess"
        )
        logging.getLogger("aiokafka.consumer.fetcher").error(
            "Failed fetch offsets from %s: %s", 1, "[Error 6] NotLeaderForPartitionError"
        )
        logging.getLogger("aiokafka").error('Unable connect to "%s:%s": %s', "h", 1, "refused")
    assert messages(caplog) == []


def test_other_messages_pass_in_the_window(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aiokafka"):
        logging.getLogger("aiokafka.producer.sender").warning(
            "Got error produce response: %s", "MessageSizeTooLarge"
        )
        logging.getLogger("aiokafka.consumer.group_coordinator").error(
            "Heartbeat failed: %s", "Unknown"
        )
        logging.getLogger("aiokafka.conn").error("NotLeaderForPartition from an unlisted logger")
    assert messages(caplog) == [
        "Got error produce response: MessageSizeTooLarge",
        "Heartbeat failed: Unknown",
        "NotLeaderForPartition from an unlisted logger",
    ]


def test_after_the_window_the_same_messages_pass(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    clock.now += 61  # a failover in a running service is worth its line
    with caplog.at_level(logging.WARNING, logger="aiokafka"):
        logging.getLogger("aiokafka.producer.sender").warning(NOT_LEADER)
    assert messages(caplog) == [NOT_LEADER]


def test_removing_the_filters_restores_the_loggers() -> None:
    before = {name: list(logging.getLogger(name).filters) for name in EXPECTED_AT_START}
    remove = quiet_startup_noise()
    assert all(len(logging.getLogger(n).filters) == len(f) + 1 for n, f in before.items())
    remove()
    assert {name: list(logging.getLogger(name).filters) for name in EXPECTED_AT_START} == before
