"""Stage processes: ``sluice run <stage>`` as a child process configured like given settings.

Used by ``sluice demo``, the benchmarks and the integration tests, so that all three start
stages exactly the way an operator would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from pipeline.config import Settings


def stage_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a stage process configured exactly like ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()  # str() would hand the child "**********"
        if value is not None:
            env[f"SLUICE_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class StageProcess:
    """One ``sluice run <stage>`` subprocess, logging to a file."""

    stage: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StageProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sluice.cli.main", "run", self.stage],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def sigterm(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until it exited)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]
