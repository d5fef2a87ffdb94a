"""``sluice infer`` writes answers as they arrive and resumes: a run killed with SIGKILL part-way,
run again with ``--resume``, leaves every prompt answered exactly once, in input order."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from infra.process import ServiceHandle
from pipeline import admin
from pipeline.aio import run_async
from pipeline.config import Settings
from sluice.procs import stage_env
from tests.integration.batch_helpers import Stack
from tests.paths import REPO_ROOT

PROMPTS = 60


@pytest.fixture
def stack(kafka_broker: ServiceHandle, tmp_path: Path) -> Iterator[Stack]:
    settings = Settings(
        bootstrap_servers=kafka_broker.address,
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        state_dir=tmp_path / "state",
        partitions=2,
        engine="echo",
        echo_delay_ms=300,
    )
    run_async(admin.create_topics(settings))
    stack = Stack(settings, tmp_path)
    try:
        stack.start_stages()
        yield stack
    finally:
        stack.stop()


def _infer(stack: Stack, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sluice.cli.client", "infer", "--file", str(prompts),
            "--out", str(out), "--batch-size", "2", "--max-in-flight", "2", *extra]  # fmt: skip


def test_a_killed_infer_resumes_and_each_prompt_is_answered_once_in_order(
    stack: Stack, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps(f"line {i}") + b"\n" for i in range(PROMPTS)))
    out = tmp_path / "answers.jsonl"
    env = stage_env(stack.settings)
    first = subprocess.Popen(_infer(stack, prompts, out), env=env, cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while _count(out) < 10:  # written as they arrive, not at the end
            assert first.poll() is None, f"infer ended early:\n{stack.log()}"
            assert time.monotonic() < deadline, f"no answers:\n{stack.log()}"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
        assert first.stderr is not None
        first.stderr.close()
    kept = [orjson.loads(line) for line in out.read_bytes().splitlines() if line.endswith(b"}")]
    assert 10 <= len(kept) < PROMPTS
    assert [r["index"] for r in kept] == list(range(len(kept)))  # input order

    second = subprocess.run(_infer(stack, prompts, out, "--resume"), env=env, cwd=REPO_ROOT,
                            capture_output=True, timeout=300, check=False)  # fmt: skip
    assert second.returncode == 0, second.stderr.decode()
    assert f"resuming: {len(kept)} of {PROMPTS}" in second.stderr.decode()
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["index"] for r in rows] == list(range(PROMPTS))  # each once, in order
    assert rows[: len(kept)] == kept  # what the first run wrote is kept as it was
    texts = [r["answer"]["choices"][0]["message"]["content"] for r in rows]
    assert texts == [f"line {i}" for i in range(PROMPTS)]


def _count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0
