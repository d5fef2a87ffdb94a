"""The files of ``sluice infer``: prompts read lazily, answers written as they arrive, resume.

- ``scan_prompts`` checks every line once (a bad line is an error before anything is sent) and
  counts them; ``iter_prompts`` then reads them again one at a time, so the prompts are never
  all in memory.
- ``OrderedWriter`` writes each answer line as soon as every earlier one is written: input
  order, flushed line by line. An answer waits in it only behind an earlier prompt still
  unanswered (at most that prompt's timeout).
- ``written_indices`` reads what an earlier run wrote (``--resume``): the index of every
  complete line; a line cut short by a killed run is removed first.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.client import Prompt, Reply
from schemas.messages import encode


def _lines(path: Path) -> Iterator[tuple[int, Prompt]]:
    """(index, prompt) of each non-blank line; ValueError naming the line for a bad one."""
    index = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(value, str | dict):
                raise ValueError(f"{path}:{number}: expected a JSON string or object")
            yield index, value
            index += 1


def scan_prompts(path: Path) -> int:
    """How many prompts ``path`` holds (one a line, blank lines skipped: a JSON string or a
    JSON object); ValueError at the first line that is neither."""
    return sum(1 for _ in _lines(path))


def iter_prompts(
    path: Path, skip: set[int] | frozenset[int] = frozenset()
) -> Iterator[tuple[int, Prompt]]:
    """The prompts of ``path`` with their indices, leaving out the indices in ``skip``."""
    return ((i, p) for i, p in _lines(path) if i not in skip)


def written_indices(path: Path) -> set[int]:
    """The indices of the complete answer lines in ``path`` (none when it does not exist); a
    last line without its newline (the run was killed while writing it) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with path.open("r+b") as handle:
            handle.truncate(complete)
    done: set[int] = set()
    for line in data[:complete].splitlines():
        if line.strip():
            done.add(int(orjson.loads(line)["index"]))
    return done


def answer_line(index: int, reply: Reply) -> bytes:
    line = {
        "index": index,
        "request_id": reply.request_id,
        "status": reply.status,
        "degraded": reply.degraded,
        "latency_s": round(reply.latency_s, 4),
        "answer": orjson.Fragment(encode(reply.answer)),
    }
    return orjson.dumps(line) + b"\n"


class OrderedWriter:
    """Answer lines to ``handle`` in input order, each as soon as the ones before it are
    written; indices in ``skip`` (already in the file) are not waited for."""

    def __init__(self, handle: IO[bytes], skip: set[int] | frozenset[int] = frozenset()) -> None:
        self.handle = handle
        self.skip = skip
        self.next = 0
        self.held: dict[int, bytes] = {}
        self.written = 0

    def put(self, index: int, line: bytes) -> None:
        self.held[index] = line
        while True:
            if self.next in self.skip:
                self.next += 1
                continue
            ready = self.held.pop(self.next, None)
            if ready is None:
                break
            self.handle.write(ready)
            self.written += 1
            self.next += 1
        self.handle.flush()


@dataclass
class Tally:
    """Counts and latencies of the replies of one run (8 bytes a reply, not the replies)."""

    ok: int = 0
    errors: int = 0
    timed_out: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))

    def add(self, reply: Reply) -> None:
        if reply.timed_out:
            self.timed_out += 1
            return
        self.latencies.append(reply.latency_s)
        if reply.ok:
            self.ok += 1
        else:
            self.errors += 1

    @property
    def total(self) -> int:
        return self.ok + self.errors + self.timed_out

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * q / 100))]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.errors, "timed_out": self.timed_out}
