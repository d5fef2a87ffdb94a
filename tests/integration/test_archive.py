"""The conversation log on real MinIO and the real broker: layout, exactly-once, outages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.minio.server import MinioConfig, start_minio, stop_minio
from infra.process import ServiceHandle, free_port
from pipeline import admin
from pipeline.config import Settings
from pipeline.storage import ObjectNotFound, S3Store, open_store
from replay.restore import restore_conversation
from schemas.headers import header_value
from schemas.messages import ChatCompletion, decode_answer
from stages.archiver import Archiver
from tests.conftest import S3Endpoint
from tests.integration.archive_helpers import (
    MODEL,
    PIPELINE,
    Procs,
    end_offsets,
    http_get,
    metric,
    read_raw_archive,
    read_topic,
    run_cli,
    s3_settings,
    wait_committed,
)
from tests.integration.kafka_io import Item, collect, produce, prompt


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    started = Procs(tmp_path)
    yield started
    started.stop_all()


async def test_the_s3_store_round_trips_objects_on_minio(
    s3_endpoint: S3Endpoint, bucket_factory: Callable[[], Awaitable[str]]
) -> None:
    bucket = await bucket_factory()
    store = S3Store(
        bucket,
        "some/prefix",
        endpoint_url=s3_endpoint.endpoint_url,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
    )
    try:
        await store.put("topics/t/partition=0/a", b"\x00\xffbinary")
        await store.put("topics/t/partition=1/b", b"bee")
        await store.put("other", b"o")
        assert await store.get("topics/t/partition=0/a") == b"\x00\xffbinary"
        assert await store.list("topics/t/") == ["topics/t/partition=0/a", "topics/t/partition=1/b"]
        assert await store.list() == ["other", "topics/t/partition=0/a", "topics/t/partition=1/b"]
        await store.put("other", b"replaced")
        assert await store.get("other") == b"replaced"
        await store.delete("other")
        with pytest.raises(ObjectNotFound):
            await store.get("other")
    finally:
        await store.close()
    async with s3_endpoint.client() as s3:  # the prefix is a real key prefix, path-style
        listed = await s3.list_objects_v2(Bucket=bucket)
        assert sorted(o["Key"] for o in listed["Contents"]) == [
            "some/prefix/topics/t/partition=0/a",
            "some/prefix/topics/t/partition=1/b",
        ]


async def test_1000_prompts_and_answers_are_archived_once_each_in_the_connect_layout(
    settings_factory: Callable[..., Settings],
    s3_endpoint: S3Endpoint,
    bucket_factory: Callable[[], Awaitable[str]],
    procs: Procs,
) -> None:
    bucket = await bucket_factory()
    settings = settings_factory(
        model_path=MODEL,
        engine="echo",
        archive_max_records=100,
        archive_max_age_s=1.0,
        **s3_settings(s3_endpoint, bucket),
    )
    await admin.create_topics(settings)
    topics = settings.topics
    for stage in PIPELINE:
        procs.stage(stage, settings)
    port = free_port()
    archiver = procs.archiver(settings, SLUICE_HTTP_PORT=str(port))

    n = 1000
    items: list[Item] = [
        (f"conv-{i % 50}".encode(), prompt(f"question {i}", id=f"a-{i}"), []) for i in range(n)
    ]
    positions = await produce(settings, topics.prompts, items)
    answers = await collect(settings, topics.answers, until=n, within=120)
    assert len(answers.by_request()) == n
    procs.assert_alive()
    group = settings.group_id("archiver")
    await wait_committed(settings, group, [topics.prompts, topics.answers], 60, archiver)

    raw = await read_raw_archive(s3_endpoint, bucket, "log")
    assert raw.duplicates() == {}
    assert {t for t, _ in raw.records} == {topics.prompts, topics.answers}
    for topic in (topics.prompts, topics.answers):
        for partition, end in (await end_offsets(settings, topic)).items():
            assert raw.offsets(topic, partition) == list(range(end)), (topic, partition)
    archived = {
        (r.partition, r.offset): r
        for (t, _), rs in raw.records.items()
        for r in rs
        if t == topics.prompts
    }
    assert len(archived) == n
    for (key, value, _), where in zip(items, positions, strict=True):
        record = archived[where]
        assert (record.key, record.value) == (key, value)
    live_answers = await read_topic(settings, topics.answers)
    for (t, partition), records in raw.records.items():
        if t != topics.answers:
            continue
        for record in records:
            live = live_answers[(partition, record.offset)]
            assert (record.key, record.value, record.timestamp_ms) == (
                live.key,
                live.value,
                live.timestamp,
            )
            assert list(record.headers) == list(live.headers)
    print(f"\narchived {n} prompts and {n} answers in {len(raw.keys)} objects, each record once")

    status, text = await http_get(port, "/metrics")
    assert status == 200
    assert metric(text, "sluice_archiver_records_stored_total") == 2 * n
    assert metric(text, "sluice_archiver_objects_stored_total") == len(raw.keys)
    assert metric(text, "sluice_archiver_store_failures_total") == 0
    assert (await http_get(port, "/readyz"))[0] == 200

    # The log reads back as conversations: conv-7 is prompts 7, 57, 107, ... with answers.
    store = open_store(settings)
    try:
        turns = await restore_conversation(store, topics, "conv-7")
    finally:
        await store.close()
    assert [t.request_id for t in turns] == [f"a-{i}" for i in range(7, n, 50)]
    for turn in turns:
        assert turn.answer is not None
        assert turn.answer["content"] == turn.messages[-1]["content"]
    code, out = await run_cli(settings, "restore", "--conversation", "conv-7", "--format", "jsonl")
    assert code == 0, out
    rows = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["request_id"] for r in rows] == [t.request_id for t in turns]

    code, _ = archiver.sigterm(timeout=30)
    assert code == 0, archiver.log()


async def test_a_redo_after_lost_commits_overwrites_the_same_objects(
    settings_factory: Callable[..., Settings],
    s3_endpoint: S3Endpoint,
    bucket_factory: Callable[[], Awaitable[str]],
) -> None:
    bucket = await bucket_factory()
    settings = settings_factory(
        partitions=1,
        archive_max_records=100,
        archive_max_age_s=1.0,
        **s3_settings(s3_endpoint, bucket),
    )
    await admin.create_topics(settings)
    topics = settings.topics
    items: list[Item] = [(b"c", prompt(f"p {i}", id=f"r-{i}"), []) for i in range(250)]
    await produce(settings, topics.prompts, items)
    group = settings.group_id("archiver")

    async def archive_all() -> dict[str, bytes]:
        archiver = Archiver(settings)
        run = asyncio.create_task(archiver.run())
        try:
            await wait_committed(settings, group, [topics.prompts], 30, None)
        finally:
            archiver.request_stop()
            await run
        async with s3_endpoint.client() as s3:
            listed = await s3.list_objects_v2(Bucket=bucket)
            objects = {}
            for obj in listed.get("Contents", []):
                response = await s3.get_object(Bucket=bucket, Key=obj["Key"])
                async with response["Body"] as body:
                    objects[obj["Key"]] = await body.read()
        return objects

    first = await archive_all()
    prefix = f"log/topics/{topics.prompts}/partition=0/{topics.prompts}+0+"
    assert sorted(first) == [f"{prefix}{o:010d}.jsonl.gz" for o in (0, 100, 200)]

    # A crash after storing and before committing: the group is back at 0, the objects remain.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topics.prompts, 0)
        consumer.assign([tp])
        await consumer.commit({tp: 0})
    finally:
        await consumer.stop()
    second = await archive_all()
    assert second == first  # the same names, overwritten with the same bytes: no duplicates


async def test_an_object_store_outage_stalls_only_the_archiver_and_loses_nothing(
    settings_factory: Callable[..., Settings],
    procs: Procs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A private MinIO, so stopping it leaves the session's alone.
    config = MinioConfig(port=free_port(), data_dir=tmp_path / "private-minio")
    minio: ServiceHandle = await asyncio.to_thread(start_minio, config)
    endpoint = S3Endpoint(f"http://{minio.address}", config.access_key, config.secret_key)
    try:
        async with endpoint.client() as s3:
            await s3.create_bucket(Bucket="outage")
        settings = settings_factory(
            model_path=MODEL,
            engine="echo",
            archive_max_records=50,
            archive_max_age_s=1.0,
            **s3_settings(endpoint, "outage"),
        )
        await admin.create_topics(settings)
        topics = settings.topics
        for stage in PIPELINE:
            procs.stage(stage, settings)
        port = free_port()
        archiver = procs.archiver(settings, SLUICE_HTTP_PORT=str(port))
        await produce(settings, topics.prompts, [(b"w", prompt("warm up", id="w-0"), [])])
        await collect(settings, topics.answers, until=1, within=60)

        sent_at: dict[str, float] = {}
        answered_at: dict[str, float] = {}
        done = asyncio.Event()
        caught_up = asyncio.Event()

        async def send_steadily() -> None:  # ~25 prompts a second until done
            producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
            await producer.start()
            try:
                i = 0
                while not done.is_set():
                    rid = f"o-{i}"
                    sent_at[rid] = time.monotonic()
                    body = prompt(f"q {i}", id=rid)
                    await producer.send_and_wait(topics.prompts, body, key=f"c{i % 13}".encode())
                    i += 1
                    await asyncio.sleep(0.04)
            finally:
                await producer.stop()

        async def watch_answers() -> None:
            consumer = AIOKafkaConsumer(
                topics.answers, bootstrap_servers=settings.bootstrap_servers, group_id=None
            )
            await consumer.start()
            try:
                while True:
                    batch = await consumer.getmany(timeout_ms=200)
                    for records in batch.values():
                        for rec in records:
                            rid = header_value(list(rec.headers), "sluice-request-id")
                            if rid and rid.startswith("o-"):
                                answered_at.setdefault(rid, time.monotonic())
                    if done.is_set() and len(answered_at) >= len(sent_at):
                        caught_up.set()
            finally:
                await consumer.stop()

        sender = asyncio.create_task(send_steadily())
        watcher = asyncio.create_task(watch_answers())
        await asyncio.sleep(4)
        await asyncio.to_thread(stop_minio, minio)
        outage_start = time.monotonic()
        await asyncio.sleep(20)
        mid_outage = time.monotonic()
        # Mid-outage: the archiver is alive, not ready, failing visibly, its lag growing.
        assert (await http_get(port, "/healthz"))[0] == 200
        status, body = await http_get(port, "/readyz")
        assert status == 503 and "storing objects fails" in body
        _, text = await http_get(port, "/metrics")
        assert metric(text, "sluice_archiver_stalled") == 1
        assert metric(text, "sluice_archiver_store_failures_total") >= 2
        lag = await _group_lag(settings, topics.prompts)
        assert lag > 100, f"archiver lag on prompts is only {lag} mid-outage"
        await asyncio.sleep(max(0.0, 30 - (time.monotonic() - outage_start)))
        _skip_port_precheck(monkeypatch)
        minio = await asyncio.to_thread(start_minio, config)
        outage_end = time.monotonic()
        await asyncio.sleep(3)
        done.set()
        await sender
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(caught_up.wait(), 30)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

        # Serving never paused: every prompt was answered, and those sent in the first 20 s of
        # the outage were answered while the object store was still down.
        procs.assert_alive()
        assert len(answered_at) == len(sent_at), "prompts unanswered"
        during = [r for r, t in sent_at.items() if outage_start <= t <= outage_end]
        assert len(during) > 200
        early = [r for r in during if sent_at[r] < mid_outage]
        waited = [r for r in early if answered_at[r] >= outage_end]
        assert early and not waited, f"{len(waited)} answers waited for the store: {waited[:5]}"
        delays = sorted(answered_at[r] - sent_at[r] for r in during)
        median_ms, max_ms = delays[len(delays) // 2] * 1000, delays[-1] * 1000
        print(
            f"\n{len(during)} prompts sent during the {outage_end - outage_start:.0f}s outage, all "
            f"answered; median {median_ms:.0f} ms, max {max_ms:.0f} ms"
        )

        group = settings.group_id("archiver")
        await wait_committed(settings, group, [topics.prompts, topics.answers], 60, archiver)
        raw = await read_raw_archive(endpoint, "outage", "log")
        assert raw.duplicates() == {}
        for topic in (topics.prompts, topics.answers):
            for partition, end in (await end_offsets(settings, topic)).items():
                assert raw.offsets(topic, partition) == list(range(end)), (topic, partition)
        _, text = await http_get(port, "/metrics")
        assert metric(text, "sluice_archiver_stalled") == 0
        assert (await http_get(port, "/readyz"))[0] == 200
        answers = [r for (t, _), rs in raw.records.items() if t == topics.answers for r in rs]
        completions = [decode_answer(r.value) for r in answers]
        assert all(isinstance(a, ChatCompletion) for a in completions)
    finally:
        procs.stop_all()
        await asyncio.to_thread(stop_minio, minio)


def _skip_port_precheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ensure_port_free`` binds without SO_REUSEADDR, so it refuses a port whose old
    connections linger in TIME_WAIT (60 s) after MinIO stopped; MinIO itself binds with
    SO_REUSEADDR and starts fine on it. Only the pre-check is skipped."""
    import infra.minio.server

    monkeypatch.setattr(infra.minio.server, "ensure_port_free", lambda *_, **__: None)


async def _group_lag(settings: Settings, topic: str) -> int:
    from tests.integration.kafka_io import group_lag

    parts = await group_lag(settings, settings.group_id("archiver"), topic)
    return sum(end - committed for committed, end in parts.values())
