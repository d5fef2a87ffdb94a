"""Batch jobs that go wrong, end to end: a batcher killed mid-job, a cancel, a broken input file,
a window that closes. The echo engine (with a delay, so a job takes seconds) answers each line
with its own question, so every answer is checkable; the rest is the real thing: Kafka, the
stages, the gateway and the batcher as processes, files in a folder.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from infra.process import ServiceHandle
from pipeline import admin
from pipeline.config import Settings
from schemas.batch import parse_line_request_id
from schemas.headers import SLUICE_REQUEST_ID, header_value
from stages.batch_state import batch_prompts_topic, topic_partitions
from tests.integration.batch_helpers import (
    Stack,
    chat_line,
    create_batch,
    file_lines,
    jsonl,
    upload,
    wait_batch,
)

LINES = 40


@pytest.fixture(scope="module")
async def stack(
    kafka_broker: ServiceHandle, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    folder = tmp_path_factory.mktemp("batch-jobs")
    settings = Settings(
        bootstrap_servers=kafka_broker.address,
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        state_dir=folder / "state",
        archive_url=f"file://{folder / 'store'}",
        partitions=3,
        engine="echo",
        echo_delay_ms=250,
        batch_max_pending=4,
        batch_progress_interval_s=0.2,
        batch_cancel_grace_s=2.0,
    )
    await admin.create_topics(settings)
    stack = Stack(settings, folder)
    try:
        stack.start_stages()
        await stack.start_gateway()
        stack.start_batcher()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateways[0].base_url, timeout=30) as client:
        yield client


def questions(tag: str, n: int = LINES) -> list[dict[str, Any]]:
    return [chat_line(f"{tag}-{i}", f"question {tag} {i}") for i in range(n)]


def assert_each_line_once(lines: list[dict[str, Any]], tag: str, n: int = LINES) -> None:
    ids = [line["custom_id"] for line in lines]
    assert sorted(ids) == sorted(f"{tag}-{i}" for i in range(n)), ids


def answered_correctly(line: dict[str, Any]) -> bool:
    tag, _, index = line["custom_id"].rpartition("-")
    body = line["response"]["body"]
    return bool(body["choices"][0]["message"]["content"] == f"question {tag} {index}")


async def published_lines(settings: Settings, batch_id: str) -> list[int]:
    """The line numbers of every prompt the batchers published for ``batch_id``."""
    topic = batch_prompts_topic(settings)  # the batch lane, by default
    tps = await topic_partitions(settings, topic)
    consumer = AIOKafkaConsumer(**settings.kafka_common(), auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        seen: list[int] = []
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    parsed = parse_line_request_id(header_value(r.headers, SLUICE_REQUEST_ID) or "")
                    if parsed is not None and parsed[0] == batch_id:
                        seen.append(parsed[1])
        return seen
    finally:
        await consumer.stop()


async def test_a_batcher_killed_mid_job_is_resumed_and_each_line_is_written_once(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    batch = await create_batch(http, await upload(http, jsonl(questions("kill"))))
    await wait_batch(http, batch["id"], lambda b: b["request_counts"]["completed"] >= 8, stack)
    stack.batchers[-1].kill()
    stack.start_batcher()
    done = await wait_batch(http, batch["id"], lambda b: b["status"] == "completed", stack)

    assert done["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
    assert done["error_file_id"] is None
    lines = await file_lines(http, done["output_file_id"])
    assert_each_line_once(lines, "kill")
    assert all(answered_correctly(line) for line in lines)
    # only lines without an answer were published again: at most the window in flight
    published = await published_lines(stack.settings, batch["id"])
    assert LINES <= len(published) <= LINES + 2 * stack.settings.batch_max_pending, published
    assert set(published) == set(range(1, LINES + 1))


async def test_a_cancelled_batch_keeps_the_answered_lines(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    batch = await create_batch(http, await upload(http, jsonl(questions("cancel"))))
    await wait_batch(http, batch["id"], lambda b: b["request_counts"]["completed"] >= 4, stack)
    response = await http.post(f"/v1/batches/{batch['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelling"
    done = await wait_batch(http, batch["id"], lambda b: b["status"] == "cancelled", stack)

    output = await file_lines(http, done["output_file_id"])
    errors = await file_lines(http, done["error_file_id"])
    assert_each_line_once(output + errors, "cancel")
    assert 4 <= len(output) < LINES
    assert all(answered_correctly(line) for line in output)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert done["request_counts"] == {
        "total": LINES,
        "completed": len(output),
        "failed": len(errors),
    }
    again = await http.post(f"/v1/batches/{batch['id']}/cancel")
    assert again.json()["status"] == "cancelled"


async def test_an_invalid_input_file_fails_the_batch_naming_the_lines(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    good = [orjson.dumps(line) for line in questions("bad", 3)]
    wrong_url = {**chat_line("bad-3", "x"), "url": "/v1/embeddings"}
    content = b"\n".join(
        [
            good[0],
            b"{not json",
            orjson.dumps(wrong_url),
            good[1],
            good[1].replace(b"bad-1", b"bad-0"),
        ]
    )
    batch = await create_batch(http, await upload(http, content))
    done = await wait_batch(http, batch["id"], lambda b: b["status"] == "failed", stack)

    errors = [(e["line"], e["code"]) for e in done["errors"]["data"]]
    assert errors == [(2, "invalid_json_line"), (3, "invalid_url"), (5, "duplicate_custom_id")]
    assert done["failed_at"] is not None and done["output_file_id"] is None


async def test_a_batch_whose_window_closes_expires_with_the_finished_lines(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    short = await stack.start_gateway(SLUICE_BATCH_WINDOW_S="4")
    async with httpx.AsyncClient(base_url=short.base_url, timeout=30) as fast:
        batch = await create_batch(fast, await upload(fast, jsonl(questions("late", 200))))
        assert batch["expires_at"] - batch["created_at"] == 4
    done = await wait_batch(http, batch["id"], lambda b: b["status"] == "expired", stack)

    output = await file_lines(http, done["output_file_id"])
    errors = await file_lines(http, done["error_file_id"])
    assert_each_line_once(output + errors, "late", 200)
    assert output and errors
    assert all(answered_correctly(line) for line in output)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert done["expired_at"] >= batch["expires_at"]
