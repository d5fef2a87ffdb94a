"""Build (``go install``), start and stop MinIO on a free loopback port.

MinIO publishes no semver tags for its Go module, so the pin is the pseudo-version the module
proxy resolves; bump it deliberately. The first build takes a few minutes on two cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra.process import (
    InfraError,
    ServiceHandle,
    cache_root,
    ensure_port_free,
    free_port,
    log_tail,
    pid_alive,
    require_tool,
    run_root,
    spawn,
    stop_pid,
)

log = logging.getLogger(__name__)

MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
TEST_ACCESS_KEY = "sluice-test"
TEST_SECRET_KEY = "sluice-test-secret"  # local test credentials only, never a real secret
GO_HINT = "Go builds MinIO from its module (Debian: apt-get install golang, or go.dev)"


@dataclass
class MinioConfig:
    port: int = 0
    console_port: int = 0
    data_dir: Path | None = None
    access_key: str = TEST_ACCESS_KEY
    secret_key: str = TEST_SECRET_KEY
    start_timeout: float = 60.0


def default_state_file() -> Path:
    return run_root() / "minio.json"


def minio_binary() -> Path:
    return cache_root() / "bin" / "minio"


def ensure_minio(version: str = MINIO_VERSION) -> Path:
    """The MinIO binary, built with ``go install`` on first use (or when the pin changes)."""
    binary = minio_binary()
    stamp = binary.with_name("minio.version")
    if binary.exists() and stamp.exists() and stamp.read_text().strip() == version:
        return binary
    go = require_tool("go", GO_HINT)
    binary.parent.mkdir(parents=True, exist_ok=True)
    log.info("building MinIO %s with go install (a few minutes the first time)", version)
    env = dict(os.environ, GOBIN=str(binary.parent), CGO_ENABLED="0")
    result = subprocess.run(
        [go, "install", f"{MINIO_MODULE}@{version}"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0 or not binary.exists():
        raise InfraError(
            f"go install {MINIO_MODULE}@{version} failed (exit {result.returncode}):\n"
            f"{result.stderr[-4000:]}"
        )
    stamp.write_text(version)
    return binary


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def start_minio(cfg: MinioConfig | None = None) -> ServiceHandle:
    """Start MinIO with a (temporary unless given) data folder; returns once it is healthy."""
    cfg = cfg or MinioConfig()
    binary = ensure_minio()
    port = cfg.port or free_port()
    cport = cfg.console_port or free_port()
    ensure_port_free(port, what="MinIO")
    data_dir = cfg.data_dir or Path(tempfile.mkdtemp(prefix="sluice-minio-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    env = dict(
        os.environ,
        MINIO_ROOT_USER=cfg.access_key,
        MINIO_ROOT_PASSWORD=cfg.secret_key,
        MINIO_BROWSER="off",
        MINIO_UPDATE="off",
    )
    cmd = [
        str(binary),
        "server",
        str(data_dir / "data"),
        "--quiet",
        "--address",
        f"127.0.0.1:{port}",
        "--console-address",
        f"127.0.0.1:{cport}",
    ]
    pid = spawn(cmd, log_path, env)
    handle = ServiceHandle(
        name="minio",
        pid=pid,
        host="127.0.0.1",
        port=port,
        log_path=str(log_path),
        data_dir=str(data_dir),
        extra_port=cport,
    )
    url = f"http://127.0.0.1:{port}/minio/health/live"
    start = time.monotonic()
    while time.monotonic() - start < cfg.start_timeout:
        if not pid_alive(pid):
            raise InfraError(
                f"MinIO exited during start-up; its log ({log_path}) ends:\n" + log_tail(log_path)
            )
        if _healthy(url):
            log.info("MinIO ready on %s in %.1fs", handle.address, time.monotonic() - start)
            return handle
        time.sleep(0.2)
    stop_pid(pid)
    raise InfraError(
        f"MinIO was not healthy within {cfg.start_timeout:.0f}s; its log ends:\n"
        + log_tail(log_path)
    )


def ensure_bucket(handle: ServiceHandle, bucket: str, access_key: str, secret_key: str) -> None:
    """Create ``bucket`` unless it is there already (idempotent)."""
    from botocore.exceptions import BotoCoreError, ClientError  # boto loads slowly: only here

    try:
        asyncio.run(_create_bucket(f"http://{handle.address}", bucket, access_key, secret_key))
    except (BotoCoreError, ClientError) as exc:
        raise InfraError(f"creating bucket {bucket} on MinIO failed: {exc}") from exc


async def _create_bucket(endpoint: str, bucket: str, access_key: str, secret_key: str) -> None:
    import aioboto3
    from botocore.exceptions import ClientError

    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
    ) as s3:
        try:
            await s3.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise


def stop_minio(handle: ServiceHandle, timeout: float = 15.0) -> None:
    stop_pid(handle.pid, timeout=timeout)
