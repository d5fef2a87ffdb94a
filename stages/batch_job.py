"""One running batch, without Kafka: which lines are published, which answered, and the files.

The batcher (``stages.batcher``) drives a ``Job``: it asks ``next_to_publish`` for lines to put
on the prompts topic, hands it every answer whose request id belongs to the batch (``offer``:
the first outcome of a line wins, so redelivered or re-published answers never count twice),
and, when every line has an outcome or the batch must stop, ``render``s the output and error
files: one line per input line, in input order.

Outcomes become OpenAI's batch output lines:

- a ``chat.completion`` -> output file, ``response.status_code`` 200;
- an error answer -> error file, with the status the HTTP endpoint would have answered;
  an ``expired`` one (the window's deadline passed in the pipeline) -> ``batch_expired``;
- no answer when the batch stops -> error file, ``batch_expired`` or ``batch_cancelled``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from schemas.batch import (
    BatchObject,
    LineError,
    LineResponse,
    OutputLine,
    RequestCounts,
    line_request_id,
    output_line_id,
)
from schemas.errors import SchemaError
from schemas.headers import Headers, make_headers
from schemas.messages import (
    CANCELLED,
    CE_PROMPT,
    EXPIRED,
    ChatCompletion,
    ErrorAnswer,
    decode_answer,
)
from schemas.streaming import deadline_header
from schemas.wire import encode
from stages.batch_input import Line

SOURCE: Final = "batcher"
EXPIRED_ERROR: Final = LineError(
    code="batch_expired",
    message="This request could not be executed before the completion window expired.",
)
CANCELLED_ERROR: Final = LineError(
    code="batch_cancelled", message="This request was not executed: the batch was cancelled."
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one line: a response (status and body) or an error without one."""

    response: LineResponse | None
    error: LineError | None = None

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response.status_code == 200


def outcome_of(request_id: str, value: bytes | None) -> Outcome:
    """An answers-topic value as a line's outcome (an unreadable one is a server error)."""
    answer: ChatCompletion | ErrorAnswer
    try:
        answer = decode_answer(value)
    except SchemaError as exc:
        answer = ErrorAnswer.server_error(f"The answer could not be read: {exc.message}")
    if isinstance(answer, ChatCompletion):
        return Outcome(LineResponse(status_code=200, request_id=request_id, body=_body(answer)))
    if answer.error.code == EXPIRED:
        return Outcome(None, EXPIRED_ERROR)
    if answer.error.code == CANCELLED:  # compute stopped it because the batch was cancelled
        return Outcome(None, CANCELLED_ERROR)
    response = LineResponse(
        status_code=answer.http_status(), request_id=request_id, body=_body(answer)
    )
    return Outcome(response)


def _body(answer: ChatCompletion | ErrorAnswer) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(encode(answer))
    return body


@dataclass(frozen=True, slots=True)
class PromptRecord:
    request_id: str
    key: bytes
    value: bytes
    headers: Headers


@dataclass
class Job:
    """The lines of one batch and their outcomes; ``batch`` is the state last written."""

    batch: BatchObject
    lines: list[Line]
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)
    cancel_requested_at: int | None = None
    _by_number: dict[int, Line] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_number = {line.number: line for line in self.lines}

    @property
    def batch_id(self) -> str:
        return self.batch.id

    @property
    def done(self) -> bool:
        return len(self.outcomes) == len(self.lines)

    def counts(self) -> RequestCounts:
        completed = sum(1 for o in self.outcomes.values() if o.ok)
        return RequestCounts(
            total=len(self.lines), completed=completed, failed=len(self.outcomes) - completed
        )

    def offer(self, line: int, request_id: str, value: bytes | None) -> bool:
        """Take an answer for ``line``; False when the line is unknown or already has one."""
        if line not in self._by_number or line in self.outcomes:
            return False
        self.outcomes[line] = outcome_of(request_id, value)
        self.pending.discard(line)
        return True

    def next_to_publish(self, max_pending: int) -> list[Line]:
        """Lines without an outcome and not in the pipeline, in order, up to the window."""
        room = max_pending - len(self.pending)
        chosen: list[Line] = []
        for line in self.lines:
            if room <= 0:
                break
            if line.number not in self.outcomes and line.number not in self.pending:
                chosen.append(line)
                room -= 1
        return chosen

    def prompt(self, line: Line) -> PromptRecord:
        """The prompt record of ``line``: its deterministic request id as the body's ``id`` and
        the key, ``custom_id`` and ``batch_id`` in ``metadata``, the window's end as deadline."""
        request_id = line_request_id(self.batch_id, line.number)
        body = dict(line.body)
        own = body.get("metadata")
        metadata = dict(own) if isinstance(own, dict) else {}
        metadata.update(custom_id=line.custom_id, batch_id=self.batch_id)
        body.update(id=request_id, metadata=metadata)
        body.pop("conversation_id", None)  # each line is its own conversation
        headers = make_headers(CE_PROMPT, SOURCE, request_id)
        if self.batch.expires_at is not None:
            name, value = deadline_header(self.batch.expires_at * 1000)
            headers.append((name, value))
        return PromptRecord(request_id, request_id.encode(), orjson.dumps(body), headers)

    def render(self, unanswered: LineError) -> tuple[bytes, bytes]:
        """The output file and the error file (each possibly empty), one line per input line:
        lines without an outcome are written to the error file as ``unanswered``."""
        output: list[bytes] = []
        errors: list[bytes] = []
        for line in self.lines:
            outcome = self.outcomes.get(line.number, Outcome(None, unanswered))
            out = OutputLine(
                id=output_line_id(self.batch_id, line.number),
                custom_id=line.custom_id,
                response=outcome.response,
                error=outcome.error,
            )
            (output if outcome.ok else errors).append(encode(out))
        return _jsonl(output), _jsonl(errors)

    def finished_counts(self) -> RequestCounts:
        """Counts once the batch stops: lines without an outcome count as failed."""
        counts = self.counts()
        return counts.model_copy(update={"failed": counts.total - counts.completed})


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def now_s() -> int:
    return int(time.time())
