"""The engine's provider check: which provider a model wants, and a clear failure without it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from stages.engines.providers import (
    EngineSetupError,
    check_providers,
    installed_versions,
    wanted_providers,
)
from tests.paths import REPO_ROOT

DEMO = REPO_ROOT / "models" / "demo" / "cpu-int8"
CPU_ONLY = ("CPUExecutionProvider",)
WITH_CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")


def model(tmp_path: Path, provider_options: object) -> Path:
    config = {"model": {"decoder": {"session_options": {"provider_options": provider_options}}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    return tmp_path


def versions_of(installed: dict[str, str]) -> Callable[[Sequence[str]], dict[str, str]]:
    def versions(names: Sequence[str]) -> dict[str, str]:
        return {n: v for n, v in installed.items() if n in names}

    return versions


CPU_INSTALL = versions_of({"onnxruntime-genai": "0.18.0", "onnxruntime": "1.31.1"})
CUDA_INSTALL = versions_of({"onnxruntime-genai-cuda": "0.18.0", "onnxruntime-gpu": "1.31.1"})


def test_the_demo_model_wants_cpu_and_runs_on_this_install() -> None:
    assert wanted_providers(DEMO) == ()
    report = check_providers(DEMO)  # the real onnxruntime of this environment
    assert report.runs_on == "CPUExecutionProvider"
    assert "onnxruntime-genai" in report.packages
    assert report.describe().startswith("model wants cpu; runs on CPUExecutionProvider")


def test_a_cuda_model_on_a_cpu_only_install_fails_naming_the_fix(tmp_path: Path) -> None:
    path = model(tmp_path, [{"cuda": {"enable_cuda_graph": "1"}}])
    with pytest.raises(EngineSetupError) as caught:
        check_providers(path, available=lambda: CPU_ONLY, versions=CPU_INSTALL)
    message = str(caught.value)
    assert "built for cuda (CUDAExecutionProvider)" in message
    assert "offers only CPUExecutionProvider" in message
    assert "sluice-llm[cuda]" in message
    assert caught.value.fatal


def test_a_cuda_model_on_the_cuda_install_reports_its_provider(tmp_path: Path) -> None:
    path = model(tmp_path, [{"cuda": {}}])
    report = check_providers(path, available=lambda: WITH_CUDA, versions=CUDA_INSTALL)
    assert report.runs_on == "CUDAExecutionProvider"
    assert report.describe() == (
        "model wants cuda; runs on CUDAExecutionProvider; "
        "installed: onnxruntime-genai-cuda 0.18.0, onnxruntime-gpu 1.31.1"
    )


def test_a_cpu_model_runs_on_the_cuda_install(tmp_path: Path) -> None:
    path = model(tmp_path, [])
    report = check_providers(path, available=lambda: WITH_CUDA, versions=CUDA_INSTALL)
    assert report.runs_on == "CPUExecutionProvider"


def test_no_engine_package_says_which_extra_to_install(tmp_path: Path) -> None:
    path = model(tmp_path, [])
    with pytest.raises(EngineSetupError, match=r"no ONNX Runtime GenAI engine.*sluice-llm\[cpu\]"):
        check_providers(path, available=lambda: CPU_ONLY, versions=versions_of({}))


def test_both_engine_packages_installed_is_refused_when_the_wanted_provider_is_missing(
    tmp_path: Path,
) -> None:
    both = versions_of({"onnxruntime-genai": "0.18.0", "onnxruntime-genai-cuda": "0.18.0"})
    with pytest.raises(EngineSetupError, match="onnxruntime-genai and onnxruntime-genai-cuda"):
        check_providers(model(tmp_path, [{"cuda": {}}]), available=lambda: CPU_ONLY, versions=both)


def test_cpu_and_gpu_onnxruntime_side_by_side_is_refused_without_cuda(tmp_path: Path) -> None:
    mixed = versions_of(
        {"onnxruntime-genai-cuda": "0.18.0", "onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"}
    )
    with pytest.raises(EngineSetupError, match="onnxruntime and onnxruntime-gpu are both"):
        check_providers(model(tmp_path, [{"cuda": {}}]), available=lambda: CPU_ONLY, versions=mixed)


def test_side_by_side_packages_whose_import_has_the_provider_run_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The GPU packages on PYTHONPATH ahead of an image's CPU onnxruntime: the import that wins
    offers CUDA, so the model runs, and the clash is said in the log."""
    mixed = versions_of(
        {"onnxruntime-genai-cuda": "0.18.0", "onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"}
    )
    with caplog.at_level("WARNING", logger="stages.engines.providers"):
        report = check_providers(
            model(tmp_path, [{"cuda": {}}]), available=lambda: WITH_CUDA, versions=mixed
        )
    assert report.runs_on == "CUDAExecutionProvider"
    assert "onnxruntime and onnxruntime-gpu are both installed" in caplog.text


def test_a_missing_or_broken_config_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineSetupError, match=r"has no genai_config\.json"):
        wanted_providers(tmp_path)
    (tmp_path / "genai_config.json").write_text("{not json")
    with pytest.raises(EngineSetupError, match="cannot read"):
        wanted_providers(tmp_path)
    model(tmp_path, {"cuda": {}})
    with pytest.raises(EngineSetupError, match="provider_options is not a list"):
        wanted_providers(tmp_path)


def test_installed_versions_reads_real_distributions() -> None:
    found = installed_versions(["pydantic", "surely-not-a-real-distribution"])
    assert list(found) == ["pydantic"]
