"""Dead letters: a null value stays null, the timestamp type is kept, and oversized ones fit."""

from __future__ import annotations

import pytest

from pipeline.errors import InvalidInput
from pipeline.runtime.batch import Output, Record
from pipeline.runtime.dead_letters import (
    SLUICE_DLT_DROPPED_HEADERS,
    SLUICE_DLT_ORIGINAL_SIZE,
    SLUICE_DLT_TRUNCATED,
    dead_letter,
    fit_to_request,
    fits,
    record_size,
)
from schemas.dlt import DLT_ORIGINAL_OFFSET, DLT_ORIGINAL_TIMESTAMP_TYPE, encode_int64
from schemas.headers import SLUICE_DLT_REASON, SLUICE_REQUEST_ID, header_bytes, header_value

LIMIT = 1 << 20


def _record(value: bytes | None, *, headers: list[tuple[str, bytes]] | None = None) -> Record:
    return Record(
        topic="sluice.prompts",
        partition=1,
        offset=7,
        timestamp_ms=1_700_000_000_000,
        key=b"conv",
        value=value,
        headers=headers or [(SLUICE_REQUEST_ID, b"req-1")],
        timestamp_type=1,
    )


def _error() -> InvalidInput:
    return InvalidInput("the prompt is not JSON", reason="schema")


def test_a_tombstone_is_dead_lettered_as_a_tombstone() -> None:
    dead = dead_letter(_record(None), group="g", error=_error())
    assert dead.tombstone
    assert dead.wire_value is None
    assert dead.topic == "sluice.prompts.DLT"
    not_null = dead_letter(_record(b""), group="g", error=_error())
    assert not not_null.tombstone
    assert not_null.wire_value == b""


def test_the_dead_letter_carries_the_spring_set_with_the_timestamp_type() -> None:
    dead = dead_letter(_record(b"{bad"), group="g", error=_error())
    assert dead.wire_value == b"{bad"
    assert dead.key == b"conv"
    assert header_bytes(dead.headers, DLT_ORIGINAL_OFFSET) == encode_int64(7)
    assert header_bytes(dead.headers, DLT_ORIGINAL_TIMESTAMP_TYPE) == b"LogAppendTime"
    assert header_value(dead.headers, SLUICE_DLT_REASON) == "schema"
    assert header_value(dead.headers, SLUICE_REQUEST_ID) == "req-1"


def test_what_fits_is_left_alone() -> None:
    dead = dead_letter(_record(b"x" * 1000), group="g", error=_error())
    assert fit_to_request(dead, LIMIT) is dead


def test_an_oversized_value_is_cut_to_fit_and_says_so() -> None:
    value = b'{"messages": "' + "é".encode() * 600_000 + b'"}'
    dead = dead_letter(_record(value), group="g", error=_error())
    assert not fits(dead, LIMIT)
    fitted = fit_to_request(dead, LIMIT)
    assert fits(fitted, LIMIT)
    assert record_size(fitted.key, fitted.wire_value, fitted.headers) > LIMIT - 4096
    assert header_value(fitted.headers, SLUICE_DLT_TRUNCATED) == "value"
    assert header_value(fitted.headers, SLUICE_DLT_ORIGINAL_SIZE) == str(len(value))
    assert value.startswith(fitted.value)
    fitted.value.decode("utf-8")  # never cut inside a character
    assert header_value(fitted.headers, SLUICE_DLT_REASON) == "schema"


def test_oversized_original_headers_are_dropped_largest_first() -> None:
    headers = [
        (SLUICE_REQUEST_ID, b"req-1"),
        ("small", b"s"),
        ("huge", b"h" * (LIMIT + 10)),
        ("big", b"b" * (LIMIT // 2)),
    ]
    dead = dead_letter(_record(b"v" * 1000, headers=headers), group="g", error=_error())
    fitted = fit_to_request(dead, LIMIT)
    assert fits(fitted, LIMIT)
    names = [name for name, _ in fitted.headers]
    assert "huge" not in names
    assert "small" in names
    assert header_value(fitted.headers, SLUICE_REQUEST_ID) == "req-1"
    assert header_value(fitted.headers, SLUICE_DLT_TRUNCATED) == "headers"
    assert header_value(fitted.headers, SLUICE_DLT_DROPPED_HEADERS) == str(
        3 - sum(n in names for n in ("small", "big"))
    )
    assert fitted.value == b"v" * 1000


def test_an_oversized_key_is_cut_last() -> None:
    out = Output("sluice.prompts.DLT", b"k" * (2 * LIMIT), b"value", [])
    fitted = fit_to_request(out, LIMIT)
    assert fits(fitted, LIMIT)
    assert header_value(fitted.headers, SLUICE_DLT_TRUNCATED) == "key"
    assert fitted.key is not None
    assert 0 < len(fitted.key) < LIMIT
    assert fitted.value == b"value"


def test_a_tombstone_stays_a_tombstone_when_cut() -> None:
    headers = [(SLUICE_REQUEST_ID, b"r"), ("huge", b"h" * (LIMIT + 1))]
    fitted = fit_to_request(
        dead_letter(_record(None, headers=headers), group="g", error=_error()), LIMIT
    )
    assert fitted.tombstone
    assert fitted.wire_value is None
    assert fits(fitted, LIMIT)


def test_a_limit_too_small_for_the_dead_letter_set_is_one_clear_error() -> None:
    dead = dead_letter(_record(b"v"), group="g", error=_error())
    with pytest.raises(ValueError, match="cannot be made to fit"):
        fit_to_request(dead, 300)
