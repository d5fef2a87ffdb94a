"""Compute: tokenized requests in, generated tokens out, through an engine.

Each record is its own unit of work (``unit="record"``), so requests finish in any order and
their offsets are committed as they finish; the loop's in-flight bound is the admission bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Gauge

from pipeline.config import Settings
from pipeline.errors import InvalidInput, as_sluice_error
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.stage import StageSpec, output_for, rebind_ids
from schemas.errors import SchemaError
from schemas.messages import GeneratedMessage, TokenizedMessage, Usage, decode
from stages.engines.base import Engine, GenerationRequest
from stages.engines.providers import check_providers
from stages.text import fingerprint

STAGE = "compute"
log = logging.getLogger(__name__)


class Compute:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        topics = settings.topics
        self.spec = StageSpec(
            STAGE,
            topics.tokenized,
            topics.answers,
            unit="record",
            output_topics=(topics.generated,),
        )
        self.engine = engine
        self.model_path = settings.model_path
        self.out_topic = topics.generated
        # The waiting-tokens signal `sluice scale` and KEDA's Prometheus trigger scale on.
        self.pending_tokens = Gauge(
            "sluice_compute_pending_tokens",
            "Prompt plus requested max new tokens of the requests handed to the engine and "
            "not finished yet (running or waiting for a slot).",
            registry=None,
        )

    async def handle(self, batch: Batch) -> list[Result]:
        return list(await asyncio.gather(*(self._one(r) for r in batch)))

    async def _one(self, record: Record) -> Result:
        try:
            msg = decode(TokenizedMessage, record.value)
        except SchemaError as exc:
            return Result(record, error=InvalidInput.from_schema(exc))
        started = time.time()
        tokens = len(msg.input_ids) + (msg.sampling.max_tokens or 0)
        self.pending_tokens.inc(tokens)
        try:
            gen = await self.engine.generate(GenerationRequest(msg.id, msg.input_ids, msg.sampling))
        except Exception as exc:  # noqa: BLE001 - per-record failure: flags decide retry/DLT
            return Result(record, error=as_sluice_error(exc))
        finally:
            self.pending_tokens.dec(tokens)
        waited = max(0.0, started - (msg.timings.preprocessed_at or started))
        timings = msg.timings.model_copy(
            update={
                "queue_s": gen.queue_s or waited,
                "ttft_s": gen.ttft_s,
                "compute_s": gen.compute_s,
                "generated_at": time.time(),
            }
        )
        out = GeneratedMessage(
            id=msg.id,
            conversation_id=msg.conversation_id,
            model=msg.model,
            prompt_tokens=len(msg.input_ids),
            output_ids=gen.output_ids,
            finish_reason=gen.finish_reason,
            usage=Usage.of(len(msg.input_ids), len(gen.output_ids)),
            sampling=msg.sampling,
            created=msg.created,
            timings=timings,
        )
        output = output_for(
            record,
            self.out_topic,
            out,
            stage=STAGE,
            request_id=msg.id,
            key=msg.conversation_id.encode(),
        )
        return Result(record, outputs=[output], fingerprint=_fingerprint(msg))

    def fingerprint(self, record: Record) -> str | None:
        try:
            return _fingerprint(decode(TokenizedMessage, record.value))
        except SchemaError:
            return None

    def rebind(self, cached: Sequence[Output], record: Record) -> list[Output]:
        msg = decode(TokenizedMessage, record.value)
        return rebind_ids(
            cached,
            record,
            stage=STAGE,
            request_id=msg.id,
            conversation_id=msg.conversation_id,
            key=msg.conversation_id.encode(),
        )

    def collectors(self) -> list[Any]:
        """Pending tokens, and the engine's own metrics (running, waiting, tokens, TTFT, queue)."""
        collectors: list[Any] = getattr(self.engine, "collectors", list)()
        return [self.pending_tokens, *collectors]

    async def warmup(self) -> None:
        if self.engine.name == "onnx":  # which provider, or a clear error before loading
            log.info("compute engine: %s", check_providers(self.model_path).describe())
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()


def _fingerprint(msg: TokenizedMessage) -> str:
    return fingerprint(msg.model, msg.input_ids, msg.sampling.model_dump())
