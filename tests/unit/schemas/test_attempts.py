"""The rule "a completion, or else the latest attempt, stands"."""

from __future__ import annotations

import itertools

import pytest

from schemas.attempts import AnswerFacts, answer_facts, standing, supersedes
from schemas.headers import SLUICE_ATTEMPT, make_headers
from schemas.messages import CE_ANSWER, CE_ANSWER_ERROR


def ok(attempt: int) -> AnswerFacts:
    return AnswerFacts(attempt, completion=True)


def err(attempt: int) -> AnswerFacts:
    return AnswerFacts(attempt, completion=False)


def test_nothing_stands_among_no_answers() -> None:
    assert standing([]) is None


def test_the_completion_of_a_replay_stands_over_the_original_error() -> None:
    circuit_open, completion = err(1), ok(2)
    assert standing([circuit_open, completion]) is completion


def test_a_completion_stands_over_a_later_error_even_of_a_later_attempt() -> None:
    completion = ok(1)
    assert standing([completion, err(2), err(3)]) is completion


def test_of_several_completions_the_first_stands() -> None:
    first, again, retried = ok(1), ok(1), ok(2)
    assert standing([first, again, retried]) is first


def test_without_a_completion_the_latest_attempt_stands_whatever_the_order() -> None:
    newest = err(3)
    assert standing([err(1), newest, err(2)]) is newest
    assert standing([err(2), err(1), newest]) is newest


def test_of_two_errors_of_one_attempt_the_later_stands() -> None:
    first, second = err(1), err(1)
    assert standing([first, second]) is second


def test_answers_arriving_one_by_one_end_where_the_whole_sequence_does() -> None:
    answers = [err(1), ok(2), err(2), ok(1), err(3), err(1)]
    for order in itertools.permutations(answers):
        current: AnswerFacts | None = None
        for answer in order:
            if supersedes(answer, current):
                current = answer
        assert current is standing(order)
        completions = [a for a in order if a.completion]
        assert current is completions[0]


@pytest.mark.parametrize(
    ("ce_type", "attempt", "facts"),
    [
        (CE_ANSWER, None, AnswerFacts(1, True)),
        (CE_ANSWER_ERROR, None, AnswerFacts(1, False)),
        (CE_ANSWER_ERROR, b"4", AnswerFacts(4, False)),
        (CE_ANSWER, b"2", AnswerFacts(2, True)),
    ],
)
def test_facts_come_from_the_answer_headers(
    ce_type: str, attempt: bytes | None, facts: AnswerFacts
) -> None:
    headers = make_headers(ce_type, "postprocess", "r")
    if attempt is not None:
        headers.append((SLUICE_ATTEMPT, attempt))
    assert answer_facts(headers) == facts
