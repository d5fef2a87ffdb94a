"""The three stages as processes over the real broker: answers, dead letters, crashes, SIGTERM."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from pipeline import admin
from pipeline.config import Settings
from pipeline.runtime.batch import Record, derived_request_id
from schemas.dlt import parse_dlt_headers
from schemas.headers import header_value
from schemas.messages import ChatCompletion, ErrorAnswer, decode_answer
from sluice.procs import StageProcess, stage_env
from tests.integration.kafka_io import Item, collect, group_lag, produce, produce_stamped, prompt
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
STAGES = ("preprocess", "compute", "postprocess")


@pytest.fixture
async def pipeline_settings(settings_factory: Callable[..., Settings]) -> Settings:
    settings = settings_factory(
        model_path=MODEL, engine="echo", partitions=3, max_prompt_bytes=4096
    )
    await admin.create_topics(settings)
    return settings


@pytest.fixture
def stages(tmp_path: Path) -> Iterator[Callable[..., StageProcess]]:
    started: list[StageProcess] = []

    def start(stage: str, settings: Settings, **env: str) -> StageProcess:
        log = tmp_path / f"{stage}-{len(started)}.log"
        proc = StageProcess(stage, stage_env(settings, **env), log).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _malformed(i: int) -> tuple[str, bytes]:
    kind = (i // 20) % 4
    if kind == 0:
        return "bad-json", b'{"messages": [{"role": "user", "content": "unterminated'
    if kind == 1:
        return "schema", orjson.dumps({"id": f"bad-{i}", "messages": "not a list"})
    if kind == 2:
        return "empty-messages", orjson.dumps({"id": f"bad-{i}", "messages": []})
    return "oversized", prompt("x" * 5000, id=f"bad-{i}")


async def _wait_lag_zero(settings: Settings, within: float = 20.0) -> dict[str, int]:
    topics = settings.topics
    inputs = {
        "preprocess": topics.prompts,
        "compute": topics.tokenized,
        "postprocess": topics.generated,
    }
    deadline = time.monotonic() + within
    while True:
        lags = {}
        for stage, topic in inputs.items():
            parts = await group_lag(settings, settings.group_id(stage), topic)
            lags[stage] = sum(end - committed for committed, end in parts.values())
        if all(v == 0 for v in lags.values()) or time.monotonic() > deadline:
            return lags
        await asyncio.sleep(0.5)


async def test_2000_prompts_with_5_percent_malformed_each_get_exactly_one_answer(
    pipeline_settings: Settings, stages: Callable[..., StageProcess]
) -> None:
    settings = pipeline_settings
    procs = [stages(s, settings) for s in STAGES]
    rng = random.Random(7)
    items: list[Item] = []
    expected: dict[int, tuple[str, str]] = {}  # item index -> (kind, content or reason)
    for i in range(2000):
        if i % 20 == 7:
            reason, body = _malformed(i)
            items.append((f"conv-{i % 50}".encode(), body, []))
            expected[i] = ("error", reason)
        else:
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(4))
            text = f"prompt {i}: {words}"
            items.append((f"conv-{i % 50}".encode(), prompt(text, id=f"req-{i}"), []))
            expected[i] = ("ok", text)
    positions = await produce_stamped(settings, settings.topics.prompts, items)
    cluster = await admin.cluster_id(settings)
    request_ids = {}
    for i, (part, off, stamp) in enumerate(positions):
        kind, detail = expected[i]
        if kind == "error" and detail == "bad-json":
            where = Record(settings.topics.prompts, part, off, stamp, None, b"", [], 0, cluster)
            request_ids[i] = derived_request_id(where)
        else:
            request_ids[i] = f"req-{i}" if kind == "ok" else f"bad-{i}"

    answers = await collect(
        settings, settings.topics.answers, until=2000, within=180, extra_wait=2.0
    )
    for proc in procs:
        assert proc.proc is not None and proc.proc.poll() is None, proc.log()
    by_id = answers.by_request()
    missing = [request_ids[i] for i in range(2000) if request_ids[i] not in by_id]
    assert not missing, f"{len(missing)} prompts unanswered, e.g. {missing[:5]}"
    duplicates = {rid: len(v) for rid, v in by_id.items() if len(v) > 1}
    assert not duplicates, f"duplicate answers: {list(duplicates.items())[:5]}"
    assert len(by_id) == 2000

    dead = await collect(
        settings,
        f"{settings.topics.prompts}.DLT",
        until=100,
        within=30,
        unique=False,
        extra_wait=1.0,
    )
    dead_by_reason: dict[str, int] = {}
    for rec in dead.records:
        info = parse_dlt_headers(list(rec.headers))
        assert info is not None and info.topic == settings.topics.prompts
        assert info.group == settings.group_id("preprocess")
        assert info.offset is not None and info.partition is not None
        assert info.exception_class is not None and info.stacktrace
        assert info.reason is not None
        dead_by_reason[info.reason] = dead_by_reason.get(info.reason, 0) + 1
        placed = [(part, off) for part, off, _ in positions]
        original = items[placed.index((info.partition, info.offset))]
        assert rec.value == original[1] and rec.key == original[0]
    assert dead_by_reason == {"bad-json": 25, "schema": 25, "empty-messages": 25, "oversized": 25}

    for i in range(2000):
        (rec,) = by_id[request_ids[i]]
        answer = decode_answer(rec.value)
        kind, detail = expected[i]
        if kind == "ok":
            assert isinstance(answer, ChatCompletion), answer
            assert answer.content == detail  # the echo engine returns the user turn
            assert answer.id == f"chatcmpl-{request_ids[i]}"
            assert answer.usage.completion_tokens == len(detail.encode())
            assert header_value(list(rec.headers), "ce_type") == "sluice.answer"
        else:
            assert isinstance(answer, ErrorAnswer), answer
            assert answer.error.type == "invalid_request_error"
            assert header_value(list(rec.headers), "ce_type") == "sluice.answer.error"

    lags = await _wait_lag_zero(settings)
    assert lags == {"preprocess": 0, "compute": 0, "postprocess": 0}, lags


async def test_a_stage_killed_with_sigkill_and_restarted_loses_nothing(
    pipeline_settings: Settings, stages: Callable[..., StageProcess]
) -> None:
    settings = pipeline_settings
    stages("preprocess", settings)
    slow = {"SLUICE_ECHO_DELAY_MS": "50", "SLUICE_MAX_IN_FLIGHT": "16"}  # ~300 prompts/s
    compute = stages("compute", settings, **slow)
    stages("postprocess", settings)
    n = 1000
    items: list[Item] = [
        (f"c{i % 30}".encode(), prompt(f"question {i}", id=f"k-{i}"), []) for i in range(n)
    ]
    await produce(settings, settings.topics.prompts, items)
    partial = await collect(settings, settings.topics.answers, until=100, within=60)
    assert 100 <= len(partial.by_request()) < n, compute.log()
    compute.kill()  # mid-stream: uncommitted work must be redone by the restarted process
    stages("compute", settings, **slow)
    answers = await collect(settings, settings.topics.answers, until=n, within=120, extra_wait=2.0)
    by_id = answers.by_request()
    missing = [f"k-{i}" for i in range(n) if f"k-{i}" not in by_id]
    assert not missing, f"{len(missing)} lost after SIGKILL, e.g. {missing[:5]}"
    duplicates = sum(len(v) - 1 for v in by_id.values())
    print(
        f"\nSIGKILL of compute mid-stream: {n} prompts, all answered, "
        f"{duplicates} duplicate answers (at-least-once; de-duplicate by request id)"
    )
    for i in range(n):
        answer = decode_answer(by_id[f"k-{i}"][0].value)
        assert isinstance(answer, ChatCompletion) and answer.content == f"question {i}"


async def test_sigterm_finishes_in_flight_work_commits_and_leaves_the_group(
    pipeline_settings: Settings, stages: Callable[..., StageProcess]
) -> None:
    settings = pipeline_settings
    deadline = 8.0
    compute = stages(
        "compute",
        settings,
        SLUICE_ECHO_DELAY_MS="400",
        SLUICE_SHUTDOWN_DEADLINE_S=str(deadline),
        SLUICE_MAX_IN_FLIGHT="64",
    )
    stages("preprocess", settings)
    n = 600
    items: list[Item] = [
        (f"c{i % 7}".encode(), prompt(f"slow {i}", id=f"s-{i}"), []) for i in range(n)
    ]
    await produce(settings, settings.topics.prompts, items)
    first = await collect(settings, settings.topics.generated, until=64, within=60)
    assert len(first.records) >= 64, compute.log()
    code, _ = compute.sigterm(timeout=deadline + 60)  # only a guard against a hang
    assert code == 0, compute.log()
    log = compute.log()
    generated = await collect(settings, settings.topics.generated, until=n, within=3, unique=False)
    parts = await group_lag(settings, settings.group_id("compute"), settings.topics.tokenized)
    committed = sum(c for c, _ in parts.values())
    produced_ids = {header_value(list(r.headers), "sluice-request-id") for r in generated.records}
    assert 0 < committed < n, f"the test needs work left over after SIGTERM\n{compute.log()}"
    assert committed == len(produced_ids) == len(generated.records), (
        f"committed {committed} offsets but produced {len(generated.records)} outputs"
    )
    assert "leaving the group" in log and log.rstrip().endswith("stopped"), log


async def test_exactly_once_preprocess_survives_sigkill_without_duplicates(
    pipeline_settings: Settings, stages: Callable[..., StageProcess]
) -> None:
    settings = pipeline_settings
    eos = {
        "SLUICE_EXACTLY_ONCE": "true",
        "SLUICE_INSTANCE_ID": "a",
        "SLUICE_BATCH_MAX_RECORDS": "20",
    }
    pre = stages("preprocess", settings, **eos)
    n, bad = 3000, 30
    items: list[Item] = []
    for i in range(n):
        body = b"{broken" if i % (n // bad) == 0 else prompt(f"eos {i}", id=f"e-{i}")
        items.append((f"c{i % 11}".encode(), body, []))
    await produce(settings, settings.topics.prompts, items)
    first = await collect(
        settings, settings.topics.tokenized, until=300, within=60, isolation="read_committed"
    )
    assert 300 <= len(first.records) < n - bad, pre.log()
    pre.kill()  # an open transaction dies with it; the restart (same instance) aborts it
    stages("preprocess", settings, **eos)
    tokenized = await collect(
        settings,
        settings.topics.tokenized,
        until=n - bad,
        within=120,
        isolation="read_committed",
        extra_wait=2.0,
    )
    by_id = tokenized.by_request()
    assert len(by_id) == n - bad
    duplicates = sum(len(v) - 1 for v in by_id.values())
    assert duplicates == 0, f"{duplicates} duplicates visible to read_committed consumers"
    dead = await collect(
        settings,
        f"{settings.topics.prompts}.DLT",
        until=bad,
        within=10,
        unique=False,
        isolation="read_committed",
        extra_wait=1.0,
    )
    assert len(dead.records) == bad
