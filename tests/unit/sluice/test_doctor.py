"""sluice doctor's local checks and its HTML page, without a broker."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Settings
from pipeline.observability.crash_content import new_report, save_report
from sluice.doctor import Check, DoctorReport, crash_checks, machine_checks
from sluice.doctor_html import render_html


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_memory_below_three_times_the_model_is_red(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"\0" * 4096)
    settings = Settings(model_path=model, engine="onnx")
    small = _by_name(
        machine_checks(
            settings, cpus=4, memory_limit=3 * 4096 - 1, gpus=[], available=["CPUExecutionProvider"]
        )
    )
    assert small["memory"].verdict == "red" and "3x" in small["memory"].fix
    enough = _by_name(
        machine_checks(
            settings, cpus=4, memory_limit=3 * 4096, gpus=[], available=["CPUExecutionProvider"]
        )
    )
    assert enough["memory"].verdict == "ok"
    assert enough["provider"].summary == "CPUExecutionProvider will be used"


def test_a_cuda_model_without_a_gpu_or_provider_is_red(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "genai_config.json").write_text('{"provider_options": [{"cuda": {}}]}')
    settings = Settings(model_path=model, engine="onnx")
    checks = _by_name(
        machine_checks(
            settings, cpus=1, memory_limit=1 << 40, gpus=[], available=["CPUExecutionProvider"]
        )
    )
    assert checks["gpu"].verdict == "red" and checks["provider"].verdict == "red"
    assert checks["cpu"].verdict == "warn"
    gpu = [{"index": 0, "name": "H200", "memory_used_bytes": 0, "memory_total_bytes": 1 << 37}]
    with_gpu = _by_name(
        machine_checks(
            settings, cpus=8, memory_limit=1 << 40, gpus=gpu, available=["CUDAExecutionProvider"]
        )
    )
    assert with_gpu["gpu"].verdict == "ok" and with_gpu["provider"].verdict == "ok"


def test_recent_crashes_are_red_grouped_and_unreadable_files_warn(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", crash_copy_to_archive=False)
    for _ in range(2):
        report = new_report(
            settings, "compute", "engine-stall", pid=7, written_by="process", started_at=None
        )
        report["error"] = {"message": "engine stalled"}
        save_report(settings, report)
    (tmp_path / "state" / "crash" / "broken.json").write_text("{")
    doctor = DoctorReport()
    crash_checks(settings, doctor)
    checks = _by_name(doctor.checks)
    stall = checks["compute: engine-stall"]
    assert stall.verdict == "red" and stall.summary.startswith("2x")
    assert stall.fix.startswith("sluice doctor --crash ")
    assert checks["unreadable reports"].verdict == "warn"
    later = DoctorReport()
    crash_checks(settings, later, now=time.time() + 7200)
    assert _by_name(later.checks)["compute: engine-stall"].verdict == "warn"


def test_the_html_page_is_self_contained_and_escapes_text() -> None:
    report = DoctorReport()
    report.add(Check("groups", "compute", "red", "stopped <b>now</b>", "start it"))
    report.lag_series = {"sluice-compute": [(0.0, 5), (2.0, 9)]}
    report.dead_letters = {"preprocess / bad-json": 3}
    report.memory_before_death = {
        "stage": "compute",
        "cause": "out-of-memory",
        "points": [[0.0, 1e8, 2e8], [5.0, 1.9e8, 2e8]],
    }
    page = render_html(report, "127.0.0.1:9092")
    assert "<script" not in page and "<link" not in page
    assert "stopped &lt;b&gt;now&lt;/b&gt;" in page
    assert page.count("<svg") == 3 and page.count("<polyline") == 3 and "<rect" in page
    assert "sluice doctor: 1 red" in page
