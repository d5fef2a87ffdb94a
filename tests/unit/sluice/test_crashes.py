"""Reading crash reports back (corrupt files listed, never fatal) and the supervisor's death
reports: exit classification, reports for silent deaths, crash-loop detection."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline.config import Settings
from pipeline.observability.crash_content import REPORT_FORMAT, new_report, save_report
from sluice.crashes import find_report, group_by_cause, list_reports
from sluice.deaths import DeathWatch, classify_exit, parse_scrape
from sluice.procs import StageProcess


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(state_dir=tmp_path / "state", crash_copy_to_archive=False, **overrides)


def _write(settings: Settings, cause: str, stage: str = "compute", pid: int = 1) -> str:
    report = new_report(settings, stage, cause, pid=pid, written_by="process", started_at=None)
    report["error"] = {"message": f"{cause} happened"}
    save_report(settings, report)
    return str(report["id"])


def test_corrupt_partial_and_foreign_files_are_listed_as_unreadable(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    good = _write(settings, "engine-stall")
    folder = tmp_path / "state" / "crash"
    (folder / "partial.json").write_bytes(b'{"format": "sluice.crash/1", "id": "x", "cau')
    (folder / "list.json").write_bytes(b"[1, 2]")
    (folder / "old.json").write_bytes(orjson.dumps({"format": "other/9", "id": "y"}))
    (folder / "nocause.json").write_bytes(orjson.dumps({"format": REPORT_FORMAT, "id": "z"}))
    (folder / "hard-compute-77.txt").write_text("")  # a live process: not a crash
    files = {f.path.name: f for f in list_reports(folder)}
    assert set(files) == {f"{good}.json", "partial.json", "list.json", "old.json", "nocause.json"}
    assert files[f"{good}.json"].readable and files[f"{good}.json"].cause == "engine-stall"
    assert "not JSON" in (files["partial.json"].problem or "")
    assert files["list.json"].problem == "not a JSON object"
    assert "unknown format" in (files["old.json"].problem or "")
    assert "missing cause" in (files["nocause.json"].problem or "")
    groups = {(g.cause, g.stage): g.count for g in group_by_cause(files.values())}
    assert groups == {("engine-stall", "compute"): 1, ("unreadable", "?"): 4}


def test_a_nonempty_faulthandler_file_is_a_hard_crash_and_ids_resolve_by_prefix(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    first = _write(settings, "out-of-memory")
    folder = tmp_path / "state" / "crash"
    (folder / "hard-compute-4242.txt").write_text("Fatal Python error: Aborted\n\nThread 0x1\n")
    hard = find_report(folder, "hard-compute-4242")
    assert hard is not None and hard.cause == "hard-crash" and hard.stage == "compute"
    assert hard.summary == "Fatal Python error: Aborted"
    found = find_report(folder, first[:-3])
    assert found is not None and found.id == first
    assert find_report(folder, "nothing-like-it") is None


def test_exits_are_classified_from_the_signal_the_oom_counter_and_memory() -> None:
    kill = -int(signal.SIGKILL)
    assert classify_exit(kill, 1, None, None)[0] == "out-of-memory"
    assert classify_exit(kill, 0, 950.0, 1000.0)[0] == "out-of-memory"
    cause, detail = classify_exit(kill, 0, 100.0, 1000.0)
    assert cause == "killed" and "not near its limit" in detail
    assert classify_exit(-int(signal.SIGSEGV), 0, None, None) == ("hard-crash", "died of SIGSEGV")
    assert classify_exit(3, 0, None, None)[0] == "exited"
    assert classify_exit(-int(signal.SIGTERM), 0, None, None)[1] == "killed by SIGTERM"


def test_a_scrape_is_reduced_to_readiness_breaker_and_memory() -> None:
    text = (
        'sluice_ready{stage="compute"} 1.0\n'
        'sluice_breaker_state{stage="compute"} 2.0\n'
        "sluice_process_memory_bytes 1.5e+08\n"
        "sluice_process_memory_limit_bytes 2e+08\n"
    )
    values = parse_scrape(text)
    assert values == {"ready": 1.0, "breaker": 2.0, "rss_bytes": 1.5e8, "limit_bytes": 2e8}


def _dead_worker(tmp_path: Path, slot: int, code: str) -> StageProcess:
    proc = StageProcess("compute", {}, tmp_path / f"compute-{slot}.log")
    proc.log_path.write_text("old incarnation: skip me\n")
    with proc.log_path.open("ab") as log:
        proc.proc = subprocess.Popen(
            [sys.executable, "-c", f"print('worker line {slot}', flush=True); {code}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc


def test_a_silent_death_gets_a_supervisor_report_with_signal_and_log_tail(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    watch = DeathWatch(settings)
    proc = _dead_worker(tmp_path, 0, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    watch.started("compute", 0, proc)
    assert proc.proc is not None
    proc.proc.wait(timeout=30)
    assert watch.died("compute", 0, proc) == 0.0
    (only,) = list_reports(tmp_path / "state" / "crash")
    report = only.report
    assert report is not None and report["written_by"] == "supervisor"
    assert report["exit"]["signal"] == "SIGKILL" and report["cause"] == "killed"
    assert report["log_tail"] == ["worker line 0"]
    assert report["pid"] == proc.proc.pid


def test_a_worker_with_its_own_report_gets_none_from_the_supervisor(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    watch = DeathWatch(settings)
    proc = _dead_worker(tmp_path, 1, "raise SystemExit(3)")
    watch.started("compute", 1, proc)
    assert proc.proc is not None
    proc.proc.wait(timeout=30)
    own = _write(settings, "fatal-error", pid=proc.proc.pid)
    watch.died("compute", 1, proc)
    assert [f.id for f in list_reports(tmp_path / "state" / "crash")] == [own]
    assert watch.deaths["compute"][-1]["report"] == own


def test_n_deaths_in_the_window_are_a_crash_loop_reported_once_and_backed_off(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, crash_loop_deaths=3, crash_loop_backoff_s=120)
    watch = DeathWatch(settings)
    waits = []
    for _ in range(3):
        proc = _dead_worker(tmp_path, 0, "raise SystemExit(1)")
        watch.started("compute", 0, proc)
        assert proc.proc is not None
        proc.proc.wait(timeout=30)
        waits.append(watch.died("compute", 0, proc))
    assert waits == [0.0, 0.0, 120.0]
    files = list_reports(tmp_path / "state" / "crash")
    loops = [f for f in files if f.cause == "crash-loop"]
    assert len(loops) == 1 and len(files) == 4
    assert loops[0].report is not None and len(loops[0].report["deaths"]) == 3
    watch.write_status()
    status = orjson.loads((tmp_path / "state" / "supervisor" / "status.json").read_bytes())
    assert status["crash_loops"]["compute"] > time.time()
