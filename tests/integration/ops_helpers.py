"""Helpers for the operations tests: stage processes with their /metrics on known ports, the
``lag`` / ``dashboard`` commands as processes, HTTP polling, and the tools (promtool, Chromium)
that a test needs and must fail without."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from infra.process import free_port
from pipeline.config import Settings
from sluice.procs import StageProcess, stage_env
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
STAGES = ("preprocess", "compute", "postprocess")
CHROMIUM = Path("/usr/bin/chromium")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing: run infra/prometheus/install-promtool.sh (make test does)"
        )
    return path


def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run infra/chromium/install.sh (make test does)")
    return CHROMIUM


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclass
class OpsProcess:
    """``python -m sluice.cli.ops <args>`` (what ``sluice lag|dashboard`` run)."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OpsProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sluice.cli.ops", *self.args],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class Fleet:
    """Stage and ops processes started by one test; all stopped at its end."""

    tmp_path: Path
    stages: dict[str, tuple[StageProcess, int]] = field(default_factory=dict)
    ops: list[OpsProcess] = field(default_factory=list)

    def stage(self, stage: str, settings: Settings, **env: str) -> int:
        """Start ``sluice run <stage>`` with its /metrics on a free port; returns the port."""
        port = free_port()
        log = self.tmp_path / f"{stage}.log"
        proc = StageProcess(stage, stage_env(settings, SLUICE_HTTP_PORT=str(port), **env), log)
        self.stages[stage] = (proc.start(), port)
        return port

    def command(self, settings: Settings, *args: str) -> OpsProcess:
        log = self.tmp_path / f"ops-{len(self.ops)}.log"
        proc = OpsProcess(list(args), stage_env(settings), log).start()
        self.ops.append(proc)
        return proc

    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/metrics" for _, port in self.stages.values()]

    def logs(self) -> str:
        parts = [f"--- {s}\n{p.log()}" for s, (p, _) in self.stages.items()]
        parts += [f"--- {' '.join(o.args[:1])}\n{o.log()}" for o in self.ops]
        return "\n".join(parts)

    def stop(self) -> None:
        for op in self.ops:
            op.stop()
        for proc, _ in self.stages.values():
            proc.stop()


async def http_get(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.text()


async def wait_ready(url: str, fleet: Fleet, within: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; fail with the processes' logs otherwise."""
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        try:
            status, body = await http_get(url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = repr(exc)
        else:
            if status == 200:
                return
            last = f"{status} {body[:200]}"
        await asyncio.sleep(0.3)
    pytest.fail(f"{url} not ready within {within:.0f}s (last: {last})\n{fleet.logs()}")
