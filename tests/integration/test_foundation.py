"""The foundation against real services: produce/consume on the broker, objects on MinIO."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.kafka.broker import BrokerConfig, start_broker
from infra.process import InfraError, ServiceHandle
from pipeline import admin
from pipeline.config import Settings
from tests.conftest import S3Endpoint


async def test_produce_and_consume_on_the_real_broker(
    bootstrap: str, topic_factory: Callable[..., Awaitable[str]]
) -> None:
    topic = await topic_factory(partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = {f"conv-{i}": {"n": i} for i in range(30)}
        for key, value in sent.items():
            await producer.send_and_wait(
                topic, orjson.dumps(value), key=key.encode(), headers=[("h", b"v")]
            )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: dict[str, Any] = {}
    partitions_by_key: dict[str, int] = {}
    try:
        while len(got) < len(sent):
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "no records came back from the broker within 5 s"
            for tp, records in batch.items():
                for rec in records:
                    assert rec.key is not None and rec.value is not None
                    key = rec.key.decode()
                    got[key] = orjson.loads(rec.value)
                    partitions_by_key[key] = tp.partition
                    assert rec.headers == (("h", b"v"),)
    finally:
        await consumer.stop()
    assert got == sent
    assert len(set(partitions_by_key.values())) > 1, "keys should spread over partitions"


async def test_topics_create_is_idempotent_and_lists_every_topic_with_its_dlt(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(partitions=4)
    created, existing = await admin.create_topics(settings)
    assert sorted(created) == sorted(settings.topics.all_topics()) and existing == []
    created, existing = await admin.create_topics(settings)
    assert created == [] and sorted(existing) == sorted(settings.topics.all_topics())
    infos = {i.name: i for i in await admin.describe_topics(settings)}
    for topic in settings.topics.main_topics():
        assert infos[topic].partitions == 4
        assert infos[f"{topic}.DLT"].partitions == 4
        assert infos[topic].end_offsets == {p: 0 for p in range(4)}
    assert infos[settings.topics.replies].partitions == 4  # replies_topic_partitions=0
    assert infos[settings.topics.control].partitions == 1
    for edge in settings.topics.edge_topics():
        assert f"{edge}.DLT" not in infos


async def test_objects_stored_and_read_back_on_real_minio(
    bucket_factory: Callable[[], Awaitable[str]], s3_endpoint: S3Endpoint
) -> None:
    bucket = await bucket_factory()
    body = orjson.dumps({"hello": "object storage"})
    async with s3_endpoint.client() as s3:
        await s3.put_object(Bucket=bucket, Key="a/b/c.json", Body=body)
        listed = await s3.list_objects_v2(Bucket=bucket, Prefix="a/")
        assert [o["Key"] for o in listed["Contents"]] == ["a/b/c.json"]
        obj = await s3.get_object(Bucket=bucket, Key="a/b/c.json")
        assert await obj["Body"].read() == body


def test_a_taken_port_is_a_clear_error(tmp_path: Path, kafka_broker: ServiceHandle) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(InfraError, match=rf"port 127.0.0.1:{port} is already taken"):
            start_broker(BrokerConfig(port=port, data_dir=tmp_path))


def test_cli_up_topics_down_leaves_no_process_behind(tmp_path: Path) -> None:
    """The README's path: ``sluice up && sluice topics create && sluice topics list``, then down."""
    import os
    import subprocess
    import sys

    from infra.process import ServiceHandle as Handle
    from infra.process import pid_alive

    env = dict(os.environ, SLUICE_RUN_DIR=str(tmp_path / "run"))
    env.pop("SLUICE_BOOTSTRAP_SERVERS", None)
    sluice = [sys.executable, "-m", "sluice.cli.main"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*sluice, *args], env=env, capture_output=True, text=True, timeout=180, check=False
        )

    started = run("up")
    assert started.returncode == 0, started.stderr
    handle = Handle.load(tmp_path / "run" / "kafka.json")
    assert handle is not None and pid_alive(handle.pid)
    try:
        assert run("up").returncode == 0  # idempotent: the same broker
        assert Handle.load(tmp_path / "run" / "kafka.json") == handle
        created = run("topics", "create")
        assert created.returncode == 0, created.stderr
        listed = run("topics", "list")
        assert listed.returncode == 0, listed.stderr
        for topic in Settings().topics.all_topics():
            assert topic in listed.stdout
    finally:
        stopped = run("down")
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_alive(handle.pid), "sluice down left the broker running"
    assert not (tmp_path / "run" / "kafka.json").exists()
