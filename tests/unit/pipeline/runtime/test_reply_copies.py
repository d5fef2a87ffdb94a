"""Answers are copied to the asker's reply partition; nothing else is, and nothing without one."""

from __future__ import annotations

from pipeline.runtime.batch import Output, Record
from pipeline.runtime.processing import with_reply_copies
from pipeline.runtime.stage import output_for
from schemas.headers import header_value
from schemas.messages import ErrorAnswer
from schemas.streaming import SLUICE_DEADLINE, ReplyTo, deadline_header


def record(*headers: tuple[str, bytes]) -> Record:
    return Record("p.generated", 0, 5, 0, b"conv", b"{}", list(headers))


def test_an_answer_gets_a_copy_at_the_reply_address_with_the_same_headers() -> None:
    rec = record(ReplyTo("p.replies", 2).header(), deadline_header(123))
    answer = output_for(
        rec, "p.answers", ErrorAnswer.server_error(), stage="s", request_id="r", key=b"conv"
    )
    assert header_value(answer.headers, SLUICE_DEADLINE) == "123"  # carried from the input
    other = Output("p.answers.DLT", b"conv", b"{}", [])
    out = with_reply_copies(rec, [answer, other], "p.answers")
    assert out[:2] == [answer, other]
    (copy,) = out[2:]
    assert (copy.topic, copy.partition, copy.value) == ("p.replies", 2, answer.value)
    assert header_value(copy.headers, "ce_type") == "sluice.answer.error"
    assert header_value(copy.headers, "sluice-request-id") == "r"


def test_a_cached_answer_without_the_header_takes_the_record_s_address() -> None:
    rec = record(ReplyTo("p.replies", 1).header())
    cached = Output("p.answers", b"conv", b"{}", [("ce_type", b"sluice.answer")])
    (_, copy) = with_reply_copies(rec, [cached], "p.answers")
    assert (copy.topic, copy.partition) == ("p.replies", 1)


def test_no_reply_address_no_copy() -> None:
    answer = Output("p.answers", b"conv", b"{}", [])
    assert with_reply_copies(record(), [answer], "p.answers") == [answer]
