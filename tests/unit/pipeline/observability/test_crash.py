"""The crash-report writer in isolation: what a report holds, what it never holds, and that
writing one can neither fail the process nor hide the error it reports."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from pipeline.config import Settings
from pipeline.errors import FatalError
from pipeline.observability import crash
from pipeline.observability.crash_content import cause_of, sanitize_features
from tests.paths import REPO_ROOT

SECRET_PROMPT = "the launch codes are 0000"


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "archive_url": f"file://{tmp_path / 'archive'}",
        "s3_secret_access_key": SecretStr("hunter2"),
        "gateway_api_key": SecretStr("sk-very-secret"),
    }
    values.update(overrides)
    return Settings(**values)


def _inflight() -> list[dict[str, Any]]:
    entry = crash.request_features(
        "req-1",
        prompt_tokens=12,
        output_tokens=3,
        sampling={"temperature": 0.7, "max_tokens": 64, "stop": ["END", "STOP"]},
        state="running",
        batch=0,
    )
    entry["prompt"] = SECRET_PROMPT  # a source that hands over text by mistake
    return [entry, crash.request_features("req-2", prompt_tokens=5, state="waiting")]


def _load(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = orjson.loads(path.read_bytes())
    return report


def test_a_report_holds_stacks_memory_inflight_logs_and_masked_settings(tmp_path: Path) -> None:
    reporter = crash.install(_settings(tmp_path), "compute", _inflight, hooks=False)
    try:
        logging.getLogger("stages.compute").warning("engine step took %.1fs", 9.5)
        try:
            raise FatalError("engine stalled", reason="engine-stall")
        except FatalError as exc:
            path = reporter.write(None, exc)
    finally:
        reporter.close()
    assert path is not None and path.parent == tmp_path / "state" / "crash"
    text = path.read_text()
    report = _load(path)
    assert report["format"] == "sluice.crash/1"
    assert report["cause"] == "engine-stall" and report["stage"] == "compute"
    assert report["error"]["message"] == "engine stalled"
    assert any(t["name"] == "MainThread" and t["stack"] for t in report["threads"])
    assert report["memory"]["rss_bytes"] > 0 and report["memory"]["peak_rss_bytes"] > 0
    assert report["memory"]["limit_bytes"] > 0 and report["open_fds"] > 0
    assert report["uptime_s"] >= 0 and report["versions"]["python"]
    ids = [e["request_id"] for e in report["inflight"]]
    assert ids == ["req-1", "req-2"]
    first = report["inflight"][0]
    assert first["prompt_tokens"] == 12 and first["output_tokens"] == 3
    assert first["sampling"] == {"temperature": 0.7, "max_tokens": 64, "stop_strings": 2}
    assert report["inflight_summary"]["by_state"] == {"running": 1, "waiting": 1}
    assert report["inflight_summary"]["prompt_tokens"] == 17
    assert any("engine step took 9.5s" in line for line in report["log_tail"])
    values = report["settings"]["values"]
    assert values["s3_secret_access_key"] == "**********"
    assert len(report["settings"]["sha256"]) == 64
    for leaked in (SECRET_PROMPT, "hunter2", "sk-very-secret", "END"):
        assert leaked not in text


def test_the_report_is_copied_to_the_archive_store(tmp_path: Path) -> None:
    reporter = crash.install(_settings(tmp_path), "compute", hooks=False, hard_crashes=False)
    try:
        path = reporter.write("fatal-error", FatalError("producer lost"))
    finally:
        reporter.close()
    assert path is not None
    copied = tmp_path / "archive" / "crash" / path.name
    assert copied.read_bytes() == path.read_bytes()


def test_an_error_is_reported_once_even_when_it_comes_back_wrapped(tmp_path: Path) -> None:
    reporter = crash.install(_settings(tmp_path), "compute", hooks=False, hard_crashes=False)
    try:
        original = MemoryError()
        first = reporter.write(None, original)
        wrapped = FatalError("out of memory", reason="engine-oom")
        wrapped.__cause__ = original
        again = crash.report(None, wrapped)
    finally:
        reporter.close()
    assert first is not None and again == first
    assert _load(first)["cause"] == "out-of-memory"
    assert len(list((tmp_path / "state" / "crash").glob("*.json"))) == 1


def test_a_report_that_cannot_be_written_still_logs_the_original_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state folder should be")
    reporter = crash.CrashReporter(_settings(tmp_path), "compute")
    with caplog.at_level(logging.ERROR):
        path = reporter.write(None, FatalError("the original failure"))
    assert path is None
    assert "could not be written" in caplog.text
    assert "the original failure" in caplog.text


def test_report_without_an_installed_reporter_logs_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert crash.current() is None
    with caplog.at_level(logging.ERROR):
        assert crash.report("engine-death", FatalError("engine thread died")) is None
    assert "engine thread died" in caplog.text


def test_features_keep_ids_and_numbers_and_drop_text() -> None:
    clean = sanitize_features(
        {"request_id": "r", "prompt": "hi", "text": "x", "messages": [], "prompt_tokens": 2}
    )
    assert clean == {"request_id": "r", "prompt_tokens": 2}


def test_causes_come_from_the_error_and_its_chain() -> None:
    assert cause_of(FatalError("x")) == "fatal-error"
    assert cause_of(FatalError("x", reason="engine-stall")) == "engine-stall"
    assert cause_of(ValueError("x")) == "unhandled-exception"
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = MemoryError()
    assert cause_of(wrapped) == "out-of-memory"


def _child(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from pipeline.config import Settings
        from pipeline.observability import crash
        settings = Settings(state_dir=Path({str(tmp_path / "state")!r}),
                            archive_url="file://{tmp_path / "archive"}")
        reporter = crash.install(settings, "compute")
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_segfault_leaves_every_threads_stack_in_the_hard_crash_file(tmp_path: Path) -> None:
    done = _child(
        tmp_path,
        """
        import ctypes, threading, time
        threading.Thread(target=time.sleep, args=(30,), name="sleeper", daemon=True).start()
        ctypes.string_at(0)
        """,
    )
    assert done.returncode < 0, done.stderr
    (hard,) = (tmp_path / "state" / "crash").glob("hard-compute-*.txt")
    dump = hard.read_text()
    assert "Fatal Python error: Segmentation fault" in dump
    assert "Current thread 0x" in dump and "in string_at" in dump  # where it crashed
    assert "\nThread 0x" in dump and "in _bootstrap" in dump  # and the other thread


def test_an_unhandled_exception_writes_a_report_and_a_clean_exit_leaves_no_hard_file(
    tmp_path: Path,
) -> None:
    done = _child(tmp_path, "raise KeyError('no such engine')")
    assert done.returncode == 1 and "KeyError" in done.stderr  # the original error still shows
    (path,) = (tmp_path / "state" / "crash").glob("*.json")
    report = _load(path)
    assert report["cause"] == "unhandled-exception"
    assert "KeyError" in report["error"]["type"]
    clean = _child(tmp_path / "clean", "reporter.close()")
    assert clean.returncode == 0, clean.stderr
    assert not list((tmp_path / "clean" / "state" / "crash").glob("hard-*"))


def test_the_loop_s_and_the_engine_s_entries_for_one_request_are_merged(tmp_path: Path) -> None:
    """The stage loop knows where a record came from, the engine what it is: one entry each."""
    reporter = crash.install(_settings(tmp_path), "compute", _inflight, hooks=False)
    try:
        reporter.add_inflight(
            lambda: [{"request_id": "req-2", "topic": "t", "partition": 3, "offset": 9}]
        )
        entries = {e["request_id"]: e for e in reporter.inflight()}
    finally:
        reporter.close()
    assert sorted(entries) == ["req-1", "req-2"]
    assert entries["req-2"]["prompt_tokens"] == 5
    assert (entries["req-2"]["partition"], entries["req-2"]["offset"]) == (3, 9)
