"""The recovery tools' pure parts: headers of re-driven records, request ids, times, restore."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from pipeline.config import Topics
from pipeline.runtime.batch import Record, derived_request_id
from pipeline.storage import LocalStore
from replay import common
from replay.common import RateLimiter, ReplaySummary, parse_time, record_attempt, with_attempt
from replay.dlq import DlqReplayOptions, decide, redrive_headers
from replay.prompts import is_answered, prompt_request_id, replay_headers
from replay.restore import restore_conversation, to_jsonl, to_markdown
from schemas.archive import ArchivedRecord, encode_line, encode_object, object_key
from schemas.attempts import AnswerFacts
from schemas.dlt import encode_int32, make_dlt_headers


def _record(value: bytes, headers: tuple[tuple[str, bytes | None], ...] = ()) -> ArchivedRecord:
    return ArchivedRecord("p.prompts", 2, 17, 1000, b"conv", value, headers)


def test_a_replayed_prompt_keeps_its_request_id() -> None:
    with_id = _record(b'{"id": "req-1", "messages": []}', (("ce_type", b"sluice.prompt"),))
    assert prompt_request_id(with_id) == "req-1"
    assert replay_headers(with_id, "req-1") == [
        ("ce_type", b"sluice.prompt"),
        ("sluice-attempt", b"2"),  # the first attempt had no header; this is the second
    ]
    # a new attempt is newer than the answer that stands, too
    error_of_3 = AnswerFacts(3, completion=False)
    assert replay_headers(with_id, "req-1", error_of_3)[-1] == ("sluice-attempt", b"4")

    by_header = _record(b'{"messages": []}', (("sluice-request-id", b"hdr-1"),))
    assert prompt_request_id(by_header) == "hdr-1"
    assert ("sluice-request-id", b"hdr-1") in replay_headers(by_header, "hdr-1")

    anonymous = _record(b"{not json", (("sluice-attempt", b"3"),))
    derived = derived_request_id(Record.of(anonymous, anonymous.timestamp_ms))
    assert prompt_request_id(anonymous) == derived
    # The new position would derive another id, so the original one travels as a header.
    assert replay_headers(anonymous, derived) == [
        ("sluice-request-id", derived.encode()),
        ("sluice-attempt", b"4"),
    ]


def test_redriven_dead_letters_lose_the_dead_letter_headers_and_count_attempts() -> None:
    original = [("ce_type", b"sluice.tokenized"), ("sluice-request-id", b"r-9")]
    spring = make_dlt_headers(
        original,
        topic="p.tokenized",
        partition=1,
        offset=5,
        timestamp_ms=1,
        group="p-compute",
        reason="engine-fault",
        exc=RuntimeError("boom"),
    )
    assert redrive_headers(spring, 2) == [*original, ("sluice-attempt", b"2")]
    connect = [
        *original,
        ("__connect.errors.topic", b"p.prompts"),
        ("__connect.errors.partition", b"0"),
        ("__connect.errors.exception.class.name", b"org.example.Boom"),
        ("sluice-attempt", b"2"),
    ]
    assert redrive_headers(connect, 3) == [*original, ("sluice-attempt", b"3")]

    options = DlqReplayOptions("p.tokenized.DLT")
    assert decide(spring, options).target == "p.tokenized"
    assert decide(connect, options).target == "p.prompts"
    assert decide(spring, options).attempt == 2  # a first attempt's dead letter: the second
    assert decide(connect, options).attempt == 3
    assert decide(original, options).skip is not None  # no origin and no --to
    assert decide(original, DlqReplayOptions("x", target_topic="elsewhere")).target == "elsewhere"
    only_schema = DlqReplayOptions("x", reasons=frozenset({"schema"}))
    assert decide(spring, only_schema).skip == "reason engine-fault"
    assert decide(connect, only_schema).skip == "reason (none)"
    tired = [*spring, ("sluice-attempt", b"6")]  # five re-drives already
    assert decide(tired, options).skip == "re-driven 5 times already"
    assert decide([*spring, ("sluice-attempt", b"5")], options).target == "p.tokenized"
    legacy = [*spring, ("sluice-replay-attempt", b"5")]  # what replay wrote before
    assert decide(legacy, options).skip == "re-driven 5 times already"
    assert decide(tired, DlqReplayOptions("x", max_attempts=0)).target == "p.tokenized"
    assert ("kafka_dlt-original-partition", encode_int32(1)) in spring


def test_attempt_headers_are_read_leniently_and_replaced() -> None:
    assert record_attempt([]) == 1
    assert record_attempt([("sluice-attempt", b"x")]) == 1
    assert record_attempt([("Sluice-Attempt", b"4")]) == 4
    assert record_attempt([("sluice-replay-attempt", b"4")]) == 5  # 4 re-drives: attempt 5
    assert record_attempt([("sluice-replay-attempt", b"x")]) == 1
    assert record_attempt([("sluice-replay-attempt", b"9"), ("sluice-attempt", b"2")]) == 2
    old = [("a", b"1"), ("sluice-replay-attempt", b"4"), ("Sluice-Attempt", b"5")]
    assert with_attempt(old, 6) == [("a", b"1"), ("sluice-attempt", b"6")]


def test_a_prompt_is_answered_by_a_standing_completion_or_unless_retrying_an_error() -> None:
    assert not is_answered(None, retry_errors=False)
    assert is_answered(AnswerFacts(1, completion=True), retry_errors=True)
    assert is_answered(AnswerFacts(2, completion=False), retry_errors=False)
    assert not is_answered(AnswerFacts(2, completion=False), retry_errors=True)


def test_times_are_iso_unix_or_relative() -> None:
    assert parse_time("2026-11-28T03:00:00Z") == 1_795_834_800_000
    assert parse_time("2026-11-28T03:00:00") == 1_795_834_800_000  # no zone: UTC
    assert parse_time("2026-11-28T04:00:00+01:00") == 1_795_834_800_000
    assert parse_time("1795834800") == 1_795_834_800_000
    assert parse_time("1795834800000") == 1_795_834_800_000
    assert parse_time("2h", now=10_000.0) == (10_000 - 7200) * 1000
    assert parse_time("90m ago", now=10_000.0) == (10_000 - 5400) * 1000
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday-ish")


async def test_the_rate_limiter_spaces_acquisitions(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock of its own: 41 acquisitions at 200/s span 40 intervals of 5 ms."""
    now = [100.0]
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(common, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(common, "asyncio", SimpleNamespace(sleep=sleep))
    limiter = RateLimiter(200)
    for _ in range(41):
        await limiter.acquire()
    assert len(sleeps) == 40  # the first goes at once
    assert now[0] - 100.0 == pytest.approx(0.2)
    sleeps.clear()
    unlimited = RateLimiter(0)
    for _ in range(1000):
        await unlimited.acquire()
    assert sleeps == []


def test_the_summary_lists_what_was_sent_and_why_others_were_not() -> None:
    summary = ReplaySummary("replay dlq", dry_run=True)
    summary.examined = 3
    summary.note_sent("t", "r-1")
    summary.skipped["reason schema"] += 2
    rows = dict(summary.finish().rows())
    assert rows["would send"] == "1" and rows["  to t"] == "1"
    assert rows["skipped: reason schema"] == "2"


async def test_restore_puts_a_conversations_turns_in_order_with_their_answers(
    tmp_path: Path,
) -> None:
    topics = Topics("p.")
    store = LocalStore(tmp_path)
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompts = [
        (0, b"c1", {"id": "r1", "messages": history}, 1000),
        (1, b"c2", {"id": "other", "messages": [{"role": "user", "content": "x"}]}, 1500),
        (
            2,
            b"c1",
            {
                "id": "r2",
                "messages": [
                    *history,
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": [{"type": "text", "text": "and?"}]},
                ],
            },
            2000,
        ),
        (3, b"c1", {"id": "r1", "messages": history}, 3000),  # re-published: same request id
        (4, b"zz", {"id": "r3", "conversation_id": "c1", "messages": history}, 4000),
    ]
    lines = [
        encode_line(off, ts, key, orjson.dumps(body), [("ce_type", b"sluice.prompt")])
        for off, key, body, ts in prompts
    ]
    await store.put(object_key("p.prompts", 0, 0), encode_object(lines))

    def completion(rid: str, text: str) -> bytes:
        return orjson.dumps(
            {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    error = orjson.dumps({"error": {"message": "open", "type": "server_error", "code": "x"}})
    expired = orjson.dumps({"error": {"message": "late", "type": "server_error", "code": "y"}})
    answers = [
        (0, "r2", error, "sluice.answer.error", 1),
        (1, "r1", completion("r1", "hello"), "sluice.answer", 1),
        (2, "r2", completion("r2", "that is all"), "sluice.answer", 2),  # the replay's answer
        (3, "r3", expired, "sluice.answer.error", 2),
        (4, "r3", error, "sluice.answer.error", 1),  # attempt 1 re-delivered late: not it
        (5, "r1", error, "sluice.answer.error", 2),  # an error after a completion: not it
    ]
    lines = [
        encode_line(
            off,
            5000 + off,
            b"c1",
            body,
            [
                ("ce_type", ce.encode()),
                ("sluice-request-id", rid.encode()),
                ("sluice-attempt", str(attempt).encode()),
            ],
        )
        for off, rid, body, ce, attempt in answers
    ]
    await store.put(object_key("p.answers", 1, 0), encode_object(lines))

    turns = await restore_conversation(store, topics, "c1")
    assert [t.request_id for t in turns] == ["r1", "r2", "r3"]
    assert turns[0].answer is not None and turns[0].answer["content"] == "hello"
    assert turns[1].answer is not None and turns[1].answer["content"] == "that is all"
    assert turns[1].messages[-1] == {"role": "user", "content": "and?"}
    assert turns[2].answer is None and turns[2].error is not None
    assert turns[2].error["message"] == "late"  # the latest attempt's error stands
    assert [t.standing for t in turns] == [
        AnswerFacts(1, completion=True),
        AnswerFacts(2, completion=True),
        AnswerFacts(2, completion=False),
    ]

    rows = [orjson.loads(line) for line in to_jsonl(turns).splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert [r["attempt"] for r in rows] == [1, 2, 2]
    assert rows[0]["prompt_at"] == "1970-01-01T00:00:01.000Z"
    markdown = to_markdown(turns, "c1")
    assert markdown.count("**user:** hi") == 2  # turn 3 starts over; turn 2 only adds "and?"
    assert "**user:** and?" in markdown and "**assistant:** that is all" in markdown
    assert "> error (server_error): late" in markdown
    assert await restore_conversation(store, topics, "nobody") == []
