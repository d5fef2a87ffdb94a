"""Session services for the suite: a real Kafka broker and a real MinIO, started on free ports.

Both start lazily, the first time a test asks for them, and only once per session. A service
that cannot start fails the tests that need it, with the service's log in the failure.
Tests under ``tests/integration`` are marked ``integration``; the rest are unit tests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra.kafka.broker import DEFAULT_KAFKA_VERSION, BrokerConfig, start_broker, stop_broker
from infra.minio.server import MinioConfig, start_minio, stop_minio
from infra.process import InfraError, ServiceHandle
from pipeline import admin
from pipeline.config import Settings
from pipeline.logs import remove_kafka_log_summary

_started: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _started.values():
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _no_kafka_log_summary_between_tests() -> Iterator[None]:
    """A test that runs a command's ``setup_logging`` leaves aiokafka's loggers routed through
    a summary with state of its own; the next test starts without it."""
    yield
    remove_kafka_log_summary()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    """One real KRaft broker for the whole session."""
    t0 = time.monotonic()
    try:
        handle = start_broker(BrokerConfig(data_dir=tmp_path_factory.mktemp("kafka")))
    except InfraError as exc:
        pytest.fail(f"the Kafka broker did not start, so integration tests cannot run:\n{exc}")
    _started["kafka"] = (
        f"services: Apache Kafka {DEFAULT_KAFKA_VERSION} (KRaft) at {handle.address}, "
        f"ready {time.monotonic() - t0:.1f}s after launch"
    )
    yield handle
    stop_broker(handle)


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    """One real MinIO for the whole session."""
    t0 = time.monotonic()
    try:
        handle = start_minio(MinioConfig(data_dir=tmp_path_factory.mktemp("minio")))
    except InfraError as exc:
        pytest.fail(f"MinIO did not start, so object-storage tests cannot run:\n{exc}")
    _started["minio"] = (
        f"services: MinIO at http://{handle.address}, "
        f"ready {time.monotonic() - t0:.1f}s after launch"
    )
    yield handle
    stop_minio(handle)


@pytest.fixture
def bootstrap(kafka_broker: ServiceHandle) -> str:
    return kafka_broker.address


@pytest.fixture
def settings_factory(kafka_broker: ServiceHandle, tmp_path: Path) -> Callable[..., Settings]:
    """Settings pointing at the session broker, with a fresh topic prefix and state folder."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "bootstrap_servers": kafka_broker.address,
            "topic_prefix": f"t{uuid.uuid4().hex[:12]}.",
            "state_dir": tmp_path / "state",
            "partitions": 3,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def topic_factory(
    kafka_broker: ServiceHandle,
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Create uuid-named topics on the session broker."""

    async def make(partitions: int = 3, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex}"
        settings = Settings(bootstrap_servers=kafka_broker.address)
        await admin.create_topics(settings, [name], partitions=partitions)
        return name

    yield make


@dataclass(frozen=True)
class S3Endpoint:
    """How tests reach the session MinIO."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        """An ``async with`` S3 client context (aioboto3)."""
        import aioboto3

        return aioboto3.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@pytest.fixture
def s3_endpoint(minio_server: ServiceHandle) -> S3Endpoint:
    from infra.minio.server import TEST_ACCESS_KEY, TEST_SECRET_KEY

    return S3Endpoint(f"http://{minio_server.address}", TEST_ACCESS_KEY, TEST_SECRET_KEY)


@pytest.fixture
async def bucket_factory(s3_endpoint: S3Endpoint) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Create uuid-named buckets on the session MinIO."""

    async def make() -> str:
        name = f"sluice-{uuid.uuid4().hex[:20]}"
        async with s3_endpoint.client() as s3:
            await s3.create_bucket(Bucket=name)
        return name

    yield make
