"""Preprocess: validate the prompt, apply the model's chat template, tokenize.

Bad input (CloudEvents headers that say it is not a 1.0 prompt, bad JSON, schema, empty
messages, oversized, too long for the context) becomes an ``InvalidInput`` result: the loop
dead-letters it and answers the producer with the reason. Plain JSON without CloudEvents
headers is a prompt like any other.

Both lanes: prompts from ``<prefix>prompts`` go to ``<prefix>tokenized``, those from the batch
lane (``<prefix>prompts.batch``) to ``<prefix>tokenized.batch``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from pipeline.config import Settings
from pipeline.errors import InvalidInput
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.stage import StageSpec, isolate, output_for, rebind_ids
from schemas.errors import SchemaError
from schemas.headers import check_cloudevent
from schemas.messages import (
    CE_PROMPT,
    CONTEXT_LENGTH_EXCEEDED,
    PromptMessage,
    SamplingParams,
    Timings,
    TokenizedMessage,
    parse_prompt,
)
from stages.text import TextModel, fingerprint

STAGE = "preprocess"


class Preprocess:
    def __init__(self, settings: Settings, text: TextModel) -> None:
        topics = settings.topics
        self.spec = StageSpec(
            STAGE,
            topics.prompts,
            topics.answers,
            output_topics=(topics.tokenized, topics.tokenized_batch),
            batch_input_topic=topics.prompts_batch,
        )
        self.text = text
        self.max_bytes = settings.max_prompt_bytes
        self.out_topic = topics.tokenized
        self.batch_topics = (topics.prompts_batch, topics.tokenized_batch)

    def handle(self, batch: Batch) -> list[Result]:
        return isolate(batch, self._one, stage=STAGE)

    def _one(self, record: Record) -> Result:
        t0 = time.perf_counter()
        if (problem := check_cloudevent(record.headers, CE_PROMPT)) is not None:
            error = InvalidInput(problem.message, reason=problem.reason, param=problem.header)
            return Result(record, error=error)
        try:
            prompt = parse_prompt(record.value, self.max_bytes)
        except SchemaError as exc:
            return Result(record, error=InvalidInput.from_schema(exc))
        try:
            self.text.check_top_k(prompt.top_k)  # the engine would fail on it: refused here
        except InvalidInput as exc:
            return Result(record, error=exc)
        request_id = prompt.id or record.request_id()
        conversation = prompt.conversation_id or _key_text(record) or request_id
        messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
        ids = self.text.encode(self.text.render(messages))
        limit = self.text.context_length
        wanted = prompt.requested_max_tokens
        if len(ids) >= limit or (wanted is not None and len(ids) + wanted > limit):
            return Result(record, error=_too_long(len(ids), wanted, limit))
        sampling = SamplingParams.from_prompt(prompt, max_tokens=wanted or limit - len(ids))
        received = record.timestamp_ms / 1000
        message = TokenizedMessage(
            id=request_id,
            conversation_id=conversation,
            model=prompt.model or self.text.name,
            input_ids=ids,
            sampling=sampling,
            created=int(received),
            timings=Timings(
                received_at=received,
                preprocess_s=time.perf_counter() - t0,
                preprocessed_at=time.time(),
            ),
        )
        out = output_for(
            record,
            self._out_topic(record),
            message,
            stage=STAGE,
            request_id=request_id,
            key=conversation.encode(),
        )
        return Result(record, outputs=[out], fingerprint=self._fingerprint(prompt))

    def _fingerprint(self, prompt: PromptMessage) -> str:
        return fingerprint(
            prompt.model,
            [m.model_dump() for m in prompt.messages],
            prompt.temperature,
            prompt.top_p,
            prompt.top_k,
            prompt.seed,
            prompt.requested_max_tokens,
            prompt.stop,
        )

    def fingerprint(self, record: Record) -> str | None:
        if check_cloudevent(record.headers, CE_PROMPT) is not None:
            return None  # not a prompt: never answered from the response cache
        try:
            return self._fingerprint(parse_prompt(record.value, self.max_bytes))
        except SchemaError:
            return None

    def rebind(self, cached: Sequence[Output], record: Record) -> list[Output]:
        prompt = parse_prompt(record.value, self.max_bytes)
        request_id = prompt.id or record.request_id()
        conversation = prompt.conversation_id or _key_text(record) or request_id
        outputs = rebind_ids(
            cached,
            record,
            stage=STAGE,
            request_id=request_id,
            conversation_id=conversation,
            key=conversation.encode(),
        )  # a cached answer may come from the other lane: this record's lane decides
        return [replace(o, topic=self._out_topic(record)) for o in outputs]

    def _out_topic(self, record: Record) -> str:
        """A prompt stays in its lane: the batch lane's go to ``<prefix>tokenized.batch``."""
        prompts_batch, tokenized_batch = self.batch_topics
        return tokenized_batch if record.topic == prompts_batch else self.out_topic

    async def warmup(self) -> None:
        self.text.encode(self.text.render([{"role": "user", "content": "warm up"}]))

    async def close(self) -> None:
        return None


def _key_text(record: Record) -> str | None:
    if not record.key:
        return None
    return record.key.decode("utf-8", errors="replace")


def _too_long(prompt_tokens: int, wanted: int | None, limit: int) -> InvalidInput:
    if prompt_tokens >= limit:
        message = (
            f"This model's maximum context length is {limit} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens. Please reduce the length of "
            "the messages."
        )
    else:
        message = (
            f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {prompt_tokens + (wanted or 0)} tokens ({prompt_tokens} in the "
            f"messages, {wanted} in the completion). Please reduce the length of the "
            "messages or completion."
        )
    return InvalidInput(
        message, reason="context-length", param="messages", code=CONTEXT_LENGTH_EXCEEDED
    )
