"""The images' install script in a fresh venv: what both Dockerfiles run, proved without a
container engine (none is available to CI). Installs the pinned [cpu] set from PyPI (pip's cache
makes a second run quick) and checks the engine's provider report on the demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

pytestmark = pytest.mark.integration


def test_install_script_builds_a_working_cpu_install_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "infra" / "docker" / "install.sh"), str(venv), "cpu"],
        capture_output=True, text=True, timeout=900, check=False,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
             "HOME": str(Path.home()), "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "installed sluice-llm 0.1.0 with onnxruntime-genai 0.18" in done.stdout
    assert "model wants cpu; runs on CPUExecutionProvider" in done.stdout
    assert (venv / "bin" / "sluice").is_file()
    freeze = subprocess.run([str(venv / "bin" / "pip"), "freeze"], capture_output=True,
                            text=True, timeout=60, check=True).stdout  # fmt: skip
    assert "onnxruntime-genai-cuda" not in freeze and "onnxruntime-gpu" not in freeze
    assert "onnxruntime-genai==0.18.0" in freeze
