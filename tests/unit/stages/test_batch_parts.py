"""The Batch API's Kafka-free parts: input checks, a job's bookkeeping and files, the state view,
and the multipart parser."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas.batch import (
    BatchCancel,
    BatchObject,
    line_request_id,
    output_line_id,
    parse_line_request_id,
)
from schemas.headers import header_value, make_headers
from schemas.messages import ChatCompletion, ErrorAnswer, Usage, encode
from schemas.streaming import SLUICE_DEADLINE
from stages.batch_input import MAX_ERRORS, check_input
from stages.batch_job import CANCELLED_ERROR, EXPIRED_ERROR, Job
from stages.batch_state import BatchView, partition_for
from stages.gateway.multipart import MultipartError, fields, parse_form

BATCH = "batch_0123abcd"


def row(custom_id: str, content: str = "hi", **over: Any) -> bytes:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": content}]},
    }
    line.update(over)
    return orjson.dumps(line)


def completion(request_id: str, content: str) -> bytes:
    return encode(
        ChatCompletion.build(
            id=f"chatcmpl-{request_id}",
            model="m",
            content=content,
            finish_reason="stop",
            usage=Usage.of(3, 1),
        )
    )


# --- input checks ------------------------------------------------------------------------------


def test_a_valid_file_gives_its_lines_numbered_from_one_skipping_blank_lines() -> None:
    lines, errors = check_input(b"\n".join([row("a"), b"", row("b"), b""]), max_lines=10)
    assert errors == []
    assert [(x.number, x.custom_id) for x in lines] == [(1, "a"), (3, "b")]


def test_each_problem_names_its_line_and_code() -> None:
    content = b"\n".join(
        [
            row("a"),
            b"{oops",
            b"[1, 2]",
            orjson.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions"}),
            row("d", method="GET"),
            row("e", url="/v1/embeddings"),
            row("a"),
            row("f", body="text"),
        ]
    )
    _, errors = check_input(content, max_lines=100)
    assert [(e.line, e.code, e.param) for e in errors] == [
        (2, "invalid_json_line", None),
        (3, "invalid_json_line", None),
        (4, "missing_required_parameter", "body"),
        (5, "invalid_method", "method"),
        (6, "invalid_url", "url"),
        (7, "duplicate_custom_id", "custom_id"),
        (8, "invalid_request", "body"),
    ]
    assert "line 1" in errors[5].message  # the duplicate names the first use


def test_too_many_lines_stops_at_the_first_line_over_the_limit() -> None:
    _, errors = check_input(b"\n".join(row(str(i)) for i in range(5)), max_lines=3)
    assert [(e.line, e.code) for e in errors] == [(4, "too_many_tasks")]


def test_an_empty_file_and_an_endless_broken_one() -> None:
    assert [e.code for e in check_input(b"\n \n", max_lines=5)[1]] == ["empty_file"]
    _, errors = check_input(b"x\n" * 500, max_lines=1000)
    assert len(errors) == MAX_ERRORS


# --- ids ---------------------------------------------------------------------------------------


def test_line_request_ids_round_trip_and_other_ids_are_not_batch_lines() -> None:
    assert parse_line_request_id(line_request_id(BATCH, 17)) == (BATCH, 17)
    for other in ("3f2a-11", "batch_x", "batch_x-", "batch_x-1a", "chatcmpl-1"):
        assert parse_line_request_id(other) is None
    assert output_line_id(BATCH, 3) == "batch_req_0123abcd_3"


def test_a_batch_and_its_cancel_share_a_stable_partition() -> None:
    assert partition_for(BATCH, 6) == partition_for(BATCH, 6)
    assert {partition_for(f"batch_{i}", 6) for i in range(100)} == set(range(6))


# --- a job -------------------------------------------------------------------------------------


def job(n: int = 4, expires_at: int | None = 2_000_000_000) -> Job:
    lines, _ = check_input(b"\n".join(row(f"c{i}", f"q{i}") for i in range(n)), max_lines=n)
    batch = BatchObject(id=BATCH, input_file_id="file-x", created_at=1, expires_at=expires_at)
    return Job(batch, lines)


def test_prompts_carry_the_deterministic_id_custom_id_and_the_window_as_deadline() -> None:
    j = job()
    record = j.prompt(j.lines[1])
    body = orjson.loads(record.value)
    assert record.request_id == body["id"] == f"{BATCH}-2" and record.key == b"batch_0123abcd-2"
    assert body["metadata"] == {"custom_id": "c1", "batch_id": BATCH}
    assert body["messages"][0]["content"] == "q1"
    assert header_value(record.headers, SLUICE_DEADLINE) == "2000000000000"


def test_publishing_keeps_a_window_and_skips_answered_lines() -> None:
    j = job(5)
    first = j.next_to_publish(2)
    assert [x.number for x in first] == [1, 2]
    j.pending.update(x.number for x in first)
    assert j.next_to_publish(2) == []
    assert j.offer(3, f"{BATCH}-3", completion("r3", "a3"))  # answered before it was published
    assert j.offer(1, f"{BATCH}-1", completion("r1", "a1"))
    assert [x.number for x in j.next_to_publish(2)] == [4]


def test_the_first_answer_of_a_line_wins_and_strangers_are_ignored() -> None:
    j = job(2)
    assert j.offer(1, f"{BATCH}-1", completion("r1", "first"))
    assert not j.offer(1, f"{BATCH}-1", completion("r1", "second"))
    assert not j.offer(9, f"{BATCH}-9", completion("r9", "unknown line"))
    out, _ = j.render(EXPIRED_ERROR)
    (line,) = [orjson.loads(x) for x in out.splitlines()]
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "first"


def test_render_writes_every_line_once_in_order_as_openai_does() -> None:
    j = job(4)
    j.offer(2, f"{BATCH}-2", completion(f"{BATCH}-2", "two"))
    j.offer(1, f"{BATCH}-1", encode(ErrorAnswer.build("too long", code="context_length_exceeded")))
    j.offer(3, f"{BATCH}-3", encode(ErrorAnswer.build("late", type="server_error", code="expired")))
    assert j.counts().model_dump() == {"total": 4, "completed": 1, "failed": 2}
    assert not j.done
    out, err = j.render(CANCELLED_ERROR)
    output = [orjson.loads(x) for x in out.splitlines()]
    errors = [orjson.loads(x) for x in err.splitlines()]
    assert output == [
        {
            "id": "batch_req_0123abcd_2",
            "custom_id": "c1",
            "response": {
                "status_code": 200,
                "request_id": f"{BATCH}-2",
                "body": orjson.loads(completion(f"{BATCH}-2", "two")),
            },
            "error": None,
        }
    ]
    assert [e["custom_id"] for e in errors] == ["c0", "c2", "c3"]
    assert errors[0]["response"]["status_code"] == 400 and errors[0]["error"] is None
    assert errors[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert errors[1] | {"id": ""} == {
        "id": "",
        "custom_id": "c2",
        "response": None,
        "error": EXPIRED_ERROR.model_dump(),
    }
    assert errors[2]["error"]["code"] == "batch_cancelled"
    assert j.finished_counts().model_dump() == {"total": 4, "completed": 1, "failed": 3}


def test_an_unreadable_answer_is_a_server_error_line() -> None:
    j = job(1)
    j.offer(1, f"{BATCH}-1", b"not json")
    _, err = j.render(EXPIRED_ERROR)
    (line,) = [orjson.loads(x) for x in err.splitlines()]
    assert line["response"]["status_code"] == 500
    assert line["response"]["body"]["error"]["type"] == "server_error"


def test_a_line_compute_cancelled_for_the_batch_s_cancel_is_batch_cancelled() -> None:
    j = job(1)
    cancelled = ErrorAnswer.build("stopped", type="server_error", code="cancelled")
    j.offer(1, f"{BATCH}-1", cancelled.model_dump_json().encode())
    out, err = j.render(EXPIRED_ERROR)
    (line,) = [orjson.loads(x) for x in err.splitlines()]
    assert out == b"" and line["response"] is None
    assert line["error"] == CANCELLED_ERROR.model_dump()


# --- the state view ----------------------------------------------------------------------------


def state(batch: BatchObject) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return batch.id.encode(), encode(batch), make_headers(batch.ce_type, "test", batch.id)


def test_the_view_keeps_the_latest_state_and_a_cancel_reads_as_cancelling() -> None:
    view = BatchView()
    batch = BatchObject(id=BATCH, input_file_id="file-x", created_at=5)
    assert view.apply(*state(batch)) == BATCH
    assert view.apply(*state(batch.model_copy(update={"status": "in_progress"}))) == BATCH
    got = view.get(BATCH)
    assert got is not None and got.status == "in_progress"
    cancel = BatchCancel(batch_id=BATCH, requested_at=9)
    headers = make_headers(cancel.ce_type, "test", BATCH)
    assert view.apply(f"{BATCH}/cancel".encode(), encode(cancel), headers) == BATCH
    got = view.get(BATCH)
    assert got is not None and (got.status, got.cancelling_at) == ("cancelling", 9)
    view.apply(*state(batch.model_copy(update={"status": "cancelled"})))
    got = view.get(BATCH)
    assert got is not None and got.status == "cancelled"


def test_the_view_skips_records_it_cannot_read() -> None:
    view = BatchView()
    assert view.apply(b"k", b"{}", make_headers("sluice.batch", "test", "x")) is None
    assert view.apply(b"k", b"{}", []) is None
    assert view.skipped == 2 and view.batches == {}


def test_pages_are_newest_first_and_follow_after() -> None:
    view = BatchView()
    for i in range(5):
        view.put(BatchObject(id=f"batch_{i}", input_file_id="f", created_at=100 + i))
    first, more = view.page(None, 2)
    assert [b.id for b in first] == ["batch_4", "batch_3"] and more
    second, more = view.page("batch_3", 2)
    assert [b.id for b in second] == ["batch_2", "batch_1"] and more
    last, more = view.page("batch_1", 2)
    assert [b.id for b in last] == ["batch_0"] and not more
    assert view.page("batch_unknown", 2) == ([], False)


# --- multipart ---------------------------------------------------------------------------------


CT = "multipart/form-data; boundary=XyZ"


def form(*parts: bytes) -> bytes:
    return b"".join(b"--XyZ\r\n" + p + b"\r\n" for p in parts) + b"--XyZ--\r\n"


def test_a_form_gives_its_fields_and_file_bytes_untouched() -> None:
    data = b"line 1\r\n--XyZ is not a boundary here\nline 2\r\n"
    body = form(
        b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch',
        b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + data,
    )
    got = fields(parse_form(body, CT))
    assert got["purpose"].data == b"batch" and got["purpose"].filename is None
    assert got["file"].data == data and got["file"].filename == "in.jsonl"


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b"", None, "no Content-Type"),
        (b"", "application/json", "not application/json"),
        (b"", "multipart/form-data", "no boundary"),
        (b"nothing", CT, "does not start"),
        (b"--XyZ\r\nContent-Disposition: form-data; name=a\r\n\r\nx", CT, "closing boundary"),
        (form(b"Content-Disposition: form-data\r\n\r\nx"), CT, "name="),
        (form(b"no header block"), CT, "no header block"),
    ],
)
def test_malformed_forms_are_refused_saying_why(
    body: bytes, content_type: str | None, says: str
) -> None:
    with pytest.raises(MultipartError, match=says):
        parse_form(body, content_type)


def test_a_field_sent_twice_is_refused() -> None:
    part = b'Content-Disposition: form-data; name="file"; filename="a"\r\n\r\nx'
    with pytest.raises(MultipartError, match="more than once"):
        fields(parse_form(form(part, part), CT))


def test_expired_and_cancelled_answers_become_the_batch_s_own_line_errors() -> None:
    """compute answers a line it stopped for the batch's deadline or its cancel; the error file
    says so the way OpenAI does, not as an HTTP error response."""
    from pipeline.errors import Cancelled, Expired
    from schemas.messages import encode
    from stages.batch_job import outcome_of

    cancelled = outcome_of("b-1", encode(Cancelled("stopped").answer()))
    expired = outcome_of("b-2", encode(Expired("late").answer()))
    assert (cancelled.response, cancelled.error) == (None, CANCELLED_ERROR)
    assert (expired.response, expired.error) == (None, EXPIRED_ERROR)
