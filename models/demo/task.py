"""The demo model's synthetic task: short questions whose answers a program can check.

Four kinds of question, all answered in a few characters:

- ``add``: ``What is 37 + 58?`` -> ``95`` (both numbers 0..99)
- ``reverse``: ``Reverse: abcde`` -> ``edcba`` (3..6 lowercase letters)
- ``upper``: ``Uppercase: hello`` -> ``HELLO`` (3..8 lowercase letters)
- ``spell``: ``Spell 372 in Zorbish`` -> ``tam vek rho``: each digit looked up in a small
  fixed, made-up table (:data:`ZORBISH`)

Every question belongs to exactly one split, decided by a hash of its text: about one in ten
is held out and never appears in training (:func:`is_held_out`). The answers to held-out
questions must therefore be computed, not recalled. Generation is seeded and deterministic.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("add", "reverse", "upper", "spell")

# The made-up digit names of Zorbish, the lookup table of the ``spell`` questions.
ZORBISH = ("nul", "tam", "vek", "rho", "quo", "zib", "dor", "fen", "lir", "mox")

HELD_OUT_PERCENT = 10

_ADD = re.compile(r"What is (\d{1,2}) \+ (\d{1,2})\?")
_REVERSE = re.compile(r"Reverse: ([a-z]{3,6})")
_UPPER = re.compile(r"Uppercase: ([a-z]{3,8})")
_SPELL = re.compile(r"Spell (\d{1,3}) in Zorbish")


@dataclass(frozen=True, slots=True)
class Example:
    """One question of the task, its kind and its one correct answer."""

    kind: str
    question: str
    answer: str


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> str:
    return f"What is {rng.randint(0, 99)} + {rng.randint(0, 99)}?"


def _reverse(rng: random.Random) -> str:
    return f"Reverse: {_letters(rng, 3, 6)}"


def _upper(rng: random.Random) -> str:
    return f"Uppercase: {_letters(rng, 3, 8)}"


def _spell(rng: random.Random) -> str:
    return f"Spell {rng.randint(0, 999)} in Zorbish"


_QUESTION: dict[str, Callable[[random.Random], str]] = {
    "add": _add,
    "reverse": _reverse,
    "upper": _upper,
    "spell": _spell,
}


def solve(question: str) -> Example | None:
    """The kind and correct answer of a question of this task, or None if it is not one."""
    q = question.strip()
    if m := _ADD.fullmatch(q):
        return Example("add", q, str(int(m[1]) + int(m[2])))
    if m := _REVERSE.fullmatch(q):
        return Example("reverse", q, m[1][::-1])
    if m := _UPPER.fullmatch(q):
        return Example("upper", q, m[1].upper())
    if m := _SPELL.fullmatch(q):
        return Example("spell", q, " ".join(ZORBISH[int(d)] for d in m[1]))
    return None


def check(question: str, answer_text: str) -> bool:
    """Whether answer_text (surrounding whitespace ignored) answers the question correctly."""
    solved = solve(question)
    return solved is not None and answer_text.strip() == solved.answer


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the held-out split (never used for training)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


def _sample(n: int, seed: int, held: bool, unique: bool) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        kind = KINDS[rng.randrange(len(KINDS))]
        question = _QUESTION[kind](rng)
        if is_held_out(question) != held or (unique and question in seen):
            continue
        seen.add(question)
        solved = solve(question)
        assert solved is not None and solved.kind == kind, question
        out.append(solved)
    return out


def train_examples(n: int, seed: int = 0) -> list[Example]:
    """n training examples (kinds in equal proportion on average; repeats possible)."""
    return _sample(n, seed, held=False, unique=False)


def held_out(n: int, seed: int = 1234) -> list[Example]:
    """n distinct held-out examples; none of their questions is ever produced for training."""
    return _sample(n, seed, held=True, unique=True)
