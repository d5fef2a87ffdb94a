"""The wheel on its own: built, installed into a fresh venv, and run far from the checkout.

The fixture copies the files git knows (tracked, and new ones not ignored) to a temporary
folder, builds the wheel there (``pip wheel --no-build-isolation``: this venv's setuptools, so no
build environment is downloaded, and no ``build/`` or ``*.egg-info`` lands in the checkout),
makes a venv without pip, and installs the wheel into it with this venv's pip
(``pip --python``), dependencies included. That is a real install from the package index through
pip's cache, not a shortcut: every dependency the wheel declares is resolved and installed, and
nothing of this environment or of the checkout is visible to it. With a warm pip cache it takes
about 16 s on two busy cores (about 90 s when pip must fetch the index pages again); the
``sluice demo`` that follows takes 15-50 s.

The commands then run from another temporary folder, with no ``PYTHONPATH`` and no ``SLUICE_*``
settings: ``sluice --help``, ``sluice run`` against no broker (one error line), and ``sluice
demo``, which starts its own broker from the cached Kafka jars and three ``sluice run`` stage
processes serving the demo model that ships inside the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path
    work: Path  # the folder the commands run in: neither the checkout nor the venv

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self) -> dict[str, str]:
        drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLUICE_")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["COLUMNS"] = "200"  # rich wraps at 80 otherwise: keep the model's path on one line
        return env

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=self.work,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _checkout_files() -> list[str]:
    """What ``git`` would hand a fresh clone, plus new files not yet committed."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    return [
        name for name in listed.stdout.decode().split("\0") if name and (REPO_ROOT / name).is_file()
    ]


def _pip(*args: str, timeout: float = 600) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in _checkout_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(src))
    (wheel,) = (root / "dist").glob("sluice_llm-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # with the CPU engine, as `pip install sluice-llm[cpu]` does
    _pip("--python", str(venv / "bin" / "python"), "install", "-q", f"{wheel}[cpu]")
    purelib = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    work = root / "work"
    work.mkdir()
    return Installed(venv, Path(purelib), work)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


def test_the_wheel_carries_the_demo_model_and_defaults_state_to_the_working_folder(
    installed: Installed,
) -> None:
    model = installed.site_packages / "models" / "demo" / "cpu-int8"
    for name in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"):
        assert (model / name).is_file(), f"the wheel lacks models/demo/cpu-int8/{name}"
    probe = (
        "import pipeline.config as c, sluice; s = c.Settings(); "
        "print(c.DEFAULT_MODEL); print(sluice.__file__); "
        "print(s.state_dir.resolve()); print(s.archive_url)"
    )
    done = installed.run(installed.bin("python"), "-c", probe)
    assert done.returncode == 0, done.stderr
    default_model, package, state, archive = done.stdout.splitlines()
    assert Path(default_model) == model
    assert Path(package).is_relative_to(installed.site_packages)
    assert Path(state) == (installed.work / ".sluice").resolve()
    assert archive == "file://.sluice/archive"  # relative: the working folder, as state
    assert sysconfig.get_path("purelib") != str(installed.site_packages)


def test_sluice_help_and_a_failing_run_work_from_another_folder(installed: Installed) -> None:
    done = installed.run(installed.bin("sluice"), "--help")
    assert done.returncode == 0, done.stderr
    for command in ("demo", "run", "send", "topics", "replay"):
        assert command in done.stdout
    env_broker = installed.env() | {"SLUICE_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    failed = subprocess.run(
        [installed.bin("sluice"), "run", "preprocess"],
        cwd=installed.work,
        env=env_broker,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines() == [
        "error: cannot reach the Kafka broker at 127.0.0.1:1: is it running, and is "
        "SLUICE_BOOTSTRAP_SERVERS right? (sluice up starts a local one)"
    ]


def test_sluice_demo_runs_from_the_wheel_and_writes_nothing_into_site_packages(
    installed: Installed,
) -> None:
    before = _snapshot(installed.site_packages)
    done = installed.run(installed.bin("sluice"), "demo", timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    model = installed.site_packages / "models" / "demo" / "cpu-int8"
    assert f"model  {model}" in output  # the model inside site-packages, not the checkout's
    assert output.count("✓") == 6, output
    for noise in ("Traceback", "NotLeaderForPartition", "GroupCoordinatorNotAvailable"):
        assert noise not in output, output
    after = _snapshot(installed.site_packages)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the demo wrote into site-packages: {changed[:10]}"
    assert list(installed.work.iterdir()) == []  # the demo keeps its state in a temporary folder
