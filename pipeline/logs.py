"""How every Sluice process logs: one line per record with time, level and logger.

While a broker is away, aiokafka logs every failed reconnect and metadata refresh, at ERROR, many
times a second: a stage wrote thousands of lines a second with the broker stopped. Its loggers
therefore go through ``KafkaLogSummary``: the first record of a cause (a broker that cannot be
reached, or else one logger's message template) is logged in full; repeats within the interval
go to DEBUG only (shown with ``--verbose``), and once per interval, while they go on, one line
says how long and how often, e.g.::

    broker 127.0.0.1:9092 unreachable for 30 s (1,240 attempts)

A cause not seen for an interval is over: its count is written out and its next record is
logged in full again.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

KAFKA_LOGGER = "aiokafka"
SUMMARY_INTERVAL_S = 30.0

Cause = tuple[str, str]  # ("unreachable", "host:port") or (logger name, message template)

# aiokafka's connection failures, and the address inside an OSError's text:
# "[Errno 111] Connect call failed ('127.0.0.1', 9092)"
_CONNECT_BOOTSTRAP = 'Unable connect to "%s:%s": %s'
_CONNECT_NODE = "Unable connect to node with id %s: %s"
_ADDRESS = re.compile(r"\('([^']+)', (\d+)")


def setup_logging(verbose: bool = False, summary_interval_s: float = SUMMARY_INTERVAL_S) -> None:
    """Log to stderr at INFO (DEBUG when ``verbose``); aiokafka from WARNING up (everything
    when ``verbose``), its repeats summarised once per ``summary_interval_s``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(KAFKA_LOGGER).setLevel(logging.DEBUG if verbose else logging.WARNING)
    install_kafka_log_summary(summary_interval_s)


def install_kafka_log_summary(interval_s: float = SUMMARY_INTERVAL_S) -> KafkaLogSummary:
    """Route the aiokafka loggers through a ``KafkaLogSummary`` (replacing one installed
    before); what it lets through goes to the root logger's handlers."""
    kafka = logging.getLogger(KAFKA_LOGGER)
    remove_kafka_log_summary()
    summary = KafkaLogSummary(interval_s)
    kafka.addHandler(summary)
    kafka.propagate = False
    return summary


def remove_kafka_log_summary() -> None:
    """Undo ``install_kafka_log_summary``: pending counts are written, aiokafka propagates."""
    kafka = logging.getLogger(KAFKA_LOGGER)
    for handler in [h for h in kafka.handlers if isinstance(h, KafkaLogSummary)]:
        kafka.removeHandler(handler)
        handler.close()
    kafka.propagate = True


def cause_of(record: logging.LogRecord) -> Cause:
    """What a record is about: an unreachable broker by its address, else its template."""
    args = record.args if isinstance(record.args, tuple) else ()
    if record.msg == _CONNECT_BOOTSTRAP and len(args) >= 2:
        return ("unreachable", f"{args[0]}:{args[1]}")
    if record.msg == _CONNECT_NODE and args:
        found = _ADDRESS.search(str(args[-1]))
        return ("unreachable", f"{found[1]}:{found[2]}" if found else f"node {args[0]}")
    return (record.name, str(record.msg))


@dataclass
class _Streak:
    logger: str
    started: float
    last_seen: float
    last_summary: float
    total: int = 1  # records of the cause since the streak began
    pending: int = 0  # held back since the last line written
    level: int = logging.WARNING
    last: logging.LogRecord | None = None  # formatted only when a line is written


class KafkaLogSummary(logging.Handler):
    """The handler on the ``aiokafka`` logger: forwards records to ``forward`` (the root
    logger's handlers), holding back repeats of a cause and counting them."""

    def __init__(
        self,
        interval_s: float = SUMMARY_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        forward: Callable[[logging.LogRecord], None] | None = None,
    ) -> None:
        super().__init__(logging.DEBUG)
        self.interval_s = interval_s
        self._clock = clock
        self._forward = forward or logging.getLogger().handle
        self._streaks: dict[Cause, _Streak] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = self._clock()
        self._write_due(now)
        if record.levelno < logging.WARNING:
            self._forward(record)
            return
        cause = cause_of(record)
        streak = self._streaks.get(cause)
        if streak is None:
            self._streaks[cause] = _Streak(record.name, now, now, now, level=record.levelno)
            self._forward(record)
            return
        streak.total += 1
        streak.pending += 1
        streak.last_seen = now
        streak.level = max(streak.level, record.levelno)
        streak.last = record
        if logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            self._forward(_demoted(record))

    def flush(self) -> None:
        """Write the counts held back so far (at shutdown, and for tests)."""
        self.acquire()
        try:
            now = self._clock()
            for cause, streak in list(self._streaks.items()):
                if streak.pending:
                    self._summarise(cause, streak, now)
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        super().close()

    def _write_due(self, now: float) -> None:
        for cause, streak in list(self._streaks.items()):
            over = now - streak.last_seen > self.interval_s
            if streak.pending and (over or now - streak.last_summary >= self.interval_s):
                self._summarise(cause, streak, now)
            if over:
                del self._streaks[cause]

    def _summarise(self, cause: Cause, streak: _Streak, now: float) -> None:
        seconds = max(1, round(streak.last_seen - streak.started))
        if cause[0] == "unreachable":
            msg = "broker %s unreachable for %d s (%s attempts)"
            args: tuple[object, ...] = (cause[1], seconds, f"{streak.total:,}")
        else:
            msg = "repeated %s times in %d s: %s"
            last = streak.last.getMessage() if streak.last is not None else ""
            args = (f"{streak.total:,}", seconds, last)
        record = logging.LogRecord(streak.logger, streak.level, __file__, 0, msg, args, None)
        streak.pending = 0
        streak.last_summary = now
        self._forward(record)


def _demoted(record: logging.LogRecord) -> logging.LogRecord:
    """A DEBUG copy of ``record``: the full detail of a repeat, for ``--verbose``."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.levelno, copy.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    return copy
