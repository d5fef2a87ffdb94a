"""Quiet aiokafka's expected start-up noise, and only that, and only at start-up.

A client that starts while the broker is still settling (topics just created, the group
coordinator loading ``__consumer_offsets``) retries on its own, and logs every retry as a warning
or an error: ``NotLeaderForPartition``, ``GroupCoordinatorNotAvailable``, "Marking the
coordinator dead". None of it needs anyone's attention, and the command that could not reach
the broker at all ends with its own one-line error. :func:`quiet_startup_noise` drops exactly
those records for the first ``window_s`` seconds of a process (``--verbose`` keeps them); after
that window they pass as before, since the same messages in a running service mean a broker
failover or an outage, which is worth a line in its log. Nothing else aiokafka logs is touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Loggers are matched exactly: a logger's filters see only records created by that logger.
EXPECTED_AT_START: dict[str, tuple[str, ...]] = {
    "aiokafka": ("Unable connect to",),
    "aiokafka.consumer.group_coordinator": (
        "GroupCoordinatorNotAvailable",
        "CoordinatorNotAvailable",
        "CoordinatorLoadInProgress",
        "NotCoordinator",
        "Marking the coordinator dead",
    ),
    "aiokafka.consumer.fetcher": ("NotLeaderForPartition", "LeaderNotAvailable"),
    "aiokafka.producer.sender": ("NotLeaderForPartition", "LeaderNotAvailable"),
    "aiokafka.cluster": ("LeaderNotAvailable",),
}
STARTUP_WINDOW_S = 60.0


class StartupNoiseFilter(logging.Filter):
    """Drops a logger's expected start-up messages until ``window_s`` has passed."""

    def __init__(
        self,
        fragments: tuple[str, ...],
        window_s: float = STARTUP_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.fragments = fragments
        self.clock = clock
        self.until = clock() + window_s
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.clock() >= self.until:
            return True
        message = record.getMessage()
        if any(fragment in message for fragment in self.fragments):
            self.dropped += 1
            return False
        return True


def quiet_startup_noise(
    window_s: float = STARTUP_WINDOW_S, clock: Callable[[], float] = time.monotonic
) -> Callable[[], None]:
    """Install the filters; returns a function that removes them again."""
    installed: list[tuple[logging.Logger, StartupNoiseFilter]] = []
    for name, fragments in EXPECTED_AT_START.items():
        logger = logging.getLogger(name)
        noise = StartupNoiseFilter(fragments, window_s, clock)
        logger.addFilter(noise)
        installed.append((logger, noise))

    def remove() -> None:
        for logger, noise in installed:
            logger.removeFilter(noise)

    return remove
