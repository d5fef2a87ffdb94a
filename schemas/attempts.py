"""Which of a request's answers stands: a completion, or else the latest attempt.

A request may be answered more than once: at-least-once delivery can repeat an answer, and
`sluice replay` starts a new attempt at a request that was answered with an error (the
dead-letter re-drive of a `circuit-open`, say). Every record carries its attempt in the
`sluice-attempt` header (`schemas.headers.parse_attempt`; 1 when absent). Whoever holds several
answers to one request keeps the one that stands:

1. a completion stands over any error answer, whatever their attempts; of several completions
   the first one stands (the later ones are re-deliveries or re-tries of work that had
   succeeded);
2. with no completion, the error answer of the highest attempt stands; of two error answers of
   the same attempt, the later one.

`supersedes(new, current)` applies the rule to answers as they arrive (a client, a gateway);
`standing(answers)` to a sequence in arrival order (archive restore, `replay --unanswered`).
Both are pure: answers are anything with an `attempt` and a `completion` flag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from schemas.headers import CE_TYPE, HeadersIn, header_value, parse_attempt
from schemas.messages import CE_ANSWER_ERROR

__all__ = ["AnswerFacts", "Attempted", "answer_facts", "standing", "supersedes"]


class Attempted(Protocol):
    @property
    def attempt(self) -> int: ...

    @property
    def completion(self) -> bool: ...


A = TypeVar("A", bound=Attempted)


@dataclass(frozen=True, slots=True)
class AnswerFacts:
    """What the rule needs to know of one answer."""

    attempt: int
    completion: bool


def answer_facts(headers: HeadersIn | None) -> AnswerFacts:
    """An answer record's attempt, and whether it is a completion (`ce_type` is not
    `sluice.answer.error`), from its headers."""
    error = (header_value(headers, CE_TYPE) or "").strip() == CE_ANSWER_ERROR
    return AnswerFacts(parse_attempt(headers), not error)


def supersedes(new: Attempted, current: Attempted | None) -> bool:
    """Whether `new`, arriving after `current`, stands in its place."""
    if current is None:
        return True
    if current.completion:
        return False
    return new.completion or new.attempt >= current.attempt


def standing(answers: Iterable[A]) -> A | None:
    """The answer that stands among `answers` (in arrival order); None when there are none."""
    stands: A | None = None
    for answer in answers:
        if supersedes(answer, stands):
            stands = answer
    return stands
