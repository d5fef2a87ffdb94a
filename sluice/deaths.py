"""Deaths nobody reports: the supervisor's side of crash reports (``sluice scale``).

``DeathWatch`` follows every worker the supervisor starts:

- it finds the worker's ``/metrics`` address in its log, scrapes it every few seconds and keeps
  the last scrape and a short memory history (RSS against the limit);
- when a worker dies and wrote no report of its own, it writes one for it: the exit code or
  signal, whether the kernel's OOM killer did it (the cgroup's ``oom_kill`` counter went up, or a
  SIGKILL came with memory near the limit), what faulthandler left, the last scrape and the
  worker's last log lines;
- N deaths of one stage within M minutes (``crash_loop_*`` settings) is a crash loop: reported
  once, and the stage's restarts wait ``crash_loop_backoff_s``;
- it writes ``<state_dir>/supervisor/status.json`` every round, which ``sluice doctor`` reads
  to find the running workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.observability import vitals
from pipeline.observability.crash_content import (
    crash_dir,
    hard_crash_file,
    new_report,
    save_report,
)
from sluice.crashes import reports_of
from sluice.procs import StageProcess

log = logging.getLogger(__name__)

_URL = re.compile(r"serving /metrics /healthz /readyz on (http://[\w.\-\[\]:]+)")
HARD_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
NEAR_LIMIT = 0.9  # a SIGKILL with RSS at 90% of the limit or more counts as the OOM killer
LOG_LINES = 60
WANTED = {
    "sluice_ready": "ready",
    "sluice_breaker_state": "breaker",
    "sluice_process_memory_bytes": "rss_bytes",
    "sluice_process_memory_limit_bytes": "limit_bytes",
    "sluice_in_flight_records": "in_flight",
}


@dataclass
class Watched:
    """One worker process as the supervisor saw it."""

    stage: str
    slot: int
    pid: int
    log_path: Path
    log_offset: int
    started_at: float
    events_file: Path | None
    oom_kills: int
    url: str | None = None
    scraped_at: float | None = None
    scrape: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    memory: deque[tuple[float, float, float | None]] = field(
        default_factory=lambda: deque(maxlen=120)
    )


def classify_exit(
    returncode: int, oom_kills: int, rss: float | None, limit: float | None
) -> tuple[str, str]:
    """(cause, one line of detail) for a worker that died without a report of its own."""
    if returncode >= 0:
        return "exited", f"exited with code {returncode} and wrote no crash report"
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return "signal", f"killed by signal {-returncode}"
    if sig == signal.SIGKILL:
        if oom_kills > 0:
            return "out-of-memory", (
                f"SIGKILL by the kernel's OOM killer (cgroup oom_kill went up by {oom_kills})"
            )
        if rss and limit and rss >= NEAR_LIMIT * limit:
            share = 100 * rss / limit
            return "out-of-memory", (
                f"SIGKILL with memory at {share:.0f}% of its limit: most likely the OOM killer"
            )
        return "killed", "SIGKILL from outside (memory was not near its limit)"
    if sig in HARD_SIGNALS:
        return "hard-crash", f"died of {sig.name}"
    return "signal", f"killed by {sig.name}"


def parse_scrape(text: str) -> dict[str, float]:
    """The few numbers a death report and doctor need from a worker's /metrics (max over series
    for the breaker, sums otherwise)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = WANTED.get(sample.name)
            if name is None:
                continue
            if name == "breaker":
                out[name] = max(out.get(name, 0.0), sample.value)
            else:
                out[name] = out.get(name, 0.0) + sample.value
    return out


def read_tail(path: Path, offset: int, lines: int = LOG_LINES) -> list[str]:
    """The last ``lines`` lines written to ``path`` after ``offset``."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 256 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]


class DeathWatch:
    def __init__(self, settings: Settings, *, scrape_interval_s: float = 5.0) -> None:
        self.settings = settings
        self.scrape_interval_s = scrape_interval_s
        self.crash_dir = crash_dir(settings)
        self.status_path = settings.state_dir / "supervisor" / "status.json"
        self.workers: dict[tuple[str, int], Watched] = {}
        self.deaths: dict[str, deque[dict[str, Any]]] = {}
        self.backoff_until: dict[str, float] = {}
        self.reports: list[Path] = []

    # ---- following workers -----------------------------------------------------------------

    def started(self, stage: str, slot: int, proc: StageProcess) -> None:
        assert proc.proc is not None
        pid = proc.proc.pid
        try:
            offset = proc.log_path.stat().st_size
        except OSError:
            offset = 0
        events = vitals.memory_events_file(str(pid))
        self.workers[(stage, slot)] = Watched(
            stage=stage,
            slot=slot,
            pid=pid,
            log_path=proc.log_path,
            log_offset=offset,
            started_at=time.time(),
            events_file=events,
            oom_kills=vitals.read_memory_events(events).get("oom_kill", 0),
        )

    async def observe(self) -> None:
        """Scrape the workers that are due, then write the status file."""
        now = time.time()
        due = [
            w
            for w in self.workers.values()
            if w.scraped_at is None or now - w.scraped_at >= self.scrape_interval_s
        ]
        if due:
            timeout = aiohttp.ClientTimeout(total=2)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await asyncio.gather(*(self._scrape(session, w) for w in due))
        self.write_status()

    async def _scrape(self, session: aiohttp.ClientSession, worker: Watched) -> None:
        worker.scraped_at = time.time()
        if worker.url is None:
            found = _URL.findall("\n".join(read_tail(worker.log_path, worker.log_offset, 400)))
            if not found:
                return
            worker.url = found[-1]
        try:
            async with session.get(f"{worker.url}/metrics") as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("scraping %s worker %d failed: %s", worker.stage, worker.slot, exc)
            return
        worker.scrape = [
            line for line in text.splitlines() if line.startswith(("sluice_", "process_"))
        ][:400]
        worker.values = parse_scrape(text)
        rss = worker.values.get("rss_bytes")
        if rss is not None:
            worker.memory.append((worker.scraped_at, rss, worker.values.get("limit_bytes")))

    def write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "written_at": time.time(),
            "workers": [
                {
                    "stage": w.stage,
                    "slot": w.slot,
                    "pid": w.pid,
                    "url": w.url,
                    "started_at": w.started_at,
                    "scraped_at": w.scraped_at,
                    **w.values,
                }
                for w in self.workers.values()
            ],
            "crash_loops": {
                stage: until for stage, until in self.backoff_until.items() if until > time.time()
            },
        }
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status_path.with_name(".status.json.tmp")
            tmp.write_bytes(orjson.dumps(status, option=orjson.OPT_INDENT_2))
            tmp.replace(self.status_path)
        except OSError as exc:
            log.warning("supervisor status not written to %s: %s", self.status_path, exc)

    # ---- deaths ----------------------------------------------------------------------------

    def stopped(self, stage: str, slot: int) -> None:
        """A worker that was asked to stop and did: not a death."""
        self.workers.pop((stage, slot), None)

    def died(self, stage: str, slot: int, proc: StageProcess) -> float:
        """Report a worker's unexpected exit (unless it did); returns how long its stage must
        wait before a restart because of a crash loop (0 when there is none)."""
        assert proc.proc is not None and proc.proc.returncode is not None
        worker = self.workers.pop((stage, slot), None)
        pid, code = proc.proc.pid, proc.proc.returncode
        since = worker.started_at - 1 if worker else 0.0
        own = reports_of(self.crash_dir, pid, since)
        report_id: str | None
        if own:
            report_id = own[0].id
            log.warning(
                "%s worker %d (pid %d) died; its crash report: %s", stage, slot, pid, report_id
            )
        else:
            report_id = self._report(stage, slot, pid, code, worker)
        death = {"time": time.time(), "slot": slot, "pid": pid, "exit": code, "report": report_id}
        return self._count(stage, death)

    def _report(self, stage: str, slot: int, pid: int, code: int, w: Watched | None) -> str | None:
        oom_kills = 0
        if w is not None and w.events_file is not None:
            now = vitals.read_memory_events(w.events_file).get("oom_kill", 0)
            oom_kills = max(0, now - w.oom_kills)
        rss = w.memory[-1][1] if w and w.memory else None
        limit = w.memory[-1][2] if w and w.memory else None
        cause, detail = classify_exit(code, oom_kills, rss, limit)
        hard = hard_crash_file(self.crash_dir, stage, pid)
        faulthandler = read_tail(hard, 0, 400) if hard.exists() else []
        report = new_report(
            self.settings,
            stage,
            cause,
            pid=pid,
            written_by="supervisor",
            started_at=w.started_at if w else None,
        )
        report["exit"] = {
            "returncode": code,
            "signal": signal.Signals(-code).name if code < 0 and -code in _SIGNALS else None,
            "detail": detail,
            "oom_kills": oom_kills,
        }
        report["slot"] = slot
        report["memory"] = {"rss_bytes": rss, "limit_bytes": limit}
        report["memory_history"] = [list(m) for m in w.memory] if w else []
        report["last_scrape"] = {"at": w.scraped_at, "url": w.url, "lines": w.scrape} if w else None
        report["faulthandler"] = faulthandler
        report["log_tail"] = read_tail(w.log_path, w.log_offset) if w else []
        try:
            path = save_report(self.settings, report)
        except OSError as exc:
            log.error(
                "%s worker %d (pid %d) %s; report not written: %s", stage, slot, pid, detail, exc
            )
            return None
        if faulthandler:
            with contextlib.suppress(OSError):  # its text is in the report now
                hard.unlink()
        self.reports.append(path)
        log.error("%s worker %d (pid %d) %s; report %s", stage, slot, pid, detail, path.name)
        return str(report["id"])

    def _count(self, stage: str, death: dict[str, Any]) -> float:
        deaths = self.deaths.setdefault(stage, deque())
        deaths.append(death)
        window = self.settings.crash_loop_window_s
        while deaths and deaths[0]["time"] < death["time"] - window:
            deaths.popleft()
        if len(deaths) < self.settings.crash_loop_deaths:
            return 0.0
        backoff = self.settings.crash_loop_backoff_s
        report = new_report(
            self.settings, stage, "crash-loop", pid=os.getpid(), written_by="supervisor",
            started_at=None,
        )  # fmt: skip
        detail = f"{len(deaths)} deaths in {window / 60:.0f} min; restarts wait {backoff:.0f}s"
        report["exit"] = {"detail": detail}
        report["deaths"] = list(deaths)
        deaths.clear()
        self.backoff_until[stage] = death["time"] + backoff
        try:
            self.reports.append(save_report(self.settings, report))
        except OSError as exc:
            log.error("%s is crash-looping (%s); report not written: %s", stage, detail, exc)
            return backoff
        log.error("%s is crash-looping: %s (report %s)", stage, detail, report["id"])
        return backoff


_SIGNALS = {int(s) for s in signal.Signals}
