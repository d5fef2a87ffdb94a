"""The streaming contract: deadline and reply-to headers, deltas and cancels on the wire."""

from __future__ import annotations

from schemas.streaming import (
    SLUICE_DEADLINE,
    SLUICE_REPLY_TO,
    CancelMessage,
    DeltaMessage,
    ReplyTo,
    deadline_header,
    expired,
    parse_deadline,
    parse_reply_to,
)
from schemas.wire import decode, encode


def test_deadline_round_trips_and_expires() -> None:
    headers = [deadline_header(1_000)]
    assert parse_deadline(headers) == 1_000
    assert expired(headers, at_ms=1_000) and not expired(headers, at_ms=999)


def test_a_malformed_or_missing_deadline_never_expires() -> None:
    for raw in (b"soon", b"", b"-5", b"\xff"):
        headers = [(SLUICE_DEADLINE, raw)]
        assert parse_deadline(headers) is None
        assert not expired(headers, at_ms=10**15)
    assert not expired([], at_ms=10**15)


def test_reply_to_round_trips_and_refuses_garbage() -> None:
    addr = ReplyTo("sluice.replies", 7)
    assert parse_reply_to([addr.header()]) == addr
    for raw in (b"sluice.replies", b":3", b"t:x", b"t:-1", b""):
        assert parse_reply_to([(SLUICE_REPLY_TO, raw)]) is None


def test_delta_and_cancel_on_the_wire() -> None:
    delta = DeltaMessage(id="r1", index=2, delta="hel", finish_reason=None)
    assert decode(DeltaMessage, encode(delta)) == delta
    cancel = CancelMessage(id="r1")
    assert decode(CancelMessage, encode(cancel)).reason == "cancelled"


def test_an_answer_is_copied_to_its_reply_address_with_its_own_headers() -> None:
    from schemas.streaming import reply_copy

    headers = [("ce_type", b"sluice.answer"), ReplyTo("p.replies", 4).header()]
    assert reply_copy(headers, b"{}") == ("p.replies", 4, headers, b"{}")
    assert reply_copy([("ce_type", b"sluice.answer")], b"{}") is None
    assert reply_copy([(SLUICE_REPLY_TO, b"garbage")], b"{}") is None
