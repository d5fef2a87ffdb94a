"""``sluice doctor``: is this installation healthy, and if not, what to do about it.

Each check gives a verdict (ok, warn, red, skip), one line of what it saw and one line of the
fix. The local checks (the machine against the model, crash reports) always run; the broker's
(``doctor_kafka``: topics, consumer groups, dead letters) run when the broker answers, and a
broker that does not is one red line. Running stages' breakers and readiness come from their
``/metrics``, found through the supervisor's status file or given with ``--scrape``. Anything red
makes the command exit non-zero.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from pipeline.config import Settings
from pipeline.observability import vitals
from pipeline.observability.crash_content import crash_dir
from pipeline.observability.process import ProcessMemoryCollector
from sluice.crashes import CrashFile, group_by_cause, list_reports
from sluice.deaths import parse_scrape

Verdict = Literal["ok", "warn", "red", "skip"]
RANK = {"skip": 0, "ok": 1, "warn": 2, "red": 3}
RECENT_S = 3600.0  # a death in the last hour is red; older ones (last day) are a warning
STATUS_FRESH_S = 30.0


@dataclass
class Check:
    area: str
    name: str
    verdict: Verdict
    summary: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    generated_at: float = field(default_factory=time.time)
    lag_series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)  # "stage / reason" -> count
    memory_before_death: dict[str, Any] | None = None
    crashes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def red(self) -> bool:
        return any(c.verdict == "red" for c in self.checks)

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    def to_json(self) -> str:
        body = asdict(self)
        body["red"] = self.red
        return json.dumps(body, indent=2)


# ---- the machine against the model ------------------------------------------------------------


def model_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def wants_cuda(model: Path) -> bool:
    try:
        config = (model / "genai_config.json").read_text()
    except OSError:
        return False
    return '"cuda"' in config.lower()


def providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    found: list[str] = onnxruntime.get_available_providers()
    return found


def machine_checks(
    settings: Settings,
    *,
    cpus: int | None = None,
    memory_limit: int | None = None,
    gpus: list[dict[str, Any]] | None = None,
    available: list[str] | None = None,
) -> list[Check]:
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    if memory_limit is None:
        limit = ProcessMemoryCollector().limit_bytes()
        memory_limit = limit[0] if limit else 0
    gpus = gpus if gpus is not None else vitals.gpus()
    echo = settings.engine == "echo"
    size = 0 if echo else model_bytes(settings.model_path)
    out = [
        Check(
            "machine",
            "cpu",
            "ok" if cpus >= 2 else "warn",
            f"{cpus} CPU(s) usable",
            "" if cpus >= 2 else "give the stages at least 2 CPUs (tokenizing and Kafka I/O)",
        )
    ]
    need = 3 * size
    if echo:
        out.append(Check("machine", "memory", "ok", f"{_gib(memory_limit)} (echo: no model)"))
    elif size == 0:
        out.append(
            Check(
                "machine",
                "model",
                "red",
                f"no model files at {settings.model_path}",
                "set SLUICE_MODEL_PATH to a model folder (sluice model build makes one)",
            )
        )
    else:
        ok = memory_limit >= need
        out.append(
            Check(
                "machine",
                "memory",
                "ok" if ok else "red",
                f"{_gib(memory_limit)} available, model {_gib(size)} (needs 3x: {_gib(need)})",
                "" if ok else "run on a machine (or container limit) with 3x the model's size",
            )
        )
    cuda = not echo and wants_cuda(settings.model_path)
    out.append(_gpu_check(gpus, cuda, size))
    out.append(_provider_check(settings, cuda, available if available is not None else providers()))
    return out


def _gpu_check(gpus: list[dict[str, Any]], cuda: bool, size: int) -> Check:
    usable = [g for g in gpus if "memory_total_bytes" in g]
    if not usable:
        if cuda:
            return Check(
                "machine",
                "gpu",
                "red",
                "the model is built for CUDA and no GPU is visible (NVML)",
                "run on a GPU machine, or build a CPU model: sluice model build --device cpu",
            )
        return Check("machine", "gpu", "ok", "no GPU; serving on CPU")
    free = max(g["memory_total_bytes"] - g["memory_used_bytes"] for g in usable)
    names = ", ".join(f"{g['index']}: {g['name']}" for g in usable)
    ok = free >= size
    return Check(
        "machine",
        "gpu",
        "ok" if ok else "warn",
        f"{len(usable)} GPU(s) ({names}); most free: {_gib(free)}",
        "" if ok else "free GPU memory (another process holds it) before starting compute",
    )


def _provider_check(settings: Settings, cuda: bool, available: list[str]) -> Check:
    if settings.engine == "echo":
        return Check("machine", "provider", "ok", "echo engine (no onnxruntime provider)")
    if not available:
        return Check("machine", "provider", "red", "onnxruntime is not installed", "pip install")
    if cuda and "CUDAExecutionProvider" not in available:
        return Check(
            "machine",
            "provider",
            "red",
            f"the model wants CUDA; onnxruntime has {', '.join(available)}",
            "install the CUDA build of onnxruntime-genai, or build a CPU model",
        )
    used = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    return Check("machine", "provider", "ok", f"{used} will be used")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ---- crash reports ----------------------------------------------------------------------------


def crash_checks(settings: Settings, report: DoctorReport, now: float | None = None) -> None:
    now = now or time.time()
    files = list_reports(crash_dir(settings))
    day = [f for f in files if f.time >= now - 86400 or not f.readable]
    report.crashes = [
        {"id": f.id, "cause": f.cause, "stage": f.stage, "time": f.time, "summary": f.summary}
        for f in day
    ]
    report.memory_before_death = _memory_before_death(files)
    if not day:
        report.add(Check("crashes", "crash reports", "ok", "no crash in the last 24 h"))
        return
    for group in group_by_cause(day):
        if group.cause == "unreadable":
            report.add(
                Check(
                    "crashes",
                    "unreadable reports",
                    "warn",
                    f"{group.count} file(s) cannot be read: {', '.join(group.ids[:3])}",
                    f"look at them in {crash_dir(settings)}; remove them once read",
                )
            )
            continue
        recent = group.latest >= now - RECENT_S
        ago = _ago(now - group.latest)
        report.add(
            Check(
                "crashes",
                f"{group.stage}: {group.cause}",
                "red" if recent else "warn",
                f"{group.count}x, last {ago} ago: {group.example}",
                f"sluice doctor --crash {group.ids[0]}",
            )
        )


def _memory_before_death(files: Sequence[CrashFile]) -> dict[str, Any] | None:
    for f in files:
        history = (f.report or {}).get("memory_history")
        if history:
            return {"id": f.id, "stage": f.stage, "cause": f.cause, "points": history}
    return None


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- running stages ---------------------------------------------------------------------------


def supervisor_status(settings: Settings, now: float | None = None) -> dict[str, Any] | None:
    """The supervisor's status file when a live supervisor wrote it recently."""
    path = settings.state_dir / "supervisor" / "status.json"
    try:
        status: dict[str, Any] = orjson.loads(path.read_bytes())
        os.kill(int(status["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        return None
    if (now or time.time()) - float(status.get("written_at", 0)) > STATUS_FRESH_S:
        return None
    return status


async def stage_checks(settings: Settings, scrape: Sequence[str], report: DoctorReport) -> None:
    status = supervisor_status(settings)
    targets = [(u.removesuffix("/metrics"), u) for u in scrape]
    if status is not None:
        for w in status.get("workers", []):
            if w.get("url"):
                targets.append((f"{w['stage']}-{w['slot']}", f"{w['url']}/metrics"))
        for stage, until in status.get("crash_loops", {}).items():
            report.add(
                Check(
                    "stages",
                    f"{stage}: crash loop",
                    "red",
                    f"the supervisor holds {stage}'s restarts until "
                    + time.strftime("%H:%M:%S", time.localtime(until)),
                    "see the crash-loop report below: sluice doctor --crash <id>",
                )
            )
    if not targets:
        report.add(
            Check(
                "stages",
                "breakers",
                "skip",
                "no running stage found (no live sluice scale, no --scrape)",
                "pass --scrape http://HOST:PORT/metrics for each stage",
            )
        )
        return
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for name, url in targets:
            report.add(await _stage_check(session, name, url))


async def _stage_check(session: aiohttp.ClientSession, name: str, url: str) -> Check:
    try:
        async with session.get(url) as response:
            values = parse_scrape(await response.text())
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Check("stages", name, "red", f"{url} does not answer ({exc})", "is it running?")
    breaker = values.get("breaker", 0.0)
    ready = values.get("ready", 0.0)
    if breaker >= 2:
        return Check(
            "stages",
            name,
            "red",
            "circuit breaker OPEN: the stage is failing",
            "read its log and crash reports; re-drive with sluice replay dlq once fixed",
        )
    if ready < 1:
        why = "breaker half-open" if breaker >= 1 else "not ready (warming up or unassigned)"
        return Check("stages", name, "warn", why, "wait a minute; if it stays, read its log")
    return Check("stages", name, "ok", "ready, breaker closed")


# ---- all of it --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DoctorOptions:
    scrape: tuple[str, ...] = ()
    workers: int = 1  # the workers per stage you plan: topics need at least that many partitions
    samples: int = 3  # lag readings, ``interval_s`` apart (stuck partitions, the lag plot)
    interval_s: float = 2.0
    broker_timeout_s: float = 10.0


async def run_doctor(settings: Settings, options: DoctorOptions | None = None) -> DoctorReport:
    """Every check; the broker's only when it answers (one red line otherwise)."""
    from sluice.doctor_kafka import kafka_checks

    options = options or DoctorOptions()
    report = DoctorReport()
    report.add(*machine_checks(settings))
    await kafka_checks(
        settings,
        report,
        workers=options.workers,
        samples=options.samples,
        interval_s=options.interval_s,
        timeout_s=options.broker_timeout_s,
    )
    await stage_checks(settings, options.scrape, report)
    crash_checks(settings, report)
    return report
