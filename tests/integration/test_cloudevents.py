"""Preprocess over the real broker, fed by a raw producer: records whose CloudEvents headers
say they are not 1.0 prompts get an error answer and a dead letter that say so; plain JSON and
1.0 prompts are served."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import admin
from pipeline.config import Settings
from schemas.dlt import parse_dlt_headers
from schemas.headers import make_headers
from schemas.messages import ErrorAnswer, decode_answer
from sluice.procs import StageProcess, stage_env
from tests.integration.kafka_io import Item, collect, produce, prompt
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"

# request id -> (headers, the dead-letter reason, or None for a prompt that is served)
CASES: dict[str, tuple[list[tuple[str, bytes]], str | None]] = {
    "v03": ([("ce_specversion", b"0.3"), ("ce_type", b"sluice.prompt")], "unsupported-specversion"),
    "v99": ([("ce_specversion", b"99"), ("ce_type", b"sluice.prompt")], "unsupported-specversion"),
    "garbage": ([("ce_specversion", b"\xff\x00zz")], "unsupported-specversion"),
    "answer": (make_headers("sluice.answer", "postprocess", "answer"), "wrong-ce-type"),
    "plain": ([], None),
    "plain-ct": ([("content-type", b"application/json")], None),
    "cloudevent": (make_headers("sluice.prompt", "gateway", "cloudevent"), None),
}


@pytest.fixture
def preprocess(tmp_path: Path) -> Iterator[Callable[[Settings], StageProcess]]:
    started: list[StageProcess] = []

    def start(settings: Settings) -> StageProcess:
        proc = StageProcess("preprocess", stage_env(settings), tmp_path / "pre.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


async def test_unsupported_specversion_and_foreign_types_are_refused_plain_json_is_served(
    settings_factory: Callable[..., Settings], preprocess: Callable[[Settings], StageProcess]
) -> None:
    settings = settings_factory(model_path=MODEL, partitions=1)
    await admin.create_topics(settings)
    proc = preprocess(settings)
    items: list[Item] = [
        (rid.encode(), prompt(f"hello {rid}", id=rid), headers)
        for rid, (headers, _) in CASES.items()
    ]
    await produce(settings, settings.topics.prompts, items)

    refused = {rid: reason for rid, (_, reason) in CASES.items() if reason is not None}
    served = {rid for rid, (_, reason) in CASES.items() if reason is None}
    answers = await collect(settings, settings.topics.answers, until=len(refused), within=90)
    tokenized = await collect(settings, settings.topics.tokenized, until=len(served), within=30)
    dead = await collect(
        settings, f"{settings.topics.prompts}.DLT", until=len(refused), within=30, unique=False
    )
    assert proc.proc is not None and proc.proc.poll() is None, proc.log()

    by_id = answers.by_request()
    assert set(by_id) == set(refused), sorted(by_id)
    for rid, reason in refused.items():
        (record,) = by_id[rid]
        answer = decode_answer(record.value)
        assert isinstance(answer, ErrorAnswer), answer
        assert answer.error.type == "invalid_request_error"
        wanted = (
            "only '1.0' is supported" if reason == "unsupported-specversion" else "'sluice.prompt'"
        )
        assert wanted in answer.error.message, answer.error.message
    assert set(tokenized.by_request()) == served

    reasons = {}
    for record in dead.records:
        info = parse_dlt_headers(list(record.headers))
        assert info is not None and info.topic == settings.topics.prompts
        assert info.exception_message is not None
        reasons[record.key.decode()] = (info.reason, info.exception_message)
    assert {rid: reason for rid, (reason, _) in reasons.items()} == refused
    assert "only '1.0' is supported" in reasons["v99"][1]
    assert "'sluice.answer'" in reasons["answer"][1]
