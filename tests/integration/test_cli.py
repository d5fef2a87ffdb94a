"""Expected failures that need a live broker to happen: topics that were never created."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from infra.process import ServiceHandle
from pipeline.config import Topics
from tests.paths import REPO_ROOT


def sluice(broker: ServiceHandle, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env |= {"SLUICE_BOOTSTRAP_SERVERS": broker.address, "SLUICE_TOPIC_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli.main", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "args", [["run", "gateway"], ["run", "archiver"], ["run", "compute"], ["scale"]], ids=" ".join
)
def test_services_without_their_topics_say_so_in_one_line(
    kafka_broker: ServiceHandle, args: list[str]
) -> None:
    prefix = f"n{uuid.uuid4().hex[:10]}."
    done = sluice(kafka_broker, prefix, *args)
    assert done.returncode == 3
    flow = ("prompts", "tokenized", "generated", "answers", "prompts.batch", "tokenized.batch")
    missing = ", ".join(f"{prefix}{t}" for t in flow)
    assert done.stderr.strip().splitlines() == [
        f"error: topics missing: {missing} (create them with: sluice topics create)"
    ]


def test_topics_list_then_create_on_a_fresh_prefix(kafka_broker: ServiceHandle) -> None:
    prefix = f"n{uuid.uuid4().hex[:10]}."
    listed = sluice(kafka_broker, prefix, "topics", "list")
    assert listed.returncode == 1
    (line,) = listed.stderr.strip().splitlines()
    assert line.startswith(f"error: missing topics: {prefix}answers, {prefix}answers.DLT")
    created = sluice(kafka_broker, prefix, "topics", "create", "--partitions", "2")
    assert created.returncode == 0, created.stderr
    assert created.stderr == ""  # no retries logged: leaders and coordinator were waited for
    assert sorted(created.stdout.split()[1::2]) == sorted(Topics(prefix).all_topics())
    listed = sluice(kafka_broker, prefix, "topics", "list")
    assert listed.returncode == 0, listed.stderr
