"""``sluice up`` / ``sluice down``: the local broker (and optionally MinIO) for this user.

Handles are recorded under ``~/.cache/sluice/run/`` so that any later process (``sluice down``,
``sluice topics``, the stages) finds the running services.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from infra.kafka.broker import default_state_file as kafka_state_file
from infra.minio.server import (
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    MinioConfig,
    ensure_bucket,
    start_minio,
    stop_minio,
)
from infra.minio.server import default_state_file as minio_state_file
from infra.process import ServiceHandle, run_root

# The bucket ``up --minio`` creates, and where in it the archiver writes.
ARCHIVE_BUCKET = "sluice"
ARCHIVE_PREFIX = "archive"


@dataclass
class Status:
    kafka: ServiceHandle | None
    minio: ServiceHandle | None


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


def minio_credentials() -> Credentials:
    """The root user ``up`` starts MinIO with: fixed, local-only test credentials."""
    return Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY)


def minio_env(handle: ServiceHandle) -> list[str]:
    """``NAME=value`` lines that point the archiver (and replay, restore) at this MinIO."""
    creds = minio_credentials()
    return [
        f"SLUICE_ARCHIVE_URL=s3://{ARCHIVE_BUCKET}/{ARCHIVE_PREFIX}",
        f"SLUICE_S3_ENDPOINT_URL=http://{handle.address}",
        f"SLUICE_S3_ACCESS_KEY_ID={creds.access_key}",
        f"SLUICE_S3_SECRET_ACCESS_KEY={creds.secret_key}",
    ]


def _running(path: Path) -> ServiceHandle | None:
    handle = ServiceHandle.load(path)
    if handle is None:
        return None
    if handle.alive():
        return handle
    path.unlink(missing_ok=True)  # left over from a process that is gone
    return None


def status() -> Status:
    return Status(kafka=_running(kafka_state_file()), minio=_running(minio_state_file()))


def up(
    *, kafka: bool = True, minio: bool = False, kafka_port: int = 0, minio_port: int = 0
) -> Status:
    """Start what is asked for and not yet running; idempotent."""
    current = status()
    if kafka and current.kafka is None:
        data = run_root() / "kafka-data"
        shutil.rmtree(data, ignore_errors=True)
        current.kafka = start_broker(BrokerConfig(port=kafka_port, data_dir=data))
        current.kafka.save(kafka_state_file())
    if minio and current.minio is None:
        data = run_root() / "minio-data"
        creds = minio_credentials()
        cfg = MinioConfig(
            port=minio_port,
            data_dir=data,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
        )
        current.minio = start_minio(cfg)
        current.minio.save(minio_state_file())
        ensure_bucket(current.minio, ARCHIVE_BUCKET, creds.access_key, creds.secret_key)
    return current


def down() -> list[str]:
    """Stop every local service ``up`` started; returns what was stopped."""
    stopped: list[str] = []
    current = status()
    if current.kafka is not None:
        stop_broker(current.kafka)
        stopped.append(f"kafka {current.kafka.address}")
    if current.minio is not None:
        stop_minio(current.minio)
        stopped.append(f"minio {current.minio.address}")
    kafka_state_file().unlink(missing_ok=True)
    minio_state_file().unlink(missing_ok=True)
    return stopped
