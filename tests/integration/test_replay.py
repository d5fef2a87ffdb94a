"""The recovery tools on real MinIO and the real broker: unanswered prompts, dead letters."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import admin
from pipeline.config import Settings
from pipeline.storage import open_store
from replay.common import LEGACY_REPLAY_ATTEMPT
from replay.dlq import DlqReplayOptions, replay_dlq
from replay.prompts import PromptReplayOptions, replay_prompts
from schemas.attempts import answer_facts, standing
from schemas.dlt import (
    CONNECT_ERRORS_EXCEPTION_CLASS_NAME,
    CONNECT_ERRORS_OFFSET,
    CONNECT_ERRORS_PARTITION,
    CONNECT_ERRORS_TOPIC,
    make_dlt_headers,
)
from schemas.headers import SLUICE_ATTEMPT, header_value
from schemas.messages import ChatCompletion, ErrorAnswer, decode_answer
from tests.conftest import S3Endpoint
from tests.integration.archive_helpers import (
    MODEL,
    Procs,
    end_offsets,
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


def _table_count(output: str, row: str) -> int:
    """A number from the CLI's summary table, e.g. the ``sent`` row."""
    match = re.search(rf"\b{row}\b[\s│|]*([\d,]+)", output)
    assert match is not None, f"no {row!r} row in:\n{output}"
    return int(match[1].replace(",", ""))


async def _wait_total(settings: Settings, topic: str, total: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        now = sum((await end_offsets(settings, topic)).values())
        if now >= total:
            return
        assert time.monotonic() < deadline, f"{topic} holds {now} records, not {total}"
        await asyncio.sleep(0.3)


async def _skip_to_end(settings: Settings, group: str, topic: str) -> int:
    """What an operator's ``--reset-offsets --to-latest`` does: the group skips its input."""
    ends = await end_offsets(settings, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = {TopicPartition(topic, p): end for p, end in ends.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()
    return sum(ends.values())


async def test_replay_unanswered_re_drives_exactly_the_prompts_whose_answers_were_lost(
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
        archive_max_age_s=0.5,
        **s3_settings(s3_endpoint, bucket),
    )
    await admin.create_topics(settings)
    topics = settings.topics
    procs.stage("preprocess", settings)
    procs.stage("compute", settings)
    post = procs.stage("postprocess", settings)
    archiver = procs.archiver(settings)

    def batch(name: str, n: int = 100) -> list[Item]:
        return [
            (f"c{i % 17}".encode(), prompt(f"{name} {i}", id=f"{name}-{i}"), []) for i in range(n)
        ]

    await produce(settings, topics.prompts, batch("before"))
    await collect(settings, topics.answers, until=100, within=60)
    code, _ = post.sigterm()  # postprocess goes down while prompts keep flowing...
    assert code == 0, post.log()
    await produce(settings, topics.prompts, batch("lost"))
    await _wait_total(settings, topics.generated, 200)
    # ...and its input is skipped when it comes back: 100 generations never become answers.
    await _skip_to_end(settings, settings.group_id("postprocess"), topics.generated)
    procs.stage("postprocess", settings)
    await produce(settings, topics.prompts, batch("after"))
    answers = await collect(settings, topics.answers, until=200, within=60, extra_wait=1.0)
    answered = set(answers.by_request())
    assert answered == {f"{n}-{i}" for n in ("before", "after") for i in range(100)}
    group = settings.group_id("archiver")
    await wait_committed(settings, group, [topics.prompts, topics.answers], 60, archiver)

    store = open_store(settings)
    try:
        dry = await replay_prompts(
            settings, store, PromptReplayOptions(unanswered=True, dry_run=True)
        )
    finally:
        await store.close()
    assert (dry.examined, dry.sent, dry.skipped["answered"]) == (300, 100, 200)
    assert sum((await end_offsets(settings, topics.prompts)).values()) == 300  # sent nothing

    code, out = await run_cli(
        settings,
        "replay",
        "prompts",
        "--from",
        settings.archive_url,
        "--unanswered",
        "--rate",
        "500",
    )
    assert code == 0, out
    assert _table_count(out, "sent") == 100, out

    # Exactly the lost 100 were re-published, with their request ids, keys and headers.
    prompts = await read_topic(settings, topics.prompts)
    replayed, originals = [], {}
    for rec in prompts.values():
        if header_value(list(rec.headers), SLUICE_ATTEMPT) is None:
            originals[rec.value] = rec
        else:
            replayed.append(rec)
    assert len(replayed) == 100
    for rec in replayed:
        original = originals[rec.value]
        assert rec.key == original.key
        assert list(rec.headers) == [*original.headers, (SLUICE_ATTEMPT, b"2")]
    everything = await collect(settings, topics.answers, until=300, within=60)
    by_id = everything.by_request()
    for i in range(100):
        (rec,) = by_id[f"lost-{i}"]
        answer = decode_answer(rec.value)
        assert isinstance(answer, ChatCompletion) and answer.content == f"lost {i}"

    # Once the archive has caught up, a second run finds nothing left to do.
    await wait_committed(settings, group, [topics.prompts, topics.answers], 60, archiver)
    store = open_store(settings)
    try:
        again = await replay_prompts(
            settings, store, PromptReplayOptions(unanswered=True, check_topic=True)
        )
    finally:
        await store.close()
    # 400 archived prompts now: the 100 re-published ones are in the log too, answered.
    assert (again.examined, again.sent, again.skipped["answered"]) == (400, 0, 400), again.rows()


async def test_replay_dlq_answers_every_dead_lettered_prompt_once_the_fault_is_fixed(
    settings_factory: Callable[..., Settings], procs: Procs, tmp_path: Path
) -> None:
    settings = settings_factory(
        model_path=MODEL, engine="echo", breaker_cooldown_s=1.0, handler_retries=0
    )
    await admin.create_topics(settings)
    topics = settings.topics
    fault = tmp_path / "fault"
    fault.touch()
    procs.stage("preprocess", settings)
    procs.stage("compute", settings, SLUICE_ECHO_FAULT_FILE=str(fault))
    procs.stage("postprocess", settings)
    n = 200
    items: list[Item] = [
        (f"c{i % 23}".encode(), prompt(f"doomed {i}", id=f"d-{i}"), []) for i in range(n)
    ]
    await produce(settings, topics.prompts, items)
    dlt = f"{topics.tokenized}.DLT"
    errors = await collect(settings, topics.answers, until=n, within=90)
    assert len(errors.by_request()) == n
    assert all(isinstance(decode_answer(r.value), ErrorAnswer) for r in errors.records)
    await _wait_total(settings, dlt, n)

    fault.unlink()  # the fault is fixed; a probe closes the breaker after its cool-down
    probes = 0
    while True:
        assert probes < 10, "the breaker did not close after the fault was fixed"
        await asyncio.sleep(settings.breaker_cooldown_s + 0.2)
        rid = f"probe-{probes}"
        probes += 1
        await produce(settings, topics.prompts, [(b"p", prompt("are you back", id=rid), [])])
        got = await collect(settings, topics.answers, until=n + probes, within=30)
        (answer,) = got.by_request()[rid]
        if isinstance(decode_answer(answer.value), ChatCompletion):
            break
    dead = sum((await end_offsets(settings, dlt)).values())
    answered_before = sum((await end_offsets(settings, topics.answers)).values())

    code, out = await run_cli(settings, "replay", "dlq", dlt, "--rate", "1000")
    assert code == 0, out
    assert _table_count(out, "sent") == dead, out

    answers = await collect(
        settings, topics.answers, until=answered_before + dead, within=60, unique=False
    )
    by_id = answers.by_request()
    for i in range(n):
        decoded = [decode_answer(r.value) for r in by_id[f"d-{i}"]]
        completions = [a for a in decoded if isinstance(a, ChatCompletion)]
        assert len(completions) == 1, f"d-{i}: {len(completions)} completions"
        assert completions[0].content == f"doomed {i}"
        # an error answer and the re-driven attempt's completion: the completion stands
        facts = [answer_facts(list(r.headers)) for r in by_id[f"d-{i}"]]
        stands = standing(facts)
        assert stands is not None and stands.completion, facts
    redriven = [
        r
        for r in (await read_topic(settings, topics.tokenized)).values()
        if header_value(list(r.headers), SLUICE_ATTEMPT) == "2"
    ]
    assert len(redriven) == dead
    assert not any(k.startswith("kafka_dlt-") for r in redriven for k, _ in r.headers)

    second = await replay_dlq(settings, DlqReplayOptions(dlt))
    assert (second.examined, second.sent) == (0, 0)
    assert sum((await end_offsets(settings, topics.tokenized)).values()) == n + probes + dead


async def test_replay_dlq_reads_both_header_sets_and_filters_by_reason(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(partitions=2)
    await admin.create_topics(settings)
    prompts = settings.topics.prompts
    dlt = f"{prompts}.DLT"
    other = f"{settings.topic_prefix}elsewhere"
    await admin.create_topics(settings, [other])

    def spring(i: int, reason: str, extra: list[tuple[str, bytes]] | None = None) -> Item:
        headers = make_dlt_headers(
            [("sluice-request-id", f"s-{i}".encode()), *(extra or [])],
            topic=prompts,
            partition=0,
            offset=i,
            timestamp_ms=1,
            group="g",
            reason=reason,
        )
        return (f"k{i}".encode(), f"spring {i}".encode(), headers)

    connect_headers = [
        ("sluice-request-id", b"c-1"),
        (CONNECT_ERRORS_TOPIC, other.encode()),
        (CONNECT_ERRORS_PARTITION, b"1"),
        (CONNECT_ERRORS_OFFSET, b"42"),
        (CONNECT_ERRORS_EXCEPTION_CLASS_NAME, b"org.apache.kafka.connect.errors.DataException"),
    ]
    items: list[Item] = [
        spring(1, "schema"),
        spring(2, "circuit-open"),
        spring(3, "circuit-open", [(SLUICE_ATTEMPT, b"2")]),
        spring(4, "engine-fault", [(LEGACY_REPLAY_ATTEMPT, b"5")]),  # as an older replay wrote
        (b"c1", b"connect 1", connect_headers),
        (b"n1", b"no origin", [("sluice-request-id", b"n-1")]),
    ]
    await produce(settings, dlt, items)

    dry = await replay_dlq(
        settings, DlqReplayOptions(dlt, reasons=frozenset({"circuit-open"}), dry_run=True)
    )
    assert (dry.examined, dry.sent) == (6, 2)
    assert sum((await end_offsets(settings, prompts)).values()) == 0

    only_open = await replay_dlq(
        settings, DlqReplayOptions(dlt, reasons=frozenset({"circuit-open"}))
    )
    assert (only_open.examined, only_open.sent) == (6, 2)
    assert only_open.skipped == {"reason schema": 1, "reason engine-fault": 1, "reason (none)": 2}
    sent = await collect(settings, prompts, until=2, within=10, extra_wait=0.5)
    attempts = {
        header_value(list(r.headers), "sluice-request-id"): header_value(
            list(r.headers), SLUICE_ATTEMPT
        )
        for r in sent.records
    }
    assert attempts == {"s-2": "2", "s-3": "3"}
    for rec in sent.records:
        names = [k for k, _ in rec.headers]
        assert names == ["sluice-request-id", SLUICE_ATTEMPT], names
        assert rec.value in (b"spring 2", b"spring 3")

    # The same group again: nothing (it committed past everything, filtered or not).
    assert (await replay_dlq(settings, DlqReplayOptions(dlt))).examined == 0
    # Another group without a filter: Spring and Connect origins, the attempt limit, no origin.
    rest = await replay_dlq(settings, DlqReplayOptions(dlt, group_id="second", max_attempts=5))
    assert rest.targets == {prompts: 3, other: 1}
    assert rest.skipped == {
        "re-driven 5 times already": 1,
        "no original topic in its headers (use --to)": 1,
    }
    moved = await collect(settings, other, until=1, within=10)
    assert [r.value for r in moved.records] == [b"connect 1"]
    assert [k for k, _ in moved.records[0].headers] == ["sluice-request-id", SLUICE_ATTEMPT]
    # --to sends everything (with an origin or not) to one topic.
    forced = await replay_dlq(settings, DlqReplayOptions(dlt, group_id="third", target_topic=other))
    assert forced.sent == 5 and forced.targets == {other: 5}
