"""The edge on a real broker: request ids unique across re-created topics, cancels on the
control topic, three gateways each reading only their own reply partition, and a minute-long
broker outage that costs no request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from infra.process import InfraError, ServiceHandle, free_port
from pipeline import admin
from pipeline.client import SluiceClient
from pipeline.config import Settings
from schemas.headers import header_value
from schemas.ids import positional_request_id
from sluice.procs import StageProcess, stage_env
from tests.paths import REPO_ROOT


async def _read_all(settings: Settings, topic: str, partitions: int) -> list[Any]:
    """Every record of ``topic`` (aiokafka ``ConsumerRecord``s)."""
    consumer = AIOKafkaConsumer(**settings.kafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while len(records) < sum(ends.values()):
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


# --- request ids ------------------------------------------------------------------------------


async def test_a_recreated_topic_gives_the_same_offset_another_request_id(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    topic = settings.topics.prompts
    cluster = await admin.cluster_id(settings)
    ids: list[str] = []
    for _ in range(2):
        await admin.create_topics(settings, [topic], partitions=1)
        producer = AIOKafkaProducer(**settings.kafka_common(), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"{}", partition=0)
        finally:
            await producer.stop()
        (record,) = await _read_all(settings, topic, 1)
        again = (await _read_all(settings, topic, 1))[0]
        rid = positional_request_id(cluster, topic, 0, record.offset, record.timestamp)
        assert record.offset == 0
        assert rid == positional_request_id(cluster, topic, 0, 0, again.timestamp)
        ids.append(rid)
        client = AIOKafkaAdminClient(**settings.kafka_common())
        await client.start()
        try:
            await client.delete_topics([topic])
        finally:
            await client.close()
        for _ in range(150):  # deletion is asynchronous on the broker
            if topic in await admin.missing_topics(settings, [topic]):
                break
            await asyncio.sleep(0.2)
    assert ids[0] != ids[1]


# --- cancels ----------------------------------------------------------------------------------


async def test_cancel_publishes_a_cancel_message_on_the_control_topic(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    await admin.create_topics(settings)
    async with SluiceClient(settings, source="test") as client:
        assert client.reply_partitions == [0]  # instance id 0 of a 3-partition replies topic
        await client.cancel("req-1", "client left")
    (record,) = await _read_all(settings, settings.topics.control, 1)
    assert orjson.loads(record.value) == {"id": "req-1", "reason": "client left"}
    assert header_value(record.headers, "ce_type") == "sluice.cancel"


# --- three gateways ---------------------------------------------------------------------------


def _gateway(settings: Settings, instance: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = stage_env(settings, SLUICE_INSTANCE_ID=str(instance), SLUICE_GATEWAY_PORT=str(port))
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stages.gateway"],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _ready(url: str, proc: subprocess.Popen[bytes], log: Path, within: float = 90) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, _tail(log)
            try:
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.3)
    pytest.fail(f"gateway {url} not ready:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


async def test_three_gateways_each_read_only_their_own_reply_partition(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(engine="echo", request_timeout_s=60)
    await admin.create_topics(settings)
    stages = [
        StageProcess(s, stage_env(settings), tmp_path / f"{s}.log").start()
        for s in ("preprocess", "compute", "postprocess")
    ]
    ports = [free_port() for _ in range(3)]
    logs = [tmp_path / f"gateway-{i}.log" for i in range(3)]
    procs = [_gateway(settings, i, ports[i], logs[i]) for i in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url, proc, log in zip(urls, procs, logs, strict=True):
            await _ready(url, proc, log)
        async with httpx.AsyncClient(timeout=60) as http:

            async def ask(gateway: int, n: int) -> httpx.Response:
                body = {"messages": [{"role": "user", "content": f"g{gateway} q{n}"}]}
                return await http.post(f"{urls[gateway]}/v1/chat/completions", json=body)

            answers = await asyncio.gather(*(ask(g, n) for g in range(3) for n in range(8)))
            refused = await http.post(
                f"{urls[1]}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "f"}]},
            )
            developer = await http.post(
                f"{urls[2]}/v1/chat/completions",
                json={
                    "messages": [
                        {"role": "developer", "content": "be brief"},
                        {"role": "user", "content": "hi"},
                    ]
                },
            )
            metrics = [(await http.get(f"{url}/metrics")).text for url in urls]
        for index, response in enumerate(answers):
            assert response.status_code == 200, response.text
            content = response.json()["choices"][0]["message"]["content"]
            assert content.endswith(f"g{index // 8} q{index % 8}")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
        assert developer.status_code == 200, developer.text
        for text in metrics:  # nobody else's answer reached any of them
            assert 'sluice_gateway_answers_total{outcome="foreign"} 0.0' in text, text
        copies = await _read_all(settings, settings.topics.replies, 3)
        by_partition: dict[int, set[str]] = {}
        for record in copies:
            if header_value(list(record.headers), "ce_type") == "sluice.delta":
                continue  # the partition also carries compute's deltas
            body = orjson.loads(record.value)
            words = body["choices"][0]["message"]["content"].split()
            gateway = words[-2] if len(words) >= 2 else "g2"  # "hi": the developer-role one
            by_partition.setdefault(record.partition, set()).add(gateway)
        assert by_partition == {0: {"g0"}, 1: {"g1"}, 2: {"g2"}}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for stage in stages:
            stage.stop()


# --- a broker outage --------------------------------------------------------------------------

OUTAGE_S = 60.0


async def test_a_minute_without_the_broker_costs_no_request(tmp_path: Path) -> None:
    """A steady load through a 60 s broker outage, 120 s timeouts: every prompt is published
    (the stages start once the broker is back, so every request is answered from Kafka)."""
    try:  # a broker of its own: the session's must stay up for the other tests
        broker = await asyncio.to_thread(start_broker, BrokerConfig(data_dir=tmp_path / "kafka"))
    except InfraError as exc:
        pytest.fail(f"the Kafka broker did not start:\n{exc}")
    settings = Settings(
        bootstrap_servers=broker.address,
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        state_dir=tmp_path / "state",
        partitions=2,
        engine="echo",
        request_timeout_s=120,
    )
    await admin.create_topics(settings)
    stages: list[StageProcess] = []
    restarted: ServiceHandle | None = None
    try:
        async with SluiceClient(settings, source="test") as client:
            tasks = [asyncio.create_task(client.request(f"before {n}")) for n in range(3)]
            await asyncio.to_thread(stop_broker, broker)
            stopped = time.monotonic()
            red = False
            while time.monotonic() - stopped < OUTAGE_S:
                tasks.append(asyncio.create_task(client.request(f"during {len(tasks)}")))
                await asyncio.sleep(1.0)
                red = red or not client.ready
            config = BrokerConfig(
                port=broker.port, controller_port=broker.extra_port, data_dir=tmp_path / "kafka"
            )
            restarted = await asyncio.to_thread(start_broker, config)
            stages = [
                StageProcess(s, stage_env(settings), tmp_path / f"{s}.log").start()
                for s in ("preprocess", "compute", "postprocess")
            ]
            replies = await asyncio.gather(*tasks)  # a PublishError would raise here
            assert red, "the client stayed ready while the broker was away"
            assert client.ready
        late = [r for r in replies if not r.ok]
        assert late == [], [r.answer for r in late][:3]
        print(
            f"\n{len(replies)} requests through a {OUTAGE_S:.0f} s outage, 0 publish errors, "
            f"{client.publish_retries} publish retries"
        )
    finally:
        for stage in stages:
            stage.stop()
        stop_broker(restarted or broker)
