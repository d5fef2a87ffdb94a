"""Reading crash reports back: ``<state_dir>/crash/*.json`` and what faulthandler left.

Every file is listed, readable or not: a corrupt or partial report (a disk that filled up, a
truncated copy) comes back as a ``CrashFile`` with ``problem`` set, never as an exception. A
non-empty ``hard-<stage>-<pid>.txt`` is a hard crash (segfault, abort) nobody wrote a report
for; it is listed as one with cause ``hard-crash``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.observability.crash_content import REPORT_FORMAT

_HARD = re.compile(r"hard-(?P<stage>[\w-]+)-(?P<pid>\d+)\.txt")
REQUIRED = ("id", "cause", "stage", "time")


@dataclass(frozen=True)
class CrashFile:
    """One file of the crash folder: a report, or why it could not be read."""

    path: Path
    report: dict[str, Any] | None = None
    problem: str | None = None

    @property
    def readable(self) -> bool:
        return self.report is not None

    @property
    def id(self) -> str:
        if self.report is not None:
            return str(self.report["id"])
        return self.path.stem

    @property
    def cause(self) -> str:
        return str(self.report["cause"]) if self.report is not None else "unreadable"

    @property
    def stage(self) -> str:
        return str(self.report.get("stage", "?")) if self.report is not None else "?"

    @property
    def time(self) -> float:
        if self.report is not None:
            return float(self.report["time"])
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @property
    def summary(self) -> str:
        """One line: the error, the exit, or why the file is unreadable."""
        if self.report is None:
            return f"unreadable: {self.problem}"
        error = self.report.get("error") or {}
        exit_ = self.report.get("exit") or {}
        text = error.get("message") or exit_.get("detail") or ""
        return str(text).splitlines()[0][:160] if text else self.cause


def read_report(path: Path) -> CrashFile:
    """One report file; never raises."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return CrashFile(path, problem=f"cannot read: {exc.strerror or exc}")
    if path.suffix == ".txt":
        return _hard_crash(path, data)
    try:
        report = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return CrashFile(path, problem=f"not JSON ({len(data)} bytes; {exc})")
    if not isinstance(report, dict):
        return CrashFile(path, problem="not a JSON object")
    if report.get("format") != REPORT_FORMAT:
        return CrashFile(path, problem=f"unknown format {report.get('format')!r}")
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        return CrashFile(path, problem=f"missing {', '.join(missing)}")
    if not isinstance(report["time"], int | float):
        return CrashFile(path, problem="time is not a number")
    return CrashFile(path, report)


def _hard_crash(path: Path, data: bytes) -> CrashFile:
    match = _HARD.fullmatch(path.name)
    text = data.decode(errors="replace")
    if match is None:
        return CrashFile(path, problem="not a faulthandler file")
    first = next((line for line in text.splitlines() if line.strip()), "hard crash")
    return CrashFile(
        path,
        {
            "format": REPORT_FORMAT,
            "id": path.stem,
            "cause": "hard-crash",
            "stage": match["stage"],
            "pid": int(match["pid"]),
            "written_by": "faulthandler",
            "time": path.stat().st_mtime,
            "error": {"type": "faulthandler", "message": first},
            "faulthandler": text.splitlines(),
        },
    )


def list_reports(directory: Path) -> list[CrashFile]:
    """Every report in the folder, newest first; empty faulthandler files (live or cleanly
    stopped processes) and temporary files are left out."""
    if not directory.is_dir():
        return []
    files: list[CrashFile] = []
    for path in directory.iterdir():
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".json" or (path.suffix == ".txt" and _nonempty(path)):
            files.append(read_report(path))
    return sorted(files, key=lambda f: f.time, reverse=True)


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def find_report(directory: Path, wanted: str) -> CrashFile | None:
    """The report with this id (or the one file whose id starts with it)."""
    files = list_reports(directory)
    exact = [f for f in files if wanted in (f.id, f.path.name)]
    if exact:
        return exact[0]
    prefixed = [f for f in files if f.id.startswith(wanted)]
    return prefixed[0] if len(prefixed) == 1 else None


def reports_of(directory: Path, pid: int, since: float) -> list[CrashFile]:
    """Reports a process wrote about itself (same pid, not older than it)."""
    return [
        f
        for f in list_reports(directory)
        if f.report is not None and f.report.get("pid") == pid and f.time >= since
    ]


@dataclass
class CauseGroup:
    """Reports that share a cause and a stage: how many, when the last was, which ones."""

    cause: str
    stage: str
    count: int = 0
    latest: float = 0.0
    ids: list[str] = field(default_factory=list)
    example: str = ""


def group_by_cause(files: Iterable[CrashFile]) -> list[CauseGroup]:
    """Grouped by (cause, stage), most frequent first; unreadable files form their own group."""
    groups: dict[tuple[str, str], CauseGroup] = {}
    for f in files:
        group = groups.setdefault((f.cause, f.stage), CauseGroup(f.cause, f.stage))
        group.count += 1
        group.ids.append(f.id)
        if f.time >= group.latest:
            group.latest, group.example = f.time, f.summary
    return sorted(groups.values(), key=lambda g: (-g.count, -g.latest))
