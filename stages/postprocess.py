"""Postprocess: detokenize, apply stop strings, answer with an OpenAI ``chat.completion``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from prometheus_client import Histogram

from pipeline.config import Settings
from pipeline.errors import InvalidInput, StageFault
from pipeline.observability.metrics import LATENCY_BUCKETS
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.stage import StageSpec, carried, isolate, output_for
from schemas.errors import SchemaError
from schemas.headers import SLUICE_DEGRADED, SLUICE_TIMINGS, TRACEPARENT, header_value, make_headers
from schemas.messages import ChatCompletion, GeneratedMessage, decode, encode
from stages.text import TextModel, fingerprint

STAGE = "postprocess"


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; whether one was found."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Postprocess:
    def __init__(self, settings: Settings, text: TextModel) -> None:
        topics = settings.topics
        # A generation that finished before its deadline is answered, however late it reaches
        # postprocess: the expensive work is done, throwing it away helps no one.
        self.spec = StageSpec(STAGE, topics.generated, topics.answers, expires=False)
        self.text = text
        self.out_topic = topics.answers
        self.end_to_end = Histogram(
            "sluice_end_to_end_seconds",
            "From the prompt's arrival on the prompts topic to its answer being made.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )

    def collectors(self) -> list[Any]:
        return [self.end_to_end]

    def handle(self, batch: Batch) -> list[Result]:
        return isolate(batch, self._one, stage=STAGE)

    def _one(self, record: Record) -> Result:
        t0 = time.perf_counter()
        try:
            msg = decode(GeneratedMessage, record.value)
        except SchemaError as exc:
            return Result(record, error=InvalidInput.from_schema(exc))
        if msg.finish_reason == "error":
            return Result(
                record,
                error=StageFault(msg.error or "generation failed", reason="generation-error"),
            )
        content, stopped = apply_stop(self.text.decode(msg.output_ids), msg.sampling.stop)
        finish = "stop" if stopped else msg.finish_reason
        answer = ChatCompletion.build(
            id=f"chatcmpl-{msg.id}",
            model=msg.model,
            content=content,
            finish_reason=finish,
            usage=msg.usage,
            created=msg.created,
        )
        now = time.time()
        timings = msg.timings.model_copy(
            update={"postprocess_s": time.perf_counter() - t0, "answered_at": now}
        )
        if msg.timings.received_at is not None:
            self.end_to_end.observe(max(0.0, now - msg.timings.received_at))
        out = output_for(
            record,
            self.out_topic,
            answer,
            stage=STAGE,
            request_id=msg.id,
            key=msg.conversation_id.encode(),
            extra={SLUICE_TIMINGS: encode(timings).decode()},
        )
        return Result(record, outputs=[out], fingerprint=_fingerprint(msg))

    def fingerprint(self, record: Record) -> str | None:
        try:
            return _fingerprint(decode(GeneratedMessage, record.value))
        except SchemaError:
            return None

    def rebind(self, cached: Sequence[Output], record: Record) -> list[Output]:
        msg = decode(GeneratedMessage, record.value)
        out: list[Output] = []
        for o in cached:
            body = orjson.loads(o.value)
            body["id"] = f"chatcmpl-{msg.id}"
            headers = make_headers(
                ChatCompletion.ce_type,
                STAGE,
                msg.id,
                traceparent=header_value(record.headers, TRACEPARENT),
                extra=carried(record.headers),
            )
            headers.append((SLUICE_DEGRADED, b"true"))
            out.append(Output(o.topic, msg.conversation_id.encode(), orjson.dumps(body), headers))
        return out

    async def warmup(self) -> None:
        self.text.decode(self.text.encode("warm up"))

    async def close(self) -> None:
        return None


def _fingerprint(msg: GeneratedMessage) -> str:
    return fingerprint(msg.model, msg.output_ids, msg.finish_reason, msg.sampling.stop)
