"""``sluice restore``: one conversation's turns, in order, from the archive.

A turn is one prompt and its answer. A prompt belongs to conversation C when its body's
``conversation_id`` is C, or it has none and its key is C (what preprocess decides). Its answer
is the archived answer with its request id that stands (``schemas.attempts``): the first
completion if there is one, else the error answer of the latest attempt. Turns are ordered by
the prompt's timestamp, then partition and offset; a request id archived twice (a re-published
prompt) is one turn, at its first appearance.

Every partition of the prompts and answers topics is read: the tools do not assume how the
producer partitioned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.config import Topics
from pipeline.storage import ObjectStore
from replay.archive import ArchiveReader
from replay.common import NoProgress, Progress, format_ms
from replay.prompts import prompt_request_id
from schemas.archive import ArchivedRecord
from schemas.attempts import AnswerFacts, supersedes
from schemas.errors import SchemaError
from schemas.headers import SLUICE_DEGRADED, SLUICE_REQUEST_ID, header_value, parse_attempt
from schemas.messages import ChatCompletion, decode_answer


@dataclass
class Turn:
    request_id: str
    conversation_id: str
    prompt_at_ms: int
    where: str  # topic[partition]@offset of the prompt
    messages: list[dict[str, str]]
    answer: dict[str, Any] | None = None  # {"role": "assistant", "content", "finish_reason"}
    error: dict[str, Any] | None = None  # OpenAI error object: type, code, message
    answered_at_ms: int | None = None
    degraded: bool = False
    standing: AnswerFacts | None = None  # the attempt and kind of the answer shown

    def as_json(self, number: int) -> dict[str, Any]:
        return {
            "turn": number,
            "request_id": self.request_id,
            "conversation_id": self.conversation_id,
            "prompt_at": format_ms(self.prompt_at_ms),
            "where": self.where,
            "messages": self.messages,
            "answer": self.answer,
            "error": self.error,
            "answered_at": format_ms(self.answered_at_ms) if self.answered_at_ms else None,
            "degraded": self.degraded,
            "attempt": self.standing.attempt if self.standing is not None else None,
        }


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        return "".join(str(part.get("text", "")) for part in value if isinstance(part, dict))
    return "" if value is None else orjson.dumps(value).decode()


def _prompt_turn(record: ArchivedRecord, cluster_id: str = "") -> tuple[str, Turn] | None:
    """(conversation id, turn) of an archived prompt; None when the body is not a JSON object."""
    try:
        body = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    rid = prompt_request_id(record, cluster_id)
    conversation = body.get("conversation_id")
    if not isinstance(conversation, str) or not conversation:
        key = record.key.decode("utf-8", errors="replace") if record.key else None
        conversation = key or rid
    raw = body.get("messages")
    messages = [
        {"role": str(m.get("role", "?")), "content": _content(m.get("content"))}
        for m in (raw if isinstance(raw, list) else [])
        if isinstance(m, dict)
    ]
    turn = Turn(rid, conversation, record.timestamp_ms, record.where, messages)
    return conversation, turn


def _attach(turn: Turn, record: ArchivedRecord) -> None:
    try:
        answer = decode_answer(record.value)
    except SchemaError:
        return
    completion = isinstance(answer, ChatCompletion)
    facts = AnswerFacts(parse_attempt(record.headers), completion)
    if not supersedes(facts, turn.standing):
        return
    turn.standing = facts
    if isinstance(answer, ChatCompletion):
        turn.answer = {
            "role": "assistant",
            "content": answer.content,
            "finish_reason": answer.choices[0].finish_reason,
        }
        turn.error = None
    else:
        turn.error = answer.error.model_dump(mode="json")
    turn.answered_at_ms = record.timestamp_ms
    turn.degraded = header_value(record.headers, SLUICE_DEGRADED) == "true"


async def restore_conversation(
    store: ObjectStore,
    topics: Topics,
    conversation_id: str,
    progress: Progress | None = None,
    cluster_id: str = "",
) -> list[Turn]:
    """The conversation's turns, in order, with their answers."""
    progress = progress or NoProgress()
    reader = ArchiveReader(store)
    turns: dict[str, tuple[tuple[int, int, int], Turn]] = {}
    names = await reader.objects(topics.prompts)
    progress.begin(f"reading prompts ({topics.prompts})", len(names))
    async for record in reader.records(
        topics.prompts, objects=names, on_object=lambda _: progress.advance(1, turns=len(turns))
    ):
        found = _prompt_turn(record, cluster_id)
        if found is None or found[0] != conversation_id or found[1].request_id in turns:
            continue
        order = (record.timestamp_ms, record.partition, record.offset)
        turns[found[1].request_id] = (order, found[1])
    if turns:
        names = await reader.objects(topics.answers)
        progress.begin(f"reading answers ({topics.answers})", len(names))
        async for record in reader.records(
            topics.answers, objects=names, on_object=lambda _: progress.advance(1)
        ):
            rid = header_value(record.headers, SLUICE_REQUEST_ID)
            if rid is not None and rid in turns:
                _attach(turns[rid][1], record)
    return [turn for _, turn in sorted(turns.values(), key=lambda item: item[0])]


def to_jsonl(turns: Sequence[Turn]) -> str:
    return "".join(orjson.dumps(t.as_json(i)).decode() + "\n" for i, t in enumerate(turns, 1))


def to_markdown(turns: Sequence[Turn], conversation_id: str) -> str:
    """The conversation as a transcript: each turn shows only what it added to the previous."""
    lines = [f"# Conversation {conversation_id}", "", f"{len(turns)} turns", ""]
    context: list[dict[str, str]] = []
    for number, turn in enumerate(turns, 1):
        heading = f"## Turn {number} · {format_ms(turn.prompt_at_ms)} · request {turn.request_id}"
        lines += [heading, ""]
        new = turn.messages
        if context and turn.messages[: len(context)] == context:
            new = turn.messages[len(context) :]
        for message in new:
            lines += [f"**{message['role']}:** {message['content']}", ""]
        if turn.answer is not None:
            note = " _(degraded: served from the response cache)_" if turn.degraded else ""
            lines += [f"**assistant:** {turn.answer['content']}{note}", ""]
            context = [*turn.messages, {"role": "assistant", "content": turn.answer["content"]}]
        else:
            if turn.error is not None:
                lines += [f"> error ({turn.error.get('type')}): {turn.error.get('message')}", ""]
            else:
                lines += ["> no answer in the archive", ""]
            context = list(turn.messages)
    return "\n".join(lines)
