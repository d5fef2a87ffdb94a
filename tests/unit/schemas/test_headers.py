"""CloudEvents headers, W3C trace context, and the Spring / Kafka Connect dead-letter headers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from schemas import (
    CE_PROMPT,
    CONNECT_ERRORS_EXCEPTION_CLASS_NAME,
    CONNECT_ERRORS_EXCEPTION_MESSAGE,
    CONNECT_ERRORS_OFFSET,
    CONNECT_ERRORS_PARTITION,
    CONNECT_ERRORS_TOPIC,
    DLT_EXCEPTION_MESSAGE,
    DLT_EXCEPTION_STACKTRACE,
    DLT_ORIGINAL_OFFSET,
    DLT_ORIGINAL_PARTITION,
    DLT_ORIGINAL_TIMESTAMP,
    DLT_ORIGINAL_TOPIC,
    SLUICE_DEGRADED,
    SLUICE_DLT_REASON,
    SLUICE_TIMINGS,
    TRACEPARENT,
    SchemaError,
    child_traceparent,
    decode_dlt_int,
    encode_int32,
    encode_int64,
    header_bytes,
    header_value,
    is_valid_traceparent,
    make_dlt_headers,
    make_headers,
    new_traceparent,
    parse_dlt_headers,
    parse_headers,
    parse_traceparent,
)
from schemas.dlt import DLT_ORIGINAL_TIMESTAMP_TYPE

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


# --- CloudEvents -----------------------------------------------------------------------------


def test_make_headers_round_trips_through_parse_headers() -> None:
    before = datetime.now(UTC)
    headers = make_headers(
        CE_PROMPT,
        "gateway",
        "req-1",
        traceparent=PARENT,
        extra={SLUICE_DEGRADED: "true", SLUICE_TIMINGS: '{"queue_s":0.1}'},
    )

    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    assert [k for k, _ in headers][:8] == [
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_time",
        "content-type",
        "traceparent",
        "sluice-request-id",
    ]
    event = parse_headers(headers)
    assert event.specversion == "1.0"
    assert event.id is not None
    assert uuid.UUID(event.id).version == 4
    assert event.source == "/sluice/gateway"
    assert event.stage == "gateway"
    assert event.type == "sluice.prompt"
    assert event.content_type == "application/json"
    assert event.request_id == "req-1"
    assert event.degraded is True
    assert event.timings == '{"queue_s":0.1}'
    assert event.is_cloudevent
    assert event.time is not None
    assert event.time.endswith("Z")
    sent_at = datetime.fromisoformat(event.time)
    assert sent_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= sent_at <= datetime.now(UTC)
    assert event.traceparent is not None
    assert event.traceparent.split("-")[1] == TRACE_ID


def test_each_record_gets_its_own_event_id() -> None:
    ids = {header_value(make_headers(CE_PROMPT, "gateway", "r"), "ce_id") for _ in range(50)}

    assert len(ids) == 50


def test_extra_headers_may_not_replace_standard_ones() -> None:
    with pytest.raises(ValueError, match="ce_type"):
        make_headers(CE_PROMPT, "gateway", "r", extra={"ce_type": "evil"})
    with pytest.raises(ValueError, match="Traceparent"):
        make_headers(CE_PROMPT, "gateway", "r", extra={"Traceparent": PARENT})


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("source-app", b"billing")],
        [("ce_type", None), ("sluice-request-id", None)],
    ],
)
def test_foreign_records_parse_to_none_fields(
    headers: list[tuple[str, bytes | None]] | None,
) -> None:
    event = parse_headers(headers)

    assert event.specversion is None
    assert event.type is None
    assert event.request_id is None
    assert event.traceparent is None
    assert event.stage is None
    assert event.degraded is False
    assert not event.is_cloudevent


def test_header_lookup_is_case_insensitive_and_last_wins() -> None:
    headers: list[tuple[str, bytes | None]] = [
        ("Content-Type", b"text/plain"),
        ("content-type", b"application/json"),
        ("bad", b"\xff\xfeok"),
    ]

    assert header_value(headers, "CONTENT-TYPE") == "application/json"
    assert header_value(headers, "bad") == "\ufffd\ufffdok"
    assert header_bytes(headers, "bad") == b"\xff\xfeok"
    assert header_value(headers, "missing") is None


def test_foreign_source_has_no_stage() -> None:
    assert parse_headers([("ce_source", b"https://example.com/app")]).stage is None


# --- trace context ---------------------------------------------------------------------------


def test_child_traceparent_continues_the_trace_with_a_new_span() -> None:
    child = child_traceparent(PARENT)

    parent_ctx = parse_traceparent(PARENT)
    child_ctx = parse_traceparent(child)
    assert parent_ctx is not None
    assert child_ctx is not None
    assert child_ctx.trace_id == TRACE_ID
    assert child_ctx.parent_id != parent_ctx.parent_id
    assert child_ctx.flags == "01"
    assert child.startswith("00-")


def test_unsampled_flag_is_kept() -> None:
    child = parse_traceparent(child_traceparent(f"00-{TRACE_ID}-00f067aa0ba902b7-00"))

    assert child is not None
    assert not child.sampled


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "",
        "garbage",
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",
        f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-1",
        f"01-{TRACE_ID}-00f067aa0ba902b7-01x",
        f"00_{TRACE_ID}_00f067aa0ba902b7_01",
    ],
)
def test_invalid_traceparent_starts_a_new_trace(garbage: str | None) -> None:
    assert not is_valid_traceparent(garbage)

    replacement = child_traceparent(garbage)

    context = parse_traceparent(replacement)
    assert context is not None
    assert context.trace_id != TRACE_ID
    assert context.sampled


def test_make_headers_replaces_a_garbage_traceparent() -> None:
    headers = make_headers(CE_PROMPT, "preprocess", "r", traceparent="not-a-trace")

    assert is_valid_traceparent(header_value(headers, TRACEPARENT))


def test_later_traceparent_versions_are_read_by_their_first_fields() -> None:
    child = parse_traceparent(child_traceparent(f"01-{TRACE_ID}-00f067aa0ba902b7-01-future"))

    assert child is not None
    assert child.trace_id == TRACE_ID
    assert child.header().startswith("00-")


def test_new_traceparents_are_valid_and_distinct() -> None:
    values = {new_traceparent() for _ in range(100)}

    assert len(values) == 100
    assert all(is_valid_traceparent(v) for v in values)
    unsampled = parse_traceparent(new_traceparent(sampled=False))
    assert unsampled is not None
    assert unsampled.flags == "00"


# --- dead-letter integers --------------------------------------------------------------------


def test_spring_binary_integers() -> None:
    assert encode_int32(3) == b"\x00\x00\x00\x03"
    assert encode_int64(1_732_000_000_123) == (1_732_000_000_123).to_bytes(8, "big")
    assert decode_dlt_int(encode_int32(3)) == 3
    assert decode_dlt_int(encode_int32(2**31 - 1)) == 2**31 - 1
    assert decode_dlt_int(encode_int64(123_456_789_012)) == 123_456_789_012
    assert decode_dlt_int(encode_int64(-1)) == -1  # Spring's "no timestamp"


@pytest.mark.parametrize(
    ("raw", "value"),
    [(b"0", 0), (b"42", 42), (b"-1", -1), (b" 7\n", 7), (b"1234", 1234), (b"12345678", 12345678)],
)
def test_connect_decimal_integers(raw: bytes, value: int) -> None:
    assert decode_dlt_int(raw) == value


@pytest.mark.parametrize("raw", [b"", b"\x00\x01", b"abc", b"\x00" * 5, b"1.5", b"-"])
def test_unreadable_dlt_integers_raise(raw: bytes) -> None:
    with pytest.raises(ValueError, match="dead-letter integer"):
        decode_dlt_int(raw)


# --- dead-letter header sets -----------------------------------------------------------------


def _failure() -> SchemaError:
    try:
        raise SchemaError("schema", "top_p: Input should be greater than 0", "top_p")
    except SchemaError as exc:
        return exc


def test_spring_dlt_headers_round_trip() -> None:
    original = make_headers(CE_PROMPT, "gateway", "req-1")

    headers = make_dlt_headers(
        original,
        topic="sluice.prompts",
        partition=2,
        offset=41,
        timestamp_ms=1_732_000_000_123,
        group="sluice-preprocess",
        reason="schema",
        exc=_failure(),
    )

    assert headers[: len(original)] == original
    assert header_bytes(headers, DLT_ORIGINAL_PARTITION) == b"\x00\x00\x00\x02"
    assert header_bytes(headers, DLT_ORIGINAL_OFFSET) == encode_int64(41)
    assert header_bytes(headers, DLT_ORIGINAL_TIMESTAMP) == encode_int64(1_732_000_000_123)
    assert header_bytes(headers, DLT_ORIGINAL_TIMESTAMP_TYPE) == b"CreateTime"
    info = parse_dlt_headers(headers)
    assert info is not None
    assert info.convention == "spring"
    assert (info.topic, info.partition, info.offset) == ("sluice.prompts", 2, 41)
    assert info.timestamp_ms == 1_732_000_000_123
    assert info.group == "sluice-preprocess"
    assert info.exception_class == "schemas.errors.SchemaError"
    assert info.exception_message == "schema: top_p: Input should be greater than 0"
    assert info.stacktrace is not None
    assert "Traceback" in info.stacktrace
    assert info.reason == "schema"
    assert info.timestamp_type == "CreateTime"
    assert parse_headers(headers).request_id == "req-1"


@pytest.mark.parametrize(
    ("timestamp_type", "written"),
    [(0, b"CreateTime"), (1, b"LogAppendTime"), (-1, b"NoTimestampType")],
)
def test_the_timestamp_type_is_written_by_name_as_spring_does(
    timestamp_type: int, written: bytes
) -> None:
    headers = make_dlt_headers(
        [(DLT_ORIGINAL_TIMESTAMP_TYPE, b"stale")],
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        group="g",
        reason="schema",
        timestamp_type=timestamp_type,
    )
    assert [v for k, v in headers if k == DLT_ORIGINAL_TIMESTAMP_TYPE] == [written]


def test_dead_lettering_twice_keeps_one_set() -> None:
    first = make_dlt_headers(
        [],
        topic="sluice.prompts",
        partition=0,
        offset=1,
        timestamp_ms=0,
        group="sluice-preprocess",
        reason="schema",
    )

    second = make_dlt_headers(
        first,
        topic="sluice.tokenized",
        partition=1,
        offset=2,
        timestamp_ms=0,
        group="sluice-compute",
        reason="circuit-open",
    )

    names = [name for name, _ in second]
    assert names.count(DLT_ORIGINAL_TOPIC) == 1
    assert names.count(SLUICE_DLT_REASON) == 1
    info = parse_dlt_headers(second)
    assert info is not None
    assert (info.topic, info.reason, info.exception_message) == (
        "sluice.tokenized",
        "circuit-open",
        "circuit-open",
    )


def test_message_override_keeps_exception_text_out() -> None:
    def fail(prompt: str) -> None:
        raise RuntimeError(f"cannot generate for {prompt}")

    prompt = "my s3cret"
    try:
        fail(prompt)
    except RuntimeError as exc:
        headers = make_dlt_headers(
            None,
            topic="t",
            partition=0,
            offset=0,
            timestamp_ms=0,
            group="g",
            reason="model-error",
            exc=exc,
            message="generation failed",
        )

    assert header_value(headers, DLT_EXCEPTION_MESSAGE) == "generation failed"
    trace = header_value(headers, DLT_EXCEPTION_STACKTRACE)
    assert trace is not None
    assert "s3cret" not in trace
    assert "in fail" in trace
    assert trace.rstrip().endswith("builtins.RuntimeError: generation failed")


def test_kafka_connect_dlt_headers_are_read() -> None:
    headers: list[tuple[str, bytes | None]] = [
        (CONNECT_ERRORS_TOPIC, b"sluice.prompts"),
        (CONNECT_ERRORS_PARTITION, b"5"),
        (CONNECT_ERRORS_OFFSET, b"1234567"),
        (CONNECT_ERRORS_EXCEPTION_CLASS_NAME, b"org.apache.kafka.connect.errors.DataException"),
        (CONNECT_ERRORS_EXCEPTION_MESSAGE, b"Converting byte[] to Kafka Connect data failed"),
    ]

    info = parse_dlt_headers(headers)

    assert info is not None
    assert info.convention == "connect"
    assert (info.topic, info.partition, info.offset) == ("sluice.prompts", 5, 1234567)
    assert info.exception_class == "org.apache.kafka.connect.errors.DataException"
    assert info.timestamp_ms is None
    assert info.reason is None


def test_unreadable_dlt_integer_becomes_none() -> None:
    info = parse_dlt_headers([(DLT_ORIGINAL_TOPIC, b"t"), (DLT_ORIGINAL_PARTITION, b"\x01")])

    assert info is not None
    assert info.partition is None


def test_plain_records_are_not_dead_letters() -> None:
    assert parse_dlt_headers(make_headers(CE_PROMPT, "gateway", "r")) is None
    assert parse_dlt_headers(None) is None
