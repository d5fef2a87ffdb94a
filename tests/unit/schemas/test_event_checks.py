"""The CloudEvents check a topic applies to what arrives, and the attempt header."""

from __future__ import annotations

import pytest

from schemas.headers import (
    CE_SPECVERSION,
    CE_TYPE,
    FIRST_ATTEMPT,
    SLUICE_ATTEMPT,
    HeadersIn,
    check_cloudevent,
    make_headers,
    parse_attempt,
)
from schemas.messages import CE_ANSWER, CE_PROMPT


@pytest.mark.parametrize(
    "headers",
    [
        [],  # plain JSON from a foreign producer
        [("content-type", b"application/json")],
        make_headers(CE_PROMPT, "gateway", "r"),
        [(CE_SPECVERSION, b"1.0")],  # a specversion alone is fine
        [(CE_TYPE, CE_PROMPT.encode())],
        [("CE_SPECVERSION", b" 1.0 "), ("Ce_Type", b"sluice.prompt")],
    ],
)
def test_plain_json_and_1_0_prompts_pass(headers: HeadersIn) -> None:
    assert check_cloudevent(headers, CE_PROMPT) is None


@pytest.mark.parametrize("version", [b"0.3", b"99", b"\xff\xfegarbage", b"", b"1.0.1", b"1"])
def test_an_unsupported_specversion_is_refused_with_the_value_and_the_one_supported(
    version: bytes,
) -> None:
    problem = check_cloudevent([(CE_SPECVERSION, version), (CE_TYPE, b"sluice.prompt")], CE_PROMPT)
    assert problem is not None
    assert problem.reason == "unsupported-specversion"
    assert problem.header == CE_SPECVERSION
    assert "only '1.0' is supported" in problem.message
    shown = version.decode("utf-8", errors="replace")
    assert repr(shown) in problem.message


def test_the_last_specversion_header_is_the_one_checked() -> None:
    headers = [(CE_SPECVERSION, b"1.0"), (CE_SPECVERSION, b"0.3")]
    problem = check_cloudevent(headers, CE_PROMPT)
    assert problem is not None and "'0.3'" in problem.message


@pytest.mark.parametrize("ce_type", [CE_ANSWER, "sluice.answer.error", "com.example.order", ""])
def test_a_type_that_is_not_a_prompt_is_refused(ce_type: str) -> None:
    headers = make_headers(ce_type, "someone", "r")
    problem = check_cloudevent(headers, CE_PROMPT)
    assert problem is not None
    assert problem.reason == "wrong-ce-type"
    assert problem.header == CE_TYPE
    assert repr(ce_type) in problem.message and "'sluice.prompt'" in problem.message


def test_a_huge_header_value_is_cut_in_the_message() -> None:
    problem = check_cloudevent([(CE_TYPE, b"x" * 10_000)], CE_PROMPT)
    assert problem is not None and len(problem.message) < 300


@pytest.mark.parametrize(
    ("headers", "attempt"),
    [
        ([], FIRST_ATTEMPT),
        ([(SLUICE_ATTEMPT, b"1")], 1),
        ([(SLUICE_ATTEMPT, b"3")], 3),
        ([("Sluice-Attempt", b" 7 ")], 7),
        ([(SLUICE_ATTEMPT, b"2"), (SLUICE_ATTEMPT, b"4")], 4),
        ([(SLUICE_ATTEMPT, b"0")], FIRST_ATTEMPT),
        ([(SLUICE_ATTEMPT, b"-2")], FIRST_ATTEMPT),
        ([(SLUICE_ATTEMPT, b"two")], FIRST_ATTEMPT),
        ([(SLUICE_ATTEMPT, None)], FIRST_ATTEMPT),
    ],
)
def test_the_attempt_header_reads_as_a_positive_integer_and_defaults_to_the_first(
    headers: HeadersIn, attempt: int
) -> None:
    assert parse_attempt(headers) == attempt
