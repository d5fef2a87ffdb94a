"""Crash reports: why a stage process died, written before it exits.

``install(settings, stage, inflight=...)`` is called once in a stage process (``sluice run``).
From then on:

- a hard crash (segfault, abort, a fatal signal) dumps every thread's stack through
  ``faulthandler`` into ``<state_dir>/crash/hard-<stage>-<pid>.txt`` (removed again on a clean
  exit; the supervisor and ``sluice doctor`` read what is left);
- an unhandled exception (``sys.excepthook``, ``threading.excepthook``) writes a report;
- the stage's fatal path, the engine on a death or stall, and ``sluice run`` call
  ``CrashReporter.write(cause, exc)`` or the module's ``report(cause, exc)``.

A report is one JSON file ``<state_dir>/crash/<id>.json`` (``REPORT_FORMAT``): the cause and
error, every thread's stack, memory (RSS, peak, the limit, the cgroup's OOM counter), GPU memory,
open fds, uptime, the in-flight requests' features (ids, token counts, sampling parameters,
batch, deadline: never text), the last log lines, versions and the settings digest (secrets
masked). It is copied to the archive's object store under ``crash/`` when
``crash_copy_to_archive`` is on. Writing never raises and never hides the error it reports: the
original error is logged first, and a report that cannot be written is logged as such. The
report's content (features, stacks, the file) is built in ``crash_content``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pipeline.config import Settings
from pipeline.observability import vitals
from pipeline.observability.crash_content import (
    asyncio_tasks,
    cause_of,
    crash_dir,
    describe_error,
    error_chain,
    hard_crash_file,
    new_report,
    request_features,
    sanitize_features,
    save_report,
    summarize_inflight,
    thread_stacks,
)

__all__ = ["CrashReporter", "LogRing", "add_inflight", "current", "install", "report"]
__all__ += ["request_features"]  # engines describe in-flight requests with it

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
InflightSource = Callable[[], Iterable[Mapping[str, Any]]]


class LogRing(logging.Handler):
    """Keeps the last ``capacity`` formatted log lines for the report."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=capacity)
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class CrashReporter:
    """Writes this process's crash reports; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        stage: str,
        *,
        inflight: InflightSource | None = None,
        ring: LogRing | None = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.ring = ring
        self.started_at = vitals.process_started_at() or time.time()
        self.written: list[Path] = []
        self._sources: list[InflightSource] = [inflight] if inflight is not None else []
        self._reported: list[BaseException] = []
        self._lock = threading.RLock()
        self._writing = False
        self.hard_file: Path | None = None
        self._hard: IO[str] | None = None
        self._hooks: tuple[Any, Any] | None = None

    def add_inflight(self, source: InflightSource | None) -> None:
        """Register a callable that lists the requests in flight (``request_features`` dicts)."""
        if source is not None:
            self._sources.append(source)

    def inflight(self) -> list[dict[str, Any]]:
        """Every source's entries, one per request id: the stage loop says where a record came
        from (topic, partition, offset), the engine what it is (token counts, sampling), and
        the two are merged."""
        entries: list[dict[str, Any]] = []
        by_id: dict[str, dict[str, Any]] = {}
        for source in self._sources:
            for raw in source():
                entry = sanitize_features(raw)
                rid = entry.get("request_id")
                if isinstance(rid, str) and rid in by_id:
                    by_id[rid].update({k: v for k, v in entry.items() if v is not None})
                    continue
                if isinstance(rid, str):
                    by_id[rid] = entry
                entries.append(entry)
        return entries

    def already_reported(self, exc: BaseException | None) -> Path | None:
        if exc is None:
            return None
        for node in error_chain(exc):
            for index, done in enumerate(self._reported):
                if node is done:
                    return self.written[index] if index < len(self.written) else None
        return None

    def write(
        self, cause: str | None = None, exc: BaseException | None = None, **extra: Any
    ) -> Path | None:
        """Write a report now; its path, or None when it could not be written (logged).

        ``cause`` defaults to ``cause_of(exc)``. An error that was reported already (itself or
        one in its cause chain) is not reported twice: the first report's path comes back."""
        cause = cause or (cause_of(exc) if exc is not None else "unknown")
        with self._lock:
            done = self.already_reported(exc)
            if done is not None or self._writing:
                return done
            self._writing = True
            try:
                return self._write(cause, exc, extra)
            finally:
                self._writing = False

    def _write(self, cause: str, exc: BaseException | None, extra: dict[str, Any]) -> Path | None:
        if exc is not None:
            log.error(
                "stage %s: %s (%s: %s); writing a crash report",
                self.stage,
                cause,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
        try:
            report = self.build(cause, exc, extra)
            path = save_report(self.settings, report)
        except Exception as failure:  # never hide the original error: logged below
            log.error(
                "stage %s: the crash report for %s could not be written (%s: %s)",
                self.stage,
                cause,
                type(failure).__name__,
                failure,
                exc_info=exc,
            )
            return None
        if exc is not None:
            self._reported.append(exc)
        self.written.append(path)
        log.error("stage %s: crash report written to %s", self.stage, path)
        return path

    def build(
        self, cause: str, exc: BaseException | None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The report as a dict; a section that cannot be read says why instead."""
        report = new_report(
            self.settings,
            self.stage,
            cause,
            pid=os.getpid(),
            written_by="process",
            started_at=self.started_at,
        )
        report["error"] = describe_error(exc)
        sections: dict[str, Callable[[], Any]] = {
            "threads": thread_stacks,
            "asyncio_tasks": asyncio_tasks,
            "memory": vitals.memory,
            "gpus": vitals.gpus,
            "open_fds": vitals.open_fds,
            "inflight": self.inflight,
        }
        for name, read in sections.items():
            try:
                report[name] = read()
            except Exception as failure:  # noqa: BLE001 - the section says why it is missing
                report[name] = {"unreadable": f"{type(failure).__name__}: {failure}"}
        if isinstance(report["inflight"], list):
            report["inflight_summary"] = summarize_inflight(report["inflight"])
        report["log_tail"] = list(self.ring.lines) if self.ring is not None else []
        report["extra"] = dict(extra or {})
        return report

    # ---- hooks -----------------------------------------------------------------------------

    def enable_hard_crashes(self) -> None:
        """faulthandler into ``hard-<stage>-<pid>.txt`` for segfaults and fatal signals."""
        directory = crash_dir(self.settings)
        directory.mkdir(parents=True, exist_ok=True)
        self.hard_file = hard_crash_file(directory, self.stage, os.getpid())
        self._hard = self.hard_file.open("w")
        faulthandler.enable(file=self._hard, all_threads=True)

    def enable_hooks(self) -> None:
        previous = (sys.excepthook, threading.excepthook)

        def excepthook(
            kind: type[BaseException], exc: BaseException, tb: TracebackType | None
        ) -> None:
            if not isinstance(exc, KeyboardInterrupt | SystemExit):
                self.write(None, exc)
            previous[0](kind, exc, tb)

        def thread_hook(args: threading.ExceptHookArgs) -> None:
            if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
                name = args.thread.name if args.thread else "?"
                self.write("thread-died", args.exc_value, thread=name)
            previous[1](args)

        sys.excepthook = excepthook
        threading.excepthook = thread_hook
        self._hooks = previous

    def close(self) -> None:
        """A clean exit: restore the hooks, stop faulthandler, drop an empty hard-crash file."""
        if self._hooks is not None:
            sys.excepthook, threading.excepthook = self._hooks
            self._hooks = None
        if self._hard is not None:
            faulthandler.disable()
            self._hard.close()
            self._hard = None
            if self.hard_file is not None:
                with contextlib.suppress(OSError):  # already gone: nothing to tidy
                    if self.hard_file.stat().st_size == 0:
                        self.hard_file.unlink()
        if self.ring is not None:
            logging.getLogger().removeHandler(self.ring)
        if self in _installed:
            _installed.remove(self)


_installed: list[CrashReporter] = []  # the process's reporter (one; a list, not a global)


def install(
    settings: Settings,
    stage: str,
    inflight: InflightSource | None = None,
    *,
    hooks: bool = True,
    hard_crashes: bool = True,
) -> CrashReporter:
    """Set up crash reporting for this process (once, in ``main``); returns the reporter that
    ``report`` uses. ``close()`` it on a clean exit."""
    ring = LogRing(settings.crash_log_lines) if settings.crash_log_lines else None
    if ring is not None:
        logging.getLogger().addHandler(ring)
    reporter = CrashReporter(settings, stage, inflight=inflight, ring=ring)
    if hard_crashes:
        reporter.enable_hard_crashes()
    if hooks:
        reporter.enable_hooks()
    _installed[:] = [reporter]
    return reporter


def current() -> CrashReporter | None:
    return _installed[0] if _installed else None


def report(cause: str | None = None, exc: BaseException | None = None, **extra: Any) -> Path | None:
    """Write a report through the installed reporter; without one, log the error (with its
    cause) so it is never lost, and return None."""
    reporter = current()
    if reporter is not None:
        return reporter.write(cause, exc, **extra)
    log.error("%s (no crash reporter installed): %s", cause or "crash", exc, exc_info=exc)
    return None


def add_inflight(source: InflightSource) -> None:
    """Register an in-flight source with the installed reporter (no-op without one)."""
    reporter = current()
    if reporter is not None:
        reporter.add_inflight(source)
