"""``sluice up --minio`` / ``sluice down`` as an operator runs them, on a private run folder.

``up`` must print the credentials it started MinIO with and environment lines that really point
the archiver at a bucket there; ``down`` stops both; a taken port is one error line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.storage import open_store
from tests.paths import REPO_ROOT


def sluice(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_RUN_DIR"] = str(run_dir)
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli.main", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "run"
    yield folder
    sluice(folder, "down")  # whatever the test did, nothing is left running


async def test_up_minio_prints_credentials_and_lines_that_work(run_dir: Path) -> None:
    up = sluice(run_dir, "up", "--minio")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "user sluice-test, password sluice-test-secret" in up.stdout
    exports = dict(
        line.strip().removeprefix("export ").split("=", 1)
        for line in up.stdout.splitlines()
        if line.strip().startswith("export ")
    )
    assert exports["SLUICE_ARCHIVE_URL"] == "s3://sluice/archive"
    assert set(exports) == {
        "SLUICE_BOOTSTRAP_SERVERS",
        "SLUICE_ARCHIVE_URL",
        "SLUICE_S3_ENDPOINT_URL",
        "SLUICE_S3_ACCESS_KEY_ID",
        "SLUICE_S3_SECRET_ACCESS_KEY",
    }
    # What the archiver would build from that environment stores and reads back an object.
    fields: dict[str, Any] = {k.removeprefix("SLUICE_").lower(): v for k, v in exports.items()}
    settings = Settings(**fields)
    store = open_store(settings)
    try:
        await store.put("probe/one.txt", b"stored")
        assert await store.get("probe/one.txt") == b"stored"
    finally:
        await store.close()

    again = sluice(run_dir, "up", "--minio")  # idempotent: the same services, the same lines
    assert again.returncode == 0
    assert [line for line in again.stdout.splitlines() if "export" in line] == [
        line for line in up.stdout.splitlines() if "export" in line
    ]
    down = sluice(run_dir, "down")
    assert down.returncode == 0
    assert down.stdout.splitlines() == [
        f"stopped kafka {exports['SLUICE_BOOTSTRAP_SERVERS']}",
        f"stopped minio {exports['SLUICE_S3_ENDPOINT_URL'].removeprefix('http://')}",
    ]


def test_up_on_a_taken_port_is_one_line(run_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        up = sluice(run_dir, "up", "--port", str(port))
    assert up.returncode == 3
    assert up.stderr.strip().splitlines() == [
        f"error: cannot start the Kafka broker: port 127.0.0.1:{port} is already taken "
        "(Address already in use); stop whatever holds it or choose another port"
    ]
